"""A raw image file as a backup source: holes found with SEEK_DATA/SEEK_HOLE, several readers with preadv."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator

from mover.errors import SourceError, UsageError
from mover.sources import extents as _extents
from mover.sources.base import Extent

log = logging.getLogger(__name__)

# Readers beyond the cores add nothing on a local file; 4 keeps a disk queue busy without thrashing.
MAX_READERS = 4


def close_fd(fd: int, path: str) -> None:
    """Close a read-only descriptor; an error there (a FUSE server gone) loses no data, so it is only logged."""
    try:
        os.close(fd)
    except OSError as e:
        log.debug("Close failed path=%r error=%s", path, e)


def open_fd(path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` for reading, mapping OS errors to one-line ``SourceError``s."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError("no such file or device", path=path) from None
    except IsADirectoryError:
        raise SourceError("is a directory", path=path) from None
    except OSError as e:
        raise SourceError(e.strerror or str(e), path=path) from None


class FdReader:
    """One reader with its own file descriptor, so readers never share a file position or a lock."""

    def __init__(self, path: str, flags: int = os.O_RDONLY) -> None:
        self._path = path
        self._fd = open_fd(path, flags)

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; short only at the end of the source."""
        done = 0
        want = len(buf)
        while done < want:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as e:
                raise SourceError(f"read at offset {offset + done}: {e.strerror}", path=self._path) from None
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self._fd >= 0:
            close_fd(self._fd, self._path)
            self._fd = -1


class LocalSource:
    """What a file and a device source share: a path, a size, readers of their own, changed extents.

    ``changed``: the extents that changed since the base backup (from ``--changed``); with it,
    ``extents("dirty")`` marks them and only they need reading.
    """

    def __init__(self, path: str, changed: list[Extent] | None, readers: int) -> None:
        self._path = path
        self._changed = changed
        self._max_readers = max(1, readers)
        self._size = 0

    @property
    def name(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_readers(self) -> int:
        return self._max_readers

    def extents(self, context: str = "zero") -> Iterator[Extent]:
        """Data and zero extents (``context="zero"``), or the changed extents (``context="dirty"``)."""
        if context == "zero":
            yield from self._zero_extents()
        elif context == "dirty":
            if self._changed is None:
                yield Extent(0, self._size, zero=False, dirty=True)
            else:
                yield from _extents.cover(self._changed, self._size)
        else:
            raise UsageError(f"unknown extents context {context!r}")

    def _zero_extents(self) -> Iterator[Extent]:
        """All data unless the source knows better (the pipeline finds the zero blocks)."""
        yield Extent(0, self._size, zero=False)


class FileSource(LocalSource):
    """A raw disk image in a regular file; its holes are zero extents."""

    def __init__(self, path: str, changed: list[Extent] | None = None, readers: int = MAX_READERS) -> None:
        super().__init__(path, changed, readers)
        self._fd = open_fd(path)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError("not a regular file", path=path)
            self._size = st.st_size
        except BaseException:
            os.close(self._fd)
            raise
        log.debug("Open source path=%r size=%d", path, self._size)

    def _zero_extents(self) -> Iterator[Extent]:
        try:
            yield from _extents.data_extents(self._fd, self._size)
        except OSError as e:
            raise SourceError(f"cannot map extents: {e.strerror}", path=self._path) from None

    def reader(self) -> FdReader:
        return FdReader(self._path)

    def close(self) -> None:
        if self._fd >= 0:
            close_fd(self._fd, self._path)
            self._fd = -1
