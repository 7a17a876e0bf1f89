"""A block device as a backup source: size from BLKGETSIZE64, large aligned reads, optionally O_DIRECT.

Every extent is data (a device has no holes to ask about); the pipeline finds the zero blocks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct

from mover.errors import SourceError
from mover.sources.base import Extent
from mover.sources.file import FdReader, LocalSource, open_fd

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical sector size, the O_DIRECT alignment

# Devices (a disk attached to the proxy VM) serve parallel requests well; more than 4 readers gained
# nothing on a loop device here and each reader holds a buffer.
MAX_READERS = 4


def device_size(fd: int) -> int:
    """Size in bytes of the block device open at ``fd``."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("Q", buf)[0])


def sector_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return int(struct.unpack("I", buf)[0])


class DeviceSource(LocalSource):
    """A block device (``/dev/loopN``, ``/dev/sdX``, a by-id link).

    ``direct=True`` reads with O_DIRECT (bypassing the page cache, as a backup of a big disk should); the
    pipeline's buffers are page aligned and its offsets block aligned, which O_DIRECT needs.
    """

    def __init__(
        self,
        path: str,
        changed: list[Extent] | None = None,
        readers: int = MAX_READERS,
        direct: bool = False,
    ) -> None:
        super().__init__(path, changed, readers)
        self._flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = open_fd(path)
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise SourceError("not a block device", path=path)
            self._size = device_size(fd)
            self.alignment = sector_size(fd)
        except OSError as e:
            raise SourceError(e.strerror or str(e), path=path) from None
        finally:
            os.close(fd)
        log.debug("Open source device=%r size=%d direct=%s", path, self._size, direct)

    def reader(self) -> FdReader:
        return FdReader(self._path, self._flags)

    def close(self) -> None:
        pass
