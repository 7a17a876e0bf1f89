"""Restore onto a block device: data with pwrite, zero ranges with BLKZEROOUT unless the device is fresh."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

from mover.errors import SinkError
from mover.sources.device import device_size

log = logging.getLogger(__name__)

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range; the device may do it without moving data

# Parallel writes to one device help until its queue is full; 4 matched the readers' choice.
MAX_WRITERS = 4


class DeviceSink:
    """A block device at least as large as the disk restored.

    ``fresh=True``: the caller knows the device reads as zeros (a newly created disk), so zero ranges are
    skipped; otherwise they are zeroed, since old data must not show through.
    """

    def __init__(self, path: str, fresh: bool = False) -> None:
        self._path = path
        self._fresh = fresh
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SinkError("no such device", path=path) from None
        except OSError as e:
            raise SinkError(e.strerror or str(e), path=path) from None
        try:
            if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
                raise SinkError("not a block device", path=path)
            self._size = device_size(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        log.debug("Open sink device=%r size=%d fresh=%s", path, self._size, fresh)

    @property
    def name(self) -> str:
        return self._path

    @property
    def max_writers(self) -> int:
        return MAX_WRITERS

    def truncate(self, size: int) -> None:
        """A device cannot grow: check that the disk fits."""
        if size > self._size:
            raise SinkError(f"device holds {self._size} bytes, the backup needs {size}", path=self._path)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as e:
                raise SinkError(f"write at offset {offset + done}: {e.strerror}", path=self._path) from None

    def zero(self, offset: int, length: int) -> None:
        if self._fresh or length == 0:
            return
        try:
            fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise SinkError(f"zero at offset {offset}: {e.strerror}", path=self._path) from None
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        # Fallback for devices without BLKZEROOUT: plain writes of a reused zero buffer.
        chunk = bytes(min(length, 1024 * 1024))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, memoryview(chunk)[:n])
            offset += n

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise SinkError(f"fsync: {e.strerror}", path=self._path) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
