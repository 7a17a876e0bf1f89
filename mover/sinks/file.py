"""Restore into a regular file: created or emptied, then sized; zeros stay holes (never written).

The file is made fresh (truncated to 0, then to the disk's size), so every range reads as zeros before
anything is written: zero blocks need no call at all, and zero pieces inside a data block are skipped too.
"""

from __future__ import annotations

import logging
import os
import stat

from mover.errors import SinkError
from mover.kernels import zero_flags

log = logging.getLogger(__name__)

# Zero pieces of a data block smaller than this are written: 64 KiB is the cluster size of qcow2 and
# the granularity of dirty bitmaps, and smaller holes fragment the file for little saving.
HOLE_GRANULE = 64 * 1024

# Restore to a local file scales with threads until the disk is busy; 4 saturated NVMe here.
MAX_WRITERS = 4


def _oserror(path: str, what: str, e: OSError) -> SinkError:
    # The destination is full or failing, not the store: say so (ENOSPC reads "No space left on device").
    return SinkError(f"{what}: {e.strerror}", path=path)


class FileSink:
    """A raw image file written with pwrite from several threads."""

    def __init__(self, path: str, overwrite: bool = False) -> None:
        self._path = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise SinkError(e.strerror or str(e), path=path) from None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise SinkError("not a regular file", path=path)
            if st.st_size and not overwrite:
                raise SinkError("file exists and is not empty (use --force to overwrite)", path=path)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SinkError(e.strerror or str(e), path=path) from None
        log.debug("Open sink path=%r", path)

    @property
    def name(self) -> str:
        return self._path

    @property
    def max_writers(self) -> int:
        return MAX_WRITERS

    def truncate(self, size: int) -> None:
        """Make the file a ``size``-byte hole: old content is dropped, so zeros need no writes."""
        try:
            # Only a file with content is cut to 0 first: on ext4 a truncate to 0 marks the file for
            # "replace via truncate" (auto_da_alloc), so close() would start writing it all back and wait.
            if os.fstat(self._fd).st_size:
                os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise _oserror(self._path, "truncate", e) from None

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``, skipping 64 KiB pieces that are all zeros (they stay holes)."""
        view = memoryview(data).cast("B")
        n = len(view)
        # One GIL-free pass flags every granule; runs of non-zero granules are then one pwrite each.
        flags = zero_flags(view, HOLE_GRANULE)
        count = len(flags)
        i = flags.find(0)
        while 0 <= i < count:
            j = flags.find(1, i)
            if j < 0:
                j = count
            self._pwrite(offset + i * HOLE_GRANULE, view[i * HOLE_GRANULE : min(j * HOLE_GRANULE, n)])
            i = flags.find(0, j)

    def _pwrite(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as e:
                raise _oserror(self._path, f"write at offset {offset + done}", e) from None

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: the file was made a hole by ``truncate``."""

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _oserror(self._path, "fsync", e) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
