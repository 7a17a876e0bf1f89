"""Restore destinations: a file (zeros as holes), a block device; later imageio and SSH.

``open_sink(url)`` picks the backend by URL scheme like ``open_source``: a plain path is a block device
when it names one, a file otherwise.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from mover.errors import UsageError
from mover.sinks.base import Sink

__all__ = ["Sink", "open_sink", "register"]

_openers: dict[str, Callable[..., Sink]] = {}


def register(scheme: str, opener: Callable[..., Sink]) -> None:
    """Add a backend: ``opener(path_or_url, **options)`` returns a Sink."""
    _openers[scheme] = opener


def open_sink(url: str, **options: Any) -> Sink:
    """Open a restore destination. Options: ``overwrite`` (file), ``fresh`` (device)."""
    if "://" in url or url.startswith(("file:", "device:")):
        parts = urlsplit(url)
        scheme, target = parts.scheme, (parts.path if parts.scheme in ("file", "device") else url)
    else:
        target = url
        try:
            scheme = "device" if stat.S_ISBLK(os.stat(url).st_mode) else "file"
        except OSError:
            scheme = "file"
    opener = _openers.get(scheme)
    if opener is None:
        raise UsageError(f"unsupported destination {url!r} (known: {', '.join(sorted(_openers))})")
    return opener(target, **options)


def _open_file(path: str, overwrite: bool = False, **_: Any) -> Sink:
    from mover.sinks.file import FileSink

    return FileSink(path, overwrite=overwrite)


def _open_device(path: str, fresh: bool = False, **_: Any) -> Sink:
    from mover.sinks.device import DeviceSink

    return DeviceSink(path, fresh=fresh)


register("file", _open_file)
register("device", _open_device)
