"""Pack files: an append-only sequence of self-describing block records.

Layout (little-endian; docs/store-format.md, "Pack files"):
    header  16 B  magic b"FRYPACK\\0", u32 version, u32 reserved (0)
    record  48 B  id[32], u32 stored_len, u32 raw_len, u32 flags (bit 0: zstd), u32 xxh32(stored bytes)
            stored_len bytes of data
A pack is written under ``tmp/`` by one writer, fsynced and renamed to ``packs/<xx>/<name>.pack``; only
then is its index segment published. Records carry their own id and checksum so a pack can be scanned
(check, index rebuild) without its index.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from mover.errors import StoreCorrupt
from mover.store import fsutil

MAGIC = b"FRYPACK\0"
VERSION = 1
HEADER = struct.Struct("<8sII")
RECORD = struct.Struct("<32sIIII")
FLAG_ZSTD = 1
PACK_DIR = "packs"


def new_name() -> str:
    """A unique pack name (random, so concurrent writers never collide)."""
    return uuid.uuid4().hex


def pack_path(root: str, name: str) -> str:
    """Where pack ``name`` lives: fanned out by its first two hex digits to keep directories small."""
    return os.path.join(root, PACK_DIR, name[:2], f"{name}.pack")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The per-record checksum: catches torn or flipped bytes without needing the store key."""
    return xxhash.xxh32_intdigest(data)


@dataclass(frozen=True)
class Record:
    """Where one block lives inside a pack."""

    id: bytes
    offset: int  # of the record header
    stored_len: int
    raw_len: int
    flags: int


class PackWriter:
    """Appends records to one new pack under ``tmp/``; ``finish`` makes it durable under its final name."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.name = new_name()
        self.tmp = fsutil.tmp_path(root, ".pack")
        self.records: list[Record] = []
        try:
            self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fsutil.write_all(self._fd, HEADER.pack(MAGIC, VERSION, 0))
        except OSError as e:
            self.discard()
            raise fsutil.store_error(e, root, "cannot create pack") from e
        self.size = HEADER.size

    def append(self, block_id: bytes, stored: bytes | bytearray | memoryview, raw_len: int, flags: int) -> Record:
        """Append one record; raises ``StoreFull``/``StoreError`` (the pack is then unusable)."""
        return self.append_record(RECORD.pack(block_id, len(stored), raw_len, flags, checksum(stored)),
                                  block_id, stored, raw_len, flags)

    def append_record(self, head: bytes, block_id: bytes, stored: bytes | bytearray | memoryview, raw_len: int,
                      flags: int) -> Record:
        """``append`` with ``head``, the record's ``RECORD`` header (checksum included), already built."""
        assert self._fd is not None
        rec = Record(block_id, self.size, len(stored), raw_len, flags)
        try:
            n = os.writev(self._fd, [head, stored])  # one syscall, no copy of the block
            if n < len(head) + len(stored):  # short write (rare on regular files): finish the rest
                fsutil.write_all(self._fd, (head + bytes(stored))[n:])
        except OSError as e:
            raise fsutil.store_error(e, self.root, f"cannot write pack {self.name}") from e
        self.size += RECORD.size + len(stored)
        self.records.append(rec)
        return rec

    def finish(self) -> str:
        """fsync and rename into ``packs/``; returns the final path."""
        assert self._fd is not None
        final = pack_path(self.root, self.name)
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(self.tmp, final)
            fsutil.fsync_dir(os.path.dirname(final))
        except OSError as e:
            self.discard()
            raise fsutil.store_error(e, self.root, f"cannot finish pack {self.name}") from e
        return final

    def discard(self) -> None:
        """Drop the unfinished pack."""
        if getattr(self, "_fd", None) is not None:
            assert self._fd is not None
            os.close(self._fd)
            self._fd = None
        fsutil.remove(self.tmp)


def read_record(fd: int, offset: int, stored_len: int, path: str, root: str) -> tuple[bytes, int, int, bytes]:
    """Read one record: ``(id, raw_len, flags, stored bytes)``; ``StoreCorrupt`` if short or garbled."""
    try:
        buf = os.pread(fd, RECORD.size + stored_len, offset)
    except OSError as e:
        raise StoreCorrupt(f"cannot read {os.path.relpath(path, root)}: {e.strerror}", path=root) from e
    if len(buf) != RECORD.size + stored_len:
        raise StoreCorrupt(f"{os.path.relpath(path, root)} is truncated at offset {offset}", path=root)
    block_id, slen, raw_len, flags, crc = RECORD.unpack_from(buf)
    data = buf[RECORD.size :]
    if slen != stored_len or checksum(data) != crc:
        raise StoreCorrupt(
            f"record at offset {offset} of {os.path.relpath(path, root)} fails its checksum", path=root
        )
    return block_id, raw_len, flags, data


def check_record(buf: bytes | bytearray | memoryview, at: int, block_id: bytes, stored_len: int, raw_len: int,
                 crc: bool = True) -> int:
    """The flags of the record at ``buf[at:]`` if it is block ``block_id`` with these lengths and (with
    ``crc``) its checksum holds, else -1 (what ``read_record`` checks, on a record already in memory)."""
    bid, slen, rlen, flags, want = RECORD.unpack_from(buf, at)
    if bid != block_id or slen != stored_len or rlen != raw_len:
        return -1
    if crc and checksum(memoryview(buf)[at + RECORD.size : at + RECORD.size + stored_len]) != want:
        return -1
    return int(flags)


def scan(path: str, root: str) -> Iterator[Record]:
    """Every record of a pack in order (for check and index rebuild); stops at the first bad header."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) != HEADER.size or HEADER.unpack(head)[0] != MAGIC:
            raise StoreCorrupt(f"{os.path.relpath(path, root)} is not a pack", path=root)
        offset = HEADER.size
        end = os.fstat(f.fileno()).st_size
        while offset + RECORD.size <= end:
            f.seek(offset)
            block_id, slen, raw_len, flags, _ = RECORD.unpack(f.read(RECORD.size))
            if offset + RECORD.size + slen > end:
                raise StoreCorrupt(f"{os.path.relpath(path, root)} is truncated at offset {offset}", path=root)
            yield Record(block_id, offset, slen, raw_len, flags)
            offset += RECORD.size + slen
