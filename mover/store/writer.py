"""The block writer: dedup against the index, compress, append to this writer's own packs, publish.

Each writer owns its packs (random names), so any number of threads and processes write one store at once
without coordination: a pack becomes visible only when it is durable and its index segment is published.
Two writers storing the same new block at once both keep it; prune drops the extra copy later.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import zstandard

from mover import kernels
from mover.errors import StoreError, StoreLocked
from mover.store import fsutil, index, lock, pack
from mover.store.api import ZERO_ID

if TYPE_CHECKING:
    from mover.store.repo import Store

log = logging.getLogger(__name__)

# Full packs being fsynced and published in the background at once (beyond the one being filled).
MAX_PUBLISHING = 2
# Every this many bytes appended to a pack, its new data is handed to the disk (``sync_file_range``), so the
# pack's fsync, and above all the last one at commit, finds little left to write.
WRITEBACK_EVERY = 8 * 1024 * 1024


class _PackWriter(pack.PackWriter):
    """A pack writer whose records come with their header already built (by the calling thread).

    One thread at a time appends to it (the writer hands out open packs one per caller); ``lock`` is only
    there so that ``Writer.abort`` never closes a pack under an append another thread has not finished.
    """

    _written_back = 0  # bytes of the pack already handed to the disk

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.lock = threading.Lock()

    def append_built(self, head: bytes, block_id: bytes, stored: bytes | bytearray | memoryview, raw_len: int,
                     flags: int) -> pack.Record:
        """``append`` with ``head`` = ``pack.RECORD`` of this record (checksum included), made by the caller;
        the pack's new data goes to the disk every ``WRITEBACK_EVERY`` bytes."""
        rec = self.append_record(head, block_id, stored, raw_len, flags)
        if self.size - self._written_back >= WRITEBACK_EVERY and self._fd is not None:
            # Advisory and non-blocking: an error here shows at the fsync.
            kernels.start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size
        return rec


