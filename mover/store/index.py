"""Index segments: sorted, checksummed tables of (block id -> pack, offset, lengths), read through mmap.

Layout of ``index/<name>.idx`` (little-endian; docs/store-format.md, "Index segments"):
    header   24 B   magic b"FRYINDX\\0", u32 version, u32 npacks, u64 count
    packs    16 B each: the raw 128-bit name of every pack the entries point into
    entries  56 B each, sorted by id: id[32], u64 offset, u32 stored_len, u32 raw_len, u32 pack_no, u32 flags
    trailer  16 B   xxh3-128 of everything before it
A writer publishes one segment per finished pack; compaction merges segments into one. The index is the
union of the segments; a lookup is a GIL-free binary search (``kernels.bsearch``) per segment, so memory
stays at the pages the searches touch, whatever the number of blocks.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import xxhash

from mover import kernels
from mover.errors import StoreCorrupt
from mover.store import fsutil, pack

log = logging.getLogger(__name__)

MAGIC = b"FRYINDX\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
ENTRY = struct.Struct("<32sQIIII")
PACK_NAME = 16
TRAILER = 16
INDEX_DIR = "index"
SUFFIX = ".idx"


@dataclass(frozen=True)
class Entry:
    """One block as an index segment records it."""

    id: bytes
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    flags: int


def segment_path(root: str, name: str) -> str:
    return os.path.join(root, INDEX_DIR, name + SUFFIX)


def write_segment(root: str, name: str, packs: list[str], entries: Iterable[tuple[bytes, int, int, int, int, int]],
                  count: int) -> str:
    """Atomically write segment ``name``; ``entries`` are ``ENTRY`` tuples sorted by id, ``count`` of them."""
    final = segment_path(root, name)
    h = xxhash.xxh3_128()
    with fsutil.atomic_file(root, final) as fd:
        buf = bytearray(HEADER.pack(MAGIC, VERSION, len(packs), count))
        for p in packs:
            buf += bytes.fromhex(p)
        written = 0
        for e in entries:
            buf += ENTRY.pack(*e)
            written += 1
            if len(buf) >= 1 << 20:  # stream: a merged segment can be far larger than memory should hold
                h.update(buf)
                fsutil.write_all(fd, buf)
                buf.clear()
        if written != count:
            raise ValueError(f"segment {name}: {written} entries, header says {count}")
        h.update(buf)
        buf += h.digest()
        fsutil.write_all(fd, buf)
    return final


def write_pack_segment(root: str, pack_name: str, records: list[pack.Record]) -> str:
    """The segment of one freshly finished pack (named after it)."""
    rows = sorted((r.id, r.offset, r.stored_len, r.raw_len, 0, r.flags) for r in records)
    return write_segment(root, pack_name, [pack_name], rows, len(rows))


class Segment:
    """One index segment, mmapped read-only and verified against its trailer when opened."""

    def __init__(self, root: str, name: str, verify: bool = True) -> None:
        self.root = root
        self.name = name
        self.path = segment_path(root, name)
        rel = os.path.relpath(self.path, root)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER.size + TRAILER:
                raise StoreCorrupt(f"index segment {rel} is truncated ({size} bytes)", path=root)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, npacks, count = HEADER.unpack_from(self._mm)
        if magic != MAGIC:
            raise StoreCorrupt(f"index segment {rel} has a bad magic", path=root)
        if version > VERSION:
            raise StoreCorrupt(f"index segment {rel} has version {version} (newer than {VERSION})", path=root)
        self.entries_at = HEADER.size + npacks * PACK_NAME
        expected = self.entries_at + count * ENTRY.size + TRAILER
        if size != expected:
            raise StoreCorrupt(f"index segment {rel} is truncated ({size} of {expected} bytes)", path=root)
        if verify and xxhash.xxh3_128_digest(memoryview(self._mm)[: size - TRAILER]) != self._mm[size - TRAILER :]:
            raise StoreCorrupt(f"index segment {rel} fails its checksum", path=root)
        self.count = count
        self.packs = [self._mm[HEADER.size + i * PACK_NAME : HEADER.size + (i + 1) * PACK_NAME].hex()
                      for i in range(npacks)]

    def close(self) -> None:
        """Unmap (a mapped file keeps its filesystem busy: umount fails while any is mapped)."""
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still in use; the map goes with it

    @property
    def buffer(self) -> mmap.mmap:
        return self._mm

    def find(self, block_id: bytes) -> int:
        """Position of ``block_id`` or -1."""
        return kernels.bsearch(self._mm, self.entries_at, self.count, ENTRY.size, block_id)

    def entry(self, pos: int) -> Entry:
        bid, off, slen, rlen, pno, flags = ENTRY.unpack_from(self._mm, self.entries_at + pos * ENTRY.size)
        return Entry(bid, self.packs[pno], off, slen, rlen, flags)

    def raw(self, pos: int) -> tuple[bytes, int, int, int, int, int]:
        return ENTRY.unpack_from(self._mm, self.entries_at + pos * ENTRY.size)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Entry]:
        for i in range(self.count):
            yield self.entry(i)


def count_missing(segments: tuple[Segment, ...], ids: memoryview | bytes | bytearray,
                  live: list[bytearray] | None = None, found: bytearray | None = None) -> int:
    """Non-zero ids of ``ids`` (n * 32 bytes) found in no segment; with ``live``, flag each first copy.

    ``found``, if given, is filled with one flag per id (1: zero or found) for the caller to inspect.
    """
    flags = kernels.zero_flags(ids, 32)  # ZERO_ID entries count as found: they are never stored
    if found is not None:
        found[:] = flags
        flags = found
    found = flags
    left = len(found) - sum(found)
    for n, seg in enumerate(segments):
        if not left:
            break
        left -= kernels.mark_found(seg.buffer, seg.entries_at, seg.count, ENTRY.size, ids, found,
                                   None if live is None else live[n])
    return left


def search_order(seg: Segment) -> tuple[int, str]:
    """Largest segment first: after compaction most ids are found by the first binary search.

    Which copy of a duplicated id is "first" only has to be stable within one prune (it marks and
    rewrites with one fixed list); readers may use any copy that exists.
    """
    return -seg.count, seg.name


class Index:
    """The union of the segments under ``index/``, re-listed on ``refresh``. Thread-safe."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._segments: tuple[Segment, ...] = ()
        self.bad: dict[str, str] = {}  # segment name -> why it could not be used
        self._bad_stat: dict[str, tuple[int, int, int]] = {}  # retried once the file changes (repair)
        self.vanished = 0  # segments listed but gone when opened: the listing may have missed their merge
        self.refresh()

    def names(self) -> list[str]:
        try:
            files = os.listdir(os.path.join(self.root, INDEX_DIR))
        except FileNotFoundError:
            return []
        return sorted(f[: -len(SUFFIX)] for f in files if f.endswith(SUFFIX))

    def refresh(self) -> None:
        """Pick up segments other processes published and forget removed ones."""
        with self._lock:
            have = {s.name: s for s in self._segments}
            segments = []
            for name in self.names():
                seg = have.get(name)
                if seg is None:
                    try:
                        st = os.stat(segment_path(self.root, name))
                        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
                        if self._bad_stat.get(name) == sig:
                            continue
                        seg = Segment(self.root, name)
                        self.bad.pop(name, None)
                    except FileNotFoundError:
                        self.vanished += 1  # removed by a compaction between listdir and open
                        continue
                    except StoreCorrupt as e:
                        self.bad[name] = e.reason
                        self._bad_stat[name] = sig
                        log.warning("Unusable index segment name=%s reason=%r", name, e.reason)
                        continue
                if seg is not None:
                    segments.append(seg)
            self._segments = tuple(sorted(segments, key=search_order))

    def add(self, name: str) -> None:
        """Start using a segment this process just published."""
        seg = Segment(self.root, name)
        with self._lock:
            self._segments = tuple(sorted((*self._segments, seg), key=search_order))

    def close(self) -> None:
        """Unmap every segment; the index is empty until the next ``refresh``."""
        with self._lock:
            segments, self._segments = self._segments, ()
        for seg in segments:
            seg.close()

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._segments

    def find(self, block_id: bytes) -> tuple[Segment, int] | None:
        for seg in self._segments:
            pos = seg.find(block_id)
            if pos >= 0:
                return seg, pos
        return None

    def find_all(self, block_id: bytes) -> list[Entry]:
        """Every copy of ``block_id`` (usually one; more after concurrent writers stored it twice)."""
        return [seg.entry(pos) for seg in self._segments if (pos := seg.find(block_id)) >= 0]

    def lookup(self, block_id: bytes) -> Entry | None:
        hit = self.find(block_id)
        return None if hit is None else hit[0].entry(hit[1])

    def __len__(self) -> int:
        return sum(s.count for s in self._segments)


