# cython: language_level=3
"""Hot-path kernels of Ferry: zero detection, keyed block hashing, sorted-index lookups.

Only ``mover/kernels.py`` imports this module. Every kernel takes typed memoryviews and runs its loop with
the GIL released, so a pool of Python threads keeps both cores busy.
"""

from libc.stdint cimport int64_t, uint8_t
from libc.errno cimport errno
from libc.string cimport memcmp, memset

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    const EVP_MD *EVP_sha256()

cdef extern from "openssl/hmac.h" nogil:
    unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                        const unsigned char *d, size_t n, unsigned char *md, unsigned int *md_len)

DEF ID_SIZE = 32


cdef inline bint _zero(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # Check a 16-byte head by hand, then compare the buffer with itself shifted by 16: glibc's SIMD
    # memcmp stops at the first difference, so non-zero data (the common case) costs almost nothing.
    cdef Py_ssize_t i
    cdef Py_ssize_t head = 16 if n > 16 else n
    for i in range(head):
        if p[i] != 0:
            return False
    if n <= 16:
        return True
    return memcmp(p, p + 16, n - 16) == 0


def is_zero(const unsigned char[::1] data not None) -> bool:
    """True if every byte of ``data`` is zero (an empty buffer is zero)."""
    cdef Py_ssize_t n = data.shape[0]
    cdef bint r = True
    if n == 0:
        return True
    with nogil:
        r = _zero(&data[0], n)
    return r


def zero_flags(const unsigned char[::1] data not None, Py_ssize_t block_size) -> bytearray:
    """One flag per block of ``data`` (1: all zero); the last block may be short."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + block_size - 1) // block_size
    out = bytearray(count)
    cdef unsigned char[::1] flags = out
    cdef Py_ssize_t i, start, length
    if count == 0:
        return out
    with nogil:
        for i in range(count):
            start = i * block_size
            length = block_size if start + block_size <= n else n - start
            flags[i] = _zero(&data[start], length)
    return out


def hmac_sha256_blocks(const unsigned char[::1] key not None, const unsigned char[::1] data not None,
                       Py_ssize_t block_size, const unsigned char[::1] zero=None) -> bytes:
    """HMAC-SHA256 (OpenSSL, SHA-NI where the CPU has it) of each block: ``n * 32`` bytes.

    Where ``zero[i]`` is set the block is not hashed and its id is 32 zero bytes (``ZERO_ID``).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + block_size - 1) // block_size
    if zero is not None and zero.shape[0] < count:
        raise ValueError("zero flags shorter than the number of blocks")
    out = bytearray(count * ID_SIZE)
    cdef unsigned char[::1] ids = out
    cdef const unsigned char *flags = NULL
    cdef const unsigned char *k = NULL
    cdef int key_len = <int>key.shape[0]
    cdef unsigned char empty = 0
    cdef Py_ssize_t i, start, length
    cdef unsigned int md_len = 0
    cdef int failed = 0
    cdef const EVP_MD *md
    if count == 0:
        return bytes(out)
    k = &key[0] if key_len > 0 else &empty
    if zero is not None:
        flags = &zero[0]
    with nogil:
        md = EVP_sha256()
        for i in range(count):
            if flags != NULL and flags[i]:
                memset(&ids[i * ID_SIZE], 0, ID_SIZE)
                continue
            start = i * block_size
            length = block_size if start + block_size <= n else n - start
            if HMAC(md, k, key_len, &data[start], <size_t>length, &ids[i * ID_SIZE], &md_len) == NULL:
                failed = 1
                break
    if failed:
        raise RuntimeError("OpenSSL HMAC failed")
    return bytes(out)


cdef inline Py_ssize_t _bsearch(const unsigned char *base, Py_ssize_t count, Py_ssize_t entry_size,
                                const unsigned char *key) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = count, mid
    cdef int c
    while lo < hi:
        mid = lo + (hi - lo) // 2
        c = memcmp(base + mid * entry_size, key, ID_SIZE)
        if c == 0:
            return mid
        if c < 0:
            lo = mid + 1
        else:
            hi = mid
    return -1


