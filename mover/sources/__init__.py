"""Sources of block data: raw image files, block devices; later imageio and SSH.

``open_source(url)`` picks the backend by URL scheme (a plain path means ``file:``, or ``device:`` when it
names a block device), as ovirt-imageio picks its backends.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from mover.errors import SourceError, UsageError
from mover.sources.base import Extent, Reader, Source

__all__ = ["Extent", "Reader", "Source", "open_source", "register"]

_openers: dict[str, Callable[..., Source]] = {}


def register(scheme: str, opener: Callable[..., Source]) -> None:
    """Add a backend: ``opener(path_or_url, changed=..., **options)`` returns a Source."""
    _openers[scheme] = opener


def _path_of(url: str) -> tuple[str, str]:
    """(scheme, target): ``file:/x``, ``file:///x``, ``device:/dev/x``, or a plain path."""
    if "://" not in url and not url.startswith(("file:", "device:")):
        return "", url
    parts = urlsplit(url)
    if parts.scheme in ("file", "device"):
        return parts.scheme, parts.path
    return parts.scheme, url


def open_source(url: str, changed: list[Extent] | None = None, **options: Any) -> Source:
    """Open a backup source by URL or path; ``changed`` marks the dirty extents (from ``--changed``)."""
    scheme, target = _path_of(url)
    if scheme == "":
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            raise SourceError("no such file or device", path=target) from None
        except OSError as e:
            raise SourceError(e.strerror or str(e), path=target) from None
        scheme = "device" if stat.S_ISBLK(mode) else "file"
    opener = _openers.get(scheme)
    if opener is None:
        raise UsageError(f"unsupported source {url!r} (known: {', '.join(sorted(_openers))})")
    return opener(target, changed=changed, **options)


def _open_file(path: str, changed: list[Extent] | None = None, direct: bool = False, **options: Any) -> Source:
    from mover.sources.file import FileSource

    # O_DIRECT is for devices: an image file's size need not be sector aligned, and its reads are the page
    # cache's business (the file is usually a copy made for the backup).
    return FileSource(path, changed=changed, **options)


def _open_device(path: str, changed: list[Extent] | None = None, **options: Any) -> Source:
    from mover.sources.device import DeviceSource

    return DeviceSource(path, changed=changed, **options)


register("file", _open_file)
register("device", _open_device)