def merge(root: str, segments: list[Segment]) -> tuple[str, int]:
    """Write one segment holding every entry of ``segments`` (duplicates kept); returns (name, count)."""
    packs: list[str] = []
    pack_no: dict[str, int] = {}
    for s in segments:
        for p in s.packs:
            if p not in pack_no:
                pack_no[p] = len(packs)
                packs.append(p)

    def rows(seg: Segment) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        for i in range(seg.count):
            bid, off, slen, rlen, pno, flags = seg.raw(i)
            yield bid, off, slen, rlen, pack_no[seg.packs[pno]], flags

    count = sum(s.count for s in segments)
    name = uuid.uuid4().hex
    write_segment(root, name, packs, heapq.merge(*(rows(s) for s in segments)), count)
    return name, count


# Merge segments once there are more than this many: a lookup costs one binary search per segment
# (~1-9 us each, bench/kernels_bench.py), so 16 keeps a dedup lookup well under the ~100 us it takes
# to hash and compress a 256 KiB block.
COMPACT_THRESHOLD = 16


def compaction_plan(segments: tuple[Segment, ...], threshold: int = COMPACT_THRESHOLD) -> list[Segment]:
    """The segments to merge now (empty if few enough). The largest is left alone while it holds most
    entries, so a big store is not rewritten whole each time a few backups add small segments."""
    if len(segments) <= threshold:
        return []
    ordered = sorted(segments, key=lambda s: s.count)
    rest = sum(s.count for s in ordered[:-1])
    return ordered[:-1] if ordered[-1].count > rest else ordered