def bsearch(const unsigned char[::1] table not None, Py_ssize_t start, Py_ssize_t count,
            Py_ssize_t entry_size, const unsigned char[::1] key not None) -> int:
    """Position of ``key`` (32 bytes) among ``count`` sorted entries at ``table[start:]``, or -1.

    Each entry is ``entry_size`` bytes and begins with its 32-byte id.
    """
    if key.shape[0] != ID_SIZE:
        raise ValueError("key must be 32 bytes")
    if entry_size < ID_SIZE or start < 0 or count < 0 or start + count * entry_size > table.shape[0]:
        raise ValueError("table bounds")
    cdef Py_ssize_t r = -1
    if count == 0:
        return -1
    with nogil:
        r = _bsearch(&table[start], count, entry_size, &key[0])
    return r


def bsearch_many(const unsigned char[::1] table not None, Py_ssize_t start, Py_ssize_t count,
                 Py_ssize_t entry_size, const unsigned char[::1] keys not None,
                 int64_t[::1] out not None) -> int:
    """``bsearch`` for each 32-byte id in ``keys``: writes positions (-1 if absent) to ``out``.

    Returns how many were found. Used to mark the blocks a manifest references without Python objects.
    """
    if entry_size < ID_SIZE or start < 0 or count < 0 or start + count * entry_size > table.shape[0]:
        raise ValueError("table bounds")
    cdef Py_ssize_t nkeys = keys.shape[0] // ID_SIZE
    if out.shape[0] < nkeys:
        raise ValueError("out too short")
    cdef Py_ssize_t i, found = 0, r
    if nkeys == 0:
        return 0
    if count == 0:
        for i in range(nkeys):
            out[i] = -1
        return 0
    with nogil:
        for i in range(nkeys):
            r = _bsearch(&table[start], count, entry_size, &keys[i * ID_SIZE])
            out[i] = r
            if r >= 0:
                found += 1
    return found


def mark_found(const unsigned char[::1] table not None, Py_ssize_t start, Py_ssize_t count,
               Py_ssize_t entry_size, const unsigned char[::1] keys not None,
               unsigned char[::1] found not None, unsigned char[::1] live=None) -> int:
    """Look up every 32-byte id of ``keys`` whose ``found`` flag is 0 among ``count`` sorted entries.

    A hit sets ``found[i]`` and, if given, ``live[position]``. Returns the number of new hits. Called once
    per index segment in order, it marks each id's first copy, as a lookup does, for a whole manifest
    slice in one GIL-free call (prune's mark phase, save_backup's completeness check).
    """
    if entry_size < ID_SIZE or start < 0 or count < 0 or start + count * entry_size > table.shape[0]:
        raise ValueError("table bounds")
    cdef Py_ssize_t nkeys = keys.shape[0] // ID_SIZE
    if found.shape[0] < nkeys:
        raise ValueError("found too short")
    if live is not None and live.shape[0] < count:
        raise ValueError("live too short")
    cdef unsigned char *lv = NULL
    if live is not None and count > 0:
        lv = &live[0]
    cdef Py_ssize_t i, r, hits = 0
    if nkeys == 0 or count == 0:
        return 0
    with nogil:
        for i in range(nkeys):
            if found[i]:
                continue
            r = _bsearch(&table[start], count, entry_size, &keys[i * ID_SIZE])
            if r >= 0:
                found[i] = 1
                hits += 1
                if lv != NULL:
                    lv[r] = 1
    return hits


# --- restore: batched zstd decompression into one buffer ----------------------------------------------

cdef extern from "zstd.h" nogil:
    ctypedef struct ZSTD_DCtx:
        pass
    ZSTD_DCtx *ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx)
    size_t ZSTD_decompressDCtx(ZSTD_DCtx *dctx, void *dst, size_t dst_cap, const void *src, size_t src_size)
    unsigned ZSTD_isError(size_t code)

