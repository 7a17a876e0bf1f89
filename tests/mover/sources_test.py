"""Sources: raw files (holes via SEEK_DATA/SEEK_HOLE, several readers), block devices (a real loop device),
``--changed`` extent lists, and the URL registry."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.errors import SourceError, UsageError
from mover.sources import open_source
from mover.sources.base import Extent
from mover.sources.device import DeviceSource
from mover.sources.extents import cover, load_changed, parse_changed
from mover.sources.file import FileSource

MiB = 1024 * 1024


def make_sparse(path: Path, size: int, data_at: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in data_at:
            f.seek(off)
            f.write(data)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real loop device over an 8 MiB file with known content; always detached."""
    backing = tmp_path / "disk.img"
    content = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB)
    backing.write_bytes(content)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_file_extents_follow_holes(tmp_path: Path) -> None:
    path = tmp_path / "img"
    make_sparse(path, 16 * MiB, [(1 * MiB, b"a" * MiB), (8 * MiB, b"b" * (2 * MiB))])
    src = FileSource(str(path))
    try:
        ext = list(src.extents())
    finally:
        src.close()
    assert ext[0].start == 0 and ext[-1].end == 16 * MiB
    for a, b in itertools.pairwise(ext):
        assert a.end == b.start
    data = [(e.start, e.end) for e in ext if not e.zero]
    # the filesystem may round data extents to its block size, never drop them
    assert any(s <= 1 * MiB and e >= 2 * MiB for s, e in data)
    assert any(s <= 8 * MiB and e >= 10 * MiB for s, e in data)
    assert sum(e.length for e in ext if not e.zero) < 8 * MiB  # holes were found


def test_file_readers_are_independent(tmp_path: Path) -> None:
    path = tmp_path / "img"
    content = os.urandom(8 * MiB)
    path.write_bytes(content)
    src = FileSource(str(path), readers=4)
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        r = src.reader()
        buf = bytearray(MiB)
        try:
            for off in range(i * MiB, 8 * MiB, 4 * MiB):
                assert r.readinto(off, memoryview(buf)) == MiB
                results[off] = bytes(buf)
        finally:
            r.close()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    src.close()
    assert b"".join(results[o] for o in sorted(results)) == content


def test_short_read_at_end(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"x" * 1000)
    src = FileSource(str(path))
    r = src.reader()
    buf = bytearray(4096)
    assert r.readinto(0, memoryview(buf)) == 1000
    r.close()
    src.close()


def test_changed_extents(tmp_path: Path) -> None:
    f = tmp_path / "changed.json"
    f.write_text(json.dumps([
        {"start": 0, "length": 65536, "dirty": False, "zero": False},
        {"start": 65536, "length": 131072, "dirty": True, "zero": False},
        {"start": 4 * MiB, "length": 65536, "dirty": True, "zero": True},
    ]))
    changed = load_changed(str(f))
    assert [e.dirty for e in changed] == [False, True, True]
    path = tmp_path / "img"
    make_sparse(path, 8 * MiB, [])
    src = FileSource(str(path), changed=changed)
    ext = list(src.extents("dirty"))
    src.close()
    assert ext[0].start == 0 and ext[-1].end == 8 * MiB
    assert sum(e.length for e in ext if e.dirty) == 3 * 65536
    assert list(cover([], 100)) == [Extent(0, 100, zero=False, dirty=False)]


@pytest.mark.parametrize("bad", [
    {"start": 0},
    [{"start": "0", "length": 1}],
    [{"start": -1, "length": 1}],
    [{"start": 0, "length": 100}, {"start": 50, "length": 100}],
])
def test_changed_extents_bad(bad: object) -> None:
    with pytest.raises(UsageError):
        parse_changed(bad)


def test_changed_past_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img"
    make_sparse(path, MiB, [])
    src = FileSource(str(path), changed=[Extent(0, 2 * MiB)])
    with pytest.raises(UsageError):
        list(src.extents("dirty"))
    src.close()


def test_changed_file_not_json(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_changed(str(f))


def test_device_source(loop_device: tuple[str, Path]) -> None:
    dev, backing = loop_device
    content = backing.read_bytes()
    for direct in (False, True):
        src = open_source(dev, direct=direct)
        assert isinstance(src, DeviceSource)
        assert src.size == len(content)
        assert [(e.start, e.length, e.zero) for e in src.extents()] == [(0, len(content), False)]
        r = src.reader()
        import mmap

        buf = mmap.mmap(-1, 2 * MiB)  # page aligned, as O_DIRECT needs
        got = bytearray()
        for off in range(0, src.size, 2 * MiB):
            n = r.readinto(off, memoryview(buf))
            got += buf[:n]
        r.close()
        buf.close()
        src.close()
        assert bytes(got) == content


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match=r"is a directory|not a regular file"):
        open_source(str(tmp_path))
    with pytest.raises(UsageError, match="unsupported source"):
        open_source("gopher://x/y")
    with pytest.raises(SourceError, match="not a block device"):
        open_source("device:" + str(tmp_path))


def test_open_source_by_url(tmp_path: Path) -> None:
    path = tmp_path / "img"
    make_sparse(path, MiB, [])
    for url in (str(path), f"file:{path}", f"file://{path}"):
        src = open_source(url)
        assert isinstance(src, FileSource) and src.size == MiB
        src.close()
