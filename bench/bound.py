"""The compression bound: zstd level 1 on all cores over an image's non-zero data.

No backup tool that compresses with zstd can beat this by much: it reads only data extents (SEEK_DATA), skips
all-zero 64 KiB blocks, and does nothing but compress, with zstd's own worker threads on every core. Ferry's
target is to stay within 1.5x of its time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import zstandard

BLOCK = 65536  # zero blocks are skipped at the dirty-bitmap granularity
CHUNK = 8 * 1024**2  # large reads, few syscalls


@dataclass
class Bound:
    seconds: float
    data_bytes: int  # non-zero bytes compressed
    compressed: int  # zstd output bytes
    threads: int


class _Counter:
    """A write-only sink that only counts, so the bound measures compression, not storage."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


def measure(path: str | os.PathLike[str], level: int = 1, threads: int | None = None) -> Bound:
    """Compress the non-zero 64 KiB blocks of ``path`` with zstd on ``threads`` workers (all cores by default)."""
    nthreads = threads or os.cpu_count() or 1
    sink = _Counter()
    zero = bytes(BLOCK)
    data = 0
    start = time.perf_counter()
    cctx = zstandard.ZstdCompressor(level=level, threads=nthreads)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with cctx.stream_writer(sink, closefd=False) as writer:  # type: ignore[arg-type]
            pos = 0
            while pos < size:
                try:
                    ext_start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole remains
                    break
                ext_end = os.lseek(fd, ext_start, os.SEEK_HOLE)
                off = ext_start
                while off < ext_end:
                    buf = os.pread(fd, min(CHUNK, ext_end - off), off)
                    if not buf:
                        break
                    view = memoryview(buf)
                    for i in range(0, len(buf), BLOCK):
                        blk = view[i : i + BLOCK]
                        if blk != zero[: len(blk)]:
                            writer.write(blk)
                            data += len(blk)
                    off += len(buf)
                pos = ext_end
    finally:
        os.close(fd)
    return Bound(seconds=time.perf_counter() - start, data_bytes=data, compressed=sink.n, threads=nthreads)