from libc.string cimport memcpy

DEF PLAN_COLS = 5  # src_off, src_len, dst_off, raw_len, flags
DEF FLAG_ZSTD = 1


cdef class DCtx:
    """A libzstd decompression context, kept by a thread across ``unpack_records`` calls (its window
    buffers are allocated once, not per batch). Not for two threads at once."""
    cdef ZSTD_DCtx *ctx
    cdef bint busy

    def __cinit__(self):
        self.ctx = ZSTD_createDCtx()
        if self.ctx == NULL:
            raise MemoryError("ZSTD_createDCtx")

    def __dealloc__(self):
        if self.ctx != NULL:
            ZSTD_freeDCtx(self.ctx)


def unpack_records(const unsigned char[::1] src not None, const int64_t[::1] plan not None,
                   unsigned char[::1] dst not None, DCtx context=None) -> int:
    """Decompress (flag bit 0) or copy each planned record of ``src`` into its place in ``dst``.

    ``plan`` holds 5 int64 per record: offset and length of its stored bytes in ``src``, offset and raw
    length in ``dst``, flags. Returns -1 when every record yields exactly its raw length, else the index of
    the first that does not (bad frame, wrong length): the caller re-reads that block the slow way. One
    GIL-free call per batch, with the frames decoded straight into ``dst`` (no per-block allocation);
    ``context``: a ``DCtx`` to reuse (one is made for the call if none).
    """
    cdef Py_ssize_t n = plan.shape[0] // PLAN_COLS
    cdef Py_ssize_t i, bad = -1
    cdef int64_t so, sl, do, rl, fl
    cdef size_t r
    cdef ZSTD_DCtx *dctx
    if plan.shape[0] % PLAN_COLS:
        raise ValueError("plan length is not a multiple of 5")
    for i in range(n):  # bounds first, under the GIL, so the loop below cannot touch memory it must not
        so = plan[i * PLAN_COLS]
        sl = plan[i * PLAN_COLS + 1]
        do = plan[i * PLAN_COLS + 2]
        rl = plan[i * PLAN_COLS + 3]
        if so < 0 or sl < 0 or so + sl > src.shape[0] or do < 0 or rl < 0 or do + rl > dst.shape[0]:
            raise ValueError("plan out of bounds")
    if n == 0:
        return -1
    if context is None:
        context = DCtx()
    if context.busy:
        raise RuntimeError("DCtx used by two threads at once")
    context.busy = True
    dctx = context.ctx
    with nogil:
        for i in range(n):
            so = plan[i * PLAN_COLS]
            sl = plan[i * PLAN_COLS + 1]
            do = plan[i * PLAN_COLS + 2]
            rl = plan[i * PLAN_COLS + 3]
            fl = plan[i * PLAN_COLS + 4]
            if fl & FLAG_ZSTD:
                if rl == 0:
                    r = ZSTD_decompressDCtx(dctx, NULL, 0, &src[so] if sl else NULL, <size_t>sl)
                else:
                    r = ZSTD_decompressDCtx(dctx, &dst[do], <size_t>rl, &src[so] if sl else NULL, <size_t>sl)
                if ZSTD_isError(r) or r != <size_t>rl:
                    bad = i
                    break
            else:
                if sl != rl:
                    bad = i
                    break
                if rl:
                    memcpy(&dst[do], &src[so], <size_t>rl)
    context.busy = False
    return bad


# --- early write-back of pack data ---------------------------------------------------------------------

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE


def start_writeback(int fd, long long offset, long long nbytes) -> int:
    """Start writing ``[offset, offset + nbytes)`` of ``fd`` to disk without waiting (``sync_file_range``).

    A pack is fsynced when it is full; without this its 128 MiB sit dirty until then, and the last pack's
    fsync is a wait at the end of every backup. Returns 0, or the errno (the caller's fsync still decides).
    """
    cdef int r
    with nogil:
        r = sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
        if r != 0:
            r = errno
    return r
