"""The one door to the Cython kernels (``mover._kernels``), with a plain-Python reference of each.

The references define what each kernel must compute; property tests compare the two. Block ids come from
one of the keyed hash algorithms named in a store's config (``HASH_ALGORITHMS``): the choice and the
measurements behind it are in ``docs/store-format.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
from collections.abc import Callable

import blake3

from mover import _kernels  # type: ignore[attr-defined]

ID_SIZE = 32
ZERO_ID = b"\0" * ID_SIZE

Buffer = bytes | bytearray | memoryview | mmap.mmap


def _u8(data: Buffer) -> memoryview:
    """A contiguous unsigned-byte view (the kernels take ``const unsigned char[::1]``)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


# --- zero detection -----------------------------------------------------------------------------------


def is_zero(data: Buffer) -> bool:
    """True if every byte of ``data`` is zero (GIL released)."""
    return bool(_kernels.is_zero(_u8(data)))


def zero_flags(data: Buffer, block_size: int) -> bytearray:
    """One flag per ``block_size`` block of ``data`` (1 = all zero); the last block may be short."""
    return _kernels.zero_flags(_u8(data), block_size)  # type: ignore[no-any-return]


def ref_is_zero(data: Buffer) -> bool:
    """Reference of ``is_zero``."""
    return bytes(data).count(0) == len(data)


def ref_zero_flags(data: Buffer, block_size: int) -> bytearray:
    """Reference of ``zero_flags``."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    raw = bytes(data)
    return bytearray(int(ref_is_zero(raw[i : i + block_size])) for i in range(0, len(raw), block_size))


# --- keyed block ids ----------------------------------------------------------------------------------


def hmac_sha256_blocks(key: bytes, data: Buffer, block_size: int, zero: Buffer | None = None) -> bytes:
    """HMAC-SHA256 of each block, ``ZERO_ID`` where ``zero[i]`` is set; one GIL-free call for the batch."""
    return _kernels.hmac_sha256_blocks(  # type: ignore[no-any-return]
        _u8(key), _u8(data), block_size, None if zero is None else _u8(zero)
    )


def blake3_blocks(key: bytes, data: Buffer, block_size: int, zero: Buffer | None = None) -> bytes:
    """Keyed BLAKE3 (256-bit output) of each block, ``ZERO_ID`` where ``zero[i]`` is set.

    The ``blake3`` package hashes with AVX2 and releases the GIL itself while it hashes; what stays under
    the GIL is one call per block (about a microsecond, next to ~80 us of hashing for 256 KiB).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    mv = _u8(data)
    n = len(mv)
    out = bytearray()
    flags = None if zero is None else _u8(zero)
    for i, start in enumerate(range(0, n, block_size)):
        if flags is not None and flags[i]:
            out += ZERO_ID
        else:
            out += blake3.blake3(mv[start : start + block_size], key=key).digest()
    return bytes(out)


def ref_block_ids(algorithm: str, key: bytes, data: Buffer, block_size: int, zero: Buffer | None = None) -> bytes:
    """Reference of the block-id kernels, on ``hashlib``/``hmac`` and one ``blake3`` call per block."""
    raw = bytes(data)
    out = b""
    for i, start in enumerate(range(0, len(raw), block_size)):
        block = raw[start : start + block_size]
        if zero is not None and zero[i]:
            out += ZERO_ID
        elif algorithm == "hmac-sha256":
            out += hmac.new(key, block, hashlib.sha256).digest()
        elif algorithm == "blake3-keyed":
            out += blake3.blake3(block, key=key).digest()
        else:
            raise ValueError(f"unknown hash algorithm {algorithm!r}")
    return out


BlockHasher = Callable[[bytes, Buffer, int, "Buffer | None"], bytes]

# name in the store config -> batch kernel; a new algorithm needs a new name (the format records it)
HASH_ALGORITHMS: dict[str, BlockHasher] = {
    "hmac-sha256": hmac_sha256_blocks,
    "blake3-keyed": blake3_blocks,
}

KEY_SIZES = {"hmac-sha256": 32, "blake3-keyed": 32}  # blake3's keyed mode takes exactly 32 bytes


def block_ids(algorithm: str, key: bytes, data: Buffer, block_size: int, zero: Buffer | None = None) -> bytes:
    """Ids (``n * 32`` bytes) of the blocks of ``data`` under ``algorithm``; ``ZERO_ID`` where flagged."""
    try:
        kernel = HASH_ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unknown hash algorithm {algorithm!r}") from None
    return kernel(key, data, block_size, zero)


# --- sorted index lookups -----------------------------------------------------------------------------


