"""Extent helpers shared by the sources: holes via SEEK_DATA/SEEK_HOLE, and ``--changed`` extent lists.

``--changed`` takes the JSON list ovirt-imageio's ``GET /extents?context=dirty`` answers:
``[{"start": 0, "length": 65536, "dirty": true, "zero": false}, ...]``.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from mover.errors import UsageError
from mover.sources.base import Extent


def data_extents(fd: int, size: int) -> Iterator[Extent]:
    """Extents of an open regular file, holes as zero extents (SEEK_DATA/SEEK_HOLE).

    A filesystem without hole reporting answers SEEK_DATA with the offset itself, so the whole file is data.
    """
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size  # no data after pos: the rest is a hole
        data = min(data, size)
        if data > pos:
            yield Extent(pos, data - pos, zero=True)
        if data >= size:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole = size
        hole = min(hole, size)
        yield Extent(data, hole - data, zero=False)
        pos = hole


def parse_changed(items: Any, where: str = "changed extents") -> list[Extent]:
    """Validate an imageio dirty-extents list; return its extents sorted and non-overlapping."""
    if not isinstance(items, list):
        raise UsageError(f"{where}: expected a JSON list of extents")
    out: list[Extent] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: item {n} is not an object")
        start, length = item.get("start"), item.get("length")
        if not isinstance(start, int) or not isinstance(length, int) or isinstance(start, bool):
            raise UsageError(f"{where}: item {n} needs integer start and length")
        if start < 0 or length < 0:
            raise UsageError(f"{where}: item {n} has a negative start or length")
        if length == 0:
            continue
        out.append(Extent(start, length, zero=bool(item.get("zero", False)), dirty=bool(item.get("dirty", True))))
    out.sort(key=lambda e: e.start)
    for a, b in itertools.pairwise(out):
        if b.start < a.end:
            raise UsageError(f"{where}: extents at {a.start} and {b.start} overlap")
    return out


def load_changed(path: str) -> list[Extent]:
    """Read a ``--changed`` file (an imageio ``/extents?context=dirty`` answer)."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read changed extents {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"changed extents {path} is not valid JSON: {e}") from None
    return parse_changed(items, where=f"changed extents {path}")


def cover(changed: Iterable[Extent], size: int) -> Iterator[Extent]:
    """Extents covering ``[0, size)``: the changed ones as given, the gaps as ``dirty=False``.

    Changed extents beyond ``size`` are an error: the list belongs to another disk.
    """
    pos = 0
    for e in changed:
        if e.end > size:
            raise UsageError(f"changed extent {e.start}+{e.length} ends past the source size {size}")
        if e.start > pos:
            yield Extent(pos, e.start - pos, zero=False, dirty=False)
        yield e
        pos = e.end
    if pos < size:
        yield Extent(pos, size - pos, zero=False, dirty=False)
