"""Manifests: the full map offset -> block id of one disk backup, as a compact array of 32-byte ids.

Layout of ``backups/<id>/manifest`` (little-endian; docs/store-format.md, "Manifests"):
    header   32 B   magic b"FRYMANI\\0", u32 version, u32 block_size, u64 size, u64 count
    ids      32 B each: entry i covers bytes [i * block_size, (i + 1) * block_size); ZERO_ID for zeros
    trailer  16 B   xxh3-128 of everything before it
In memory a manifest is an mmap: anonymous for a new one (untouched pages cost nothing, and an all-zero
page is a run of ZERO_IDs), copy-on-write of the file for one loaded or based on an earlier backup. So a
64 GiB disk's manifest (8 MiB at 256 KiB blocks) costs only the pages a backup changes.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

import xxhash

from mover.errors import StoreCorrupt
from mover.store import fsutil
from mover.store.api import ZERO_ID

MAGIC = b"FRYMANI\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
TRAILER = 16
ID_SIZE = 32
MANIFEST_FILE = "manifest"


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


class Manifest:
    """offset -> block id for one disk; see ``mover.store.api.Manifest``."""

    def __init__(self, size: int, block_size: int, mm: mmap.mmap | None = None, offset: int = 0) -> None:
        self.size = size
        self.block_size = block_size
        self.count = block_count(size, block_size)
        nbytes = self.count * ID_SIZE
        if mm is None and nbytes:
            mm = mmap.mmap(-1, nbytes)  # anonymous: zero-filled, so every entry starts as ZERO_ID
        self._mm = mm
        self.ids: memoryview = memoryview(mm)[offset : offset + nbytes] if mm is not None else memoryview(b"")
        self.on_release: Callable[[], None] | None = None  # called once when saved or closed

    def release(self) -> None:
        """Tell the store this manifest no longer needs its blocks protected (idempotent)."""
        cb, self.on_release = self.on_release, None
        if cb is not None:
            cb()

    def __len__(self) -> int:
        return self.count

    def _check(self, index: int) -> int:
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"block {index} out of range (manifest has {self.count})")
        return index

    def __getitem__(self, index: int) -> bytes:
        i = self._check(index) * ID_SIZE
        return bytes(self.ids[i : i + ID_SIZE])

    def __setitem__(self, index: int, block_id: bytes) -> None:
        if len(block_id) != ID_SIZE:
            raise ValueError("block id must be 32 bytes")
        i = self._check(index) * ID_SIZE
        self.ids[i : i + ID_SIZE] = block_id

    def set_range(self, index: int, ids: bytes | memoryview) -> None:
        """Set consecutive entries from ``index`` at once (``ids`` is n * 32 bytes)."""
        n = len(ids) // ID_SIZE
        if len(ids) % ID_SIZE or index < 0 or index + n > self.count:
            raise IndexError(f"entries [{index}, {index + n}) out of range (manifest has {self.count})")
        self.ids[index * ID_SIZE : (index + n) * ID_SIZE] = ids

    def is_zero(self, index: int) -> bool:
        return self[index] == ZERO_ID

    def chunks(self, entries: int = 1 << 15) -> list[memoryview]:
        """The id array in slices of ``entries`` ids, for streaming."""
        step = entries * ID_SIZE
        return [self.ids[i : i + step] for i in range(0, len(self.ids), step)]

    def close(self) -> None:
        """Unmap now rather than at garbage collection."""
        self.release()
        self.ids.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view of the ids: the map goes when that view does
            self._mm = None


def write(root: str, path: str, manifest: Manifest) -> None:
    """Atomically write ``manifest`` to ``path``, streamed from its mmap."""
    h = xxhash.xxh3_128()
    with fsutil.atomic_file(root, path) as fd:
        head = HEADER.pack(MAGIC, VERSION, manifest.block_size, manifest.size, manifest.count)
        h.update(head)
        fsutil.write_all(fd, head)
        for chunk in manifest.chunks():
            h.update(chunk)
            fsutil.write_all(fd, chunk)
        fsutil.write_all(fd, h.digest())


def load(root: str, path: str, writable: bool = True) -> Manifest:
    """Map a manifest file (copy-on-write if ``writable``), verifying its header, size and checksum."""
    rel = os.path.relpath(path, root)
    with open(path, "rb") as f:
        fsize = os.fstat(f.fileno()).st_size
        if fsize < HEADER.size + TRAILER:
            raise StoreCorrupt(f"manifest {rel} is truncated", path=root)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
    magic, version, block_size, size, count = HEADER.unpack_from(mm)
    if magic != MAGIC:
        mm.close()
        raise StoreCorrupt(f"manifest {rel} has a bad magic", path=root)
    if version > VERSION:
        mm.close()
        raise StoreCorrupt(f"manifest {rel} has version {version} (newer than {VERSION})", path=root)
    if count != block_count(size, block_size) or fsize != HEADER.size + count * ID_SIZE + TRAILER:
        mm.close()
        raise StoreCorrupt(f"manifest {rel} is truncated or inconsistent", path=root)
    if xxhash.xxh3_128_digest(memoryview(mm)[: fsize - TRAILER]) != mm[fsize - TRAILER :]:
        mm.close()
        raise StoreCorrupt(f"manifest {rel} fails its checksum", path=root)
    return Manifest(size, block_size, mm, HEADER.size)


def resized(base: Manifest, size: int) -> Manifest:
    """A copy of ``base`` for a disk now ``size`` bytes long (grown: new blocks zero; shrunk: cut)."""
    new = Manifest(size, base.block_size)
    n = min(new.count, base.count) * ID_SIZE
    new.ids[:n] = base.ids[:n]
    return new