class Writer:
    """``mover.store.api.BlockWriter`` for one store. Thread-safe.

    Compression, the record checksum and the append run in the calling thread, on an open pack no other
    thread is appending to: a free one, or a new one when all are in use (so workers never wait for each
    other's writes, and a backup whose workers seldom meet, such as a small incremental, fills one pack).
    The writer's lock only guards the bookkeeping.
    A full pack is fsynced and published by a background thread, so its worker goes on with a new pack
    meanwhile; ``commit`` publishes the open packs and waits for every publish.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # signalled when a publish in flight ends
        self._open: list[_PackWriter] = []  # unpublished packs, in use or free
        self._free: list[_PackWriter] = []  # open packs no thread is appending to (last used first)
        # ids appended but not yet visible in the index -> their pack: bounded by the open packs (one per
        # worker at most) and the MAX_PUBLISHING + 1 packs being published
        self._pending: dict[bytes, str] = {}
        self._publishing = 0
        self._error: BaseException | None = None  # a failed publish fails the commit
        self._local = threading.local()
        self.packs_written = 0
        self._segments: list[str] = []  # published by this writer since its last commit
        self._holding = False  # holds the shared store lock: from its first block to commit or abort
        self.closed = False

    def _compressor(self) -> zstandard.ZstdCompressor:
        # a ZstdCompressor must not be used by two threads at once: one per thread
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.store.config.zstd_level)
        return c

    def _hold(self) -> None:
        if not self._holding:
            with self._lock:
                if not self._holding:
                    self.store.hold()  # before the dedup lookup: prune must not drop what we rely on
                    self._holding = True

    def known(self, ids: bytes | bytearray | memoryview) -> bytearray:
        """One flag per 32-byte id of ``ids``: 1 if the store has it (or it is ``ZERO_ID``).

        One GIL-free pass per index segment for a whole batch, instead of one lookup per ``add``: pass
        ``looked_up=True`` to ``add`` for the ids found missing here (blocks this writer has not published
        yet are still caught by ``add``).
        """
        self._hold()
        return self.store.has_many(ids)

    def add(self, block_id: bytes, data: bytes | bytearray | memoryview, looked_up: bool = False) -> int:
        """Store ``data`` under ``block_id`` unless the store has it; returns the bytes written (0 if not).

        ``looked_up``: the caller found ``block_id`` missing with ``known`` (skip the index lookup).
        """
        if self.closed:
            raise ValueError("writer is closed")
        if block_id == ZERO_ID or block_id in self._pending:
            return 0
        self._hold()
        if not looked_up and self.store.has(block_id):
            return 0
        raw_len = len(data)
        stored: bytes | bytearray | memoryview = self._compressor().compress(data)
        flags = pack.FLAG_ZSTD
        if len(stored) >= raw_len:
            stored, flags = data, 0  # incompressible: keep it raw and skip decompression on restore
        # The record header and its checksum (a pass over the stored bytes) are built here, and the append
        # below runs on a pack no other thread uses: the writer's lock covers only the bookkeeping.
        head = pack.RECORD.pack(block_id, len(stored), raw_len, flags, pack.checksum(stored))
        with self._lock:
            if self._error is not None:
                raise self._error
            if block_id in self._pending:
                return 0
            if self._free:
                p = self._free.pop()
            else:
                p = _PackWriter(self.store.path)
                self._open.append(p)
            # Claimed before the append, so another worker with the same block skips it meanwhile.
            self._pending[block_id] = p.name
        try:
            with p.lock:
                if self.closed:
                    raise ValueError("writer is closed")
                p.append_built(head, block_id, stored, raw_len, flags)
        except BaseException as e:
            with self._lock:
                # Another worker may have counted this block as stored: nothing of this writer may be
                # committed now, so the error sticks (the next add and the commit raise it).
                self._error = self._error or e
                if self._pending.get(block_id) == p.name:
                    del self._pending[block_id]
                self._drop(p)
            raise
        full = False
        with self._lock:
            if p in self._open:  # else dropped by an abort meanwhile
                if p.size >= self.store.config.pack_size:
                    self._open.remove(p)
                    self._publishing += 1
                    full = True
                else:
                    self._free.append(p)
        if full:
            self._publish_async(p)
        return pack.RECORD.size + len(stored)

    def _publish_async(self, p: pack.PackWriter) -> None:
        """Publish a full pack in a thread of its own, so the workers go on compressing meanwhile.

        Publishing is mostly the pack's fsync (128 MiB at this machine's ~280 MB/s: ~0.5 s); done by the
        worker that filled the pack, it left one of two cores idle for that long per pack (a 6 GiB image
        backed up in 9.0 s to disk against 7.3 s to tmpfs). At most ``MAX_PUBLISHING`` packs are in flight:
        a worker that fills one more waits, which bounds the ids kept in ``_pending``.
        """
        with self._lock:
            while self._publishing > MAX_PUBLISHING and self._error is None:
                self._idle.wait()
        t = threading.Thread(target=self._publish_quietly, args=(p,), name=f"publish-{p.name[:8]}", daemon=True)
        t.start()

    def _publish_quietly(self, p: pack.PackWriter) -> None:
        try:
            self._publish(p)
        except BaseException as e:  # recorded in _error: the next add or the commit raises it
            log.debug("Publish failed pack=%s error=%r", p.name, e)

    def _publish(self, p: pack.PackWriter) -> None:
        """fsync and rename pack ``p``, publish its segment (caller counted it in ``_publishing``)."""
        try:
            final = p.finish()
            try:
                index.write_pack_segment(self.store.path, p.name, p.records)
            except BaseException:
                fsutil.remove(final)  # a pack without its segment would only be garbage
                raise
            self.store.index.add(p.name)
        except BaseException as e:
            p.discard()
            with self._lock:
                self._forget(p)
                self._error = self._error or e
                self._publishing -= 1
                self._idle.notify_all()
            raise
        with self._lock:
            self._forget(p)  # now found through the index
            self._segments.append(p.name)
            self.packs_written += 1
            self._publishing -= 1
            self._idle.notify_all()
        log.debug("Published pack name=%s blocks=%d bytes=%d", p.name, len(p.records), p.size)

    def _forget(self, p: pack.PackWriter) -> None:
        for r in p.records:
            if self._pending.get(r.id) == p.name:
                del self._pending[r.id]

    def _drop(self, which: _PackWriter | None = None) -> None:
        """Forget open pack ``which``, or every open pack (caller holds the lock): none was published."""
        for p in list(self._open):
            if which is None or p is which:
                with p.lock:  # an append in another thread ends first: its fd is closed after
                    p.discard()
                self._forget(p)
                self._open.remove(p)
                if p in self._free:
                    self._free.remove(p)

    def commit(self) -> None:
        """Make every block added so far durable and visible to every process.

        The per-pack segments of this writer are then merged into one, so lookups stay one binary search
        per backup rather than one per pack (prune merges what remains across backups).
        """
        with self._lock:
            last = self._open[:]
            self._open.clear()
            self._free.clear()
            self._publishing += len(last)
        for p in last:
            try:
                self._publish(p)
            except BaseException:  # recorded in _error, raised below once nothing is in flight
                pass
        with self._lock:
            while self._publishing:
                self._idle.wait()
            if self._error is not None:
                raise self._error
            if len(self._segments) > 1:
                self._merge_own()
            self._segments.clear()
            self._compact()
            self._unhold()

    def _merge_own(self) -> None:
        root = self.store.path
        names = set(self._segments)
        segs = [s for s in self.store.index.segments if s.name in names]
        try:
            name, _ = index.merge(root, segs)
        except StoreError as e:
            # the per-pack segments are valid on their own: merging is an optimization, not durability
            log.warning("Cannot merge segments count=%d reason=%r", len(segs), e.reason)
            return
        self.store.index.add(name)
        for s in segs:
            fsutil.remove(s.path)  # readers that mapped it keep their map; the merged copy is published
        self.store.index.refresh()

    def _compact(self) -> None:
        """Merge the store's segments when there are too many (see ``index.compaction_plan``).

        Safe beside other writers and readers: the merged segment is published before its parts are
        removed, readers that mapped a part keep it, and an id listed twice meanwhile is harmless. A
        compaction another process runs makes this one skip (``locks/compact``, taken without waiting).
        """
        plan = index.compaction_plan(self.store.index.segments)
        if not plan:
            return
        compact_lock = lock.FileLock(self.store.path, lock.COMPACT_LOCK)
        try:
            compact_lock.acquire(exclusive=True, timeout=0.0)
        except StoreLocked:
            return
        try:
            self.store.index.refresh()
            plan = index.compaction_plan(self.store.index.segments)
            if not plan:
                return
            name, count = index.merge(self.store.path, plan)
            self.store.index.add(name)
            for s in plan:
                fsutil.remove(s.path)
            self.store.index.refresh()
            log.info("Compacted index segments=%d entries=%d into=%s", len(plan), count, name)
        except StoreError as e:
            log.warning("Cannot compact the index reason=%r", e.reason)
        finally:
            compact_lock.release()

    def _unhold(self) -> None:
        if self._holding:
            self._holding = False
            self.store.unhold()

    def abort(self) -> None:
        """Drop the blocks not yet committed (packs another thread is publishing become prune's garbage)."""
        with self._lock:
            # Closed first: an add that checked out a pack before this sees it under the pack's lock once
            # _drop has discarded the pack, and stops there.
            self.closed = True
            self._drop()
            # Background publishes finish first: a pack published after the shared lock is gone could be
            # taken by a concurrent prune for an unindexed leftover just before its segment appears.
            while self._publishing:
                self._idle.wait()
            self._unhold()