def bsearch(table: Buffer, start: int, count: int, entry_size: int, key: bytes) -> int:
    """Position of the 32-byte ``key`` among ``count`` sorted entries at ``table[start:]``, or -1."""
    return _kernels.bsearch(_u8(table), start, count, entry_size, _u8(key))  # type: ignore[no-any-return]


def bsearch_many(table: Buffer, start: int, count: int, entry_size: int, keys: Buffer, out: memoryview) -> int:
    """``bsearch`` of every 32-byte id in ``keys``; positions into ``out`` (int64); returns the number found."""
    return _kernels.bsearch_many(  # type: ignore[no-any-return]
        _u8(table), start, count, entry_size, _u8(keys), out
    )


def mark_found(table: Buffer, start: int, count: int, entry_size: int, keys: Buffer, found: bytearray,
               live: bytearray | None = None) -> int:
    """For each id of ``keys`` not yet ``found``, look it up; on a hit set ``found[i]`` and ``live[pos]``.

    Returns the number of new hits (one GIL-free call per segment for a whole slice of a manifest).
    """
    return _kernels.mark_found(  # type: ignore[no-any-return]
        _u8(table), start, count, entry_size, _u8(keys), found, live
    )


def ref_mark_found(table: Buffer, start: int, count: int, entry_size: int, keys: Buffer, found: bytearray,
                   live: bytearray | None = None) -> int:
    """Reference of ``mark_found``."""
    raw = bytes(keys)
    hits = 0
    for i in range(len(raw) // ID_SIZE):
        if found[i]:
            continue
        pos = ref_bsearch(table, start, count, entry_size, raw[i * ID_SIZE : (i + 1) * ID_SIZE])
        if pos >= 0:
            found[i] = 1
            hits += 1
            if live is not None:
                live[pos] = 1
    return hits


def ref_bsearch(table: Buffer, start: int, count: int, entry_size: int, key: bytes) -> int:
    """Reference of ``bsearch`` (any matching position is a right answer when ids repeat)."""
    raw = bytes(table)
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        cur = raw[start + mid * entry_size : start + mid * entry_size + ID_SIZE]
        if cur == key:
            return mid
        if cur < key:
            lo = mid + 1
        else:
            hi = mid
    return -1


# --- restore: batched decompression -------------------------------------------------------------------

PLAN_COLS = 5  # per record: src offset, src length, dst offset, raw length, flags (bit 0: zstd)


def new_dctx() -> object:
    """A zstd decompression context for one thread's ``unpack_records`` calls."""
    return _kernels.DCtx()


def unpack_records(src: Buffer, plan: memoryview, dst: bytearray | memoryview, context: object = None) -> int:
    """Decompress (flag bit 0) or copy each record of ``plan`` (int64 rows of ``PLAN_COLS``) from ``src``
    into ``dst``; -1 if every record gives exactly its raw length, else the index of the first that does not.

    libzstd, one GIL-free call per batch, frames decoded in place (no allocation per block); ``context``
    from ``new_dctx`` keeps the decoder's buffers from call to call (one per thread).
    """
    return _kernels.unpack_records(_u8(src), plan, _u8(dst), context)  # type: ignore[no-any-return]


def ref_unpack_records(src: Buffer, plan: memoryview, dst: bytearray | memoryview) -> int:
    """Reference of ``unpack_records`` (python-zstandard, one record at a time)."""
    import zstandard

    raw = bytes(src)
    rows = plan.tolist()
    out = _u8(dst)
    for i in range(len(rows) // PLAN_COLS):
        so, sl, do, rl, fl = rows[i * PLAN_COLS : (i + 1) * PLAN_COLS]
        if so < 0 or sl < 0 or so + sl > len(raw) or do < 0 or rl < 0 or do + rl > len(out):
            raise ValueError("plan out of bounds")
    for i in range(len(rows) // PLAN_COLS):
        so, sl, do, rl, fl = rows[i * PLAN_COLS : (i + 1) * PLAN_COLS]
        stored = raw[so : so + sl]
        if fl & 1:
            try:
                data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=rl)
            except (zstandard.ZstdError, MemoryError):  # a damaged header may claim an absurd content size
                return i
        else:
            data = stored
        if len(data) != rl:
            return i
        out[do : do + rl] = data
    return -1


# --- early write-back ---------------------------------------------------------------------------------


def start_writeback(fd: int, offset: int, nbytes: int) -> int:
    """Start writing a range of ``fd`` to disk without waiting; 0 or the errno (advisory: fsync decides)."""
    return _kernels.start_writeback(fd, offset, nbytes)  # type: ignore[no-any-return]
