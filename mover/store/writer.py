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

from mover.errors import StoreError
from mover.store import fsutil, index, pack
from mover.store.api import ZERO_ID

if TYPE_CHECKING:
    from mover.store.repo import Store

log = logging.getLogger(__name__)


class Writer:
    """``mover.store.api.BlockWriter`` for one store. Thread-safe: compression runs in the calling thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._pack: pack.PackWriter | None = None
        self._pending: set[bytes] = set()  # ids in the open pack: bounded by pack_size / block size
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

    def add(self, block_id: bytes, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` under ``block_id`` unless the store has it; returns the bytes written (0 if not)."""
        if self.closed:
            raise ValueError("writer is closed")
        if block_id == ZERO_ID or block_id in self._pending:
            return 0
        if not self._holding:
            with self._lock:
                if not self._holding:
                    self.store.hold()  # before the dedup lookup: prune must not drop what we rely on
                    self._holding = True
        if self.store.has(block_id):
            return 0
        raw_len = len(data)
        stored: bytes | bytearray | memoryview = self._compressor().compress(data)
        flags = pack.FLAG_ZSTD
        if len(stored) >= raw_len:
            stored, flags = data, 0  # incompressible: keep it raw and skip decompression on restore
        with self._lock:
            if block_id in self._pending:
                return 0
            if self._pack is None:
                self._pack = pack.PackWriter(self.store.path)
            try:
                self._pack.append(block_id, stored, raw_len, flags)
            except BaseException:
                self._drop()
                raise
            self._pending.add(block_id)
            if self._pack.size >= self.store.config.pack_size:
                self._finish()
        return pack.RECORD.size + len(stored)

    def _finish(self) -> None:
        """Finish the open pack: fsync, rename, publish its segment (caller holds the lock)."""
        p = self._pack
        if p is None:
            return
        try:
            final = p.finish()
            try:
                index.write_pack_segment(self.store.path, p.name, p.records)
            except BaseException:
                fsutil.remove(final)  # a pack without its segment would only be garbage
                raise
        except BaseException:
            self._drop()
            raise
        self._pack = None
        self.store.index.add(p.name)
        self._segments.append(p.name)
        self._pending.clear()
        self.packs_written += 1
        log.debug("Published pack name=%s blocks=%d bytes=%d", p.name, len(p.records), p.size)

    def _drop(self) -> None:
        """Forget the open pack after a failure: nothing of it was published, nothing else is lost."""
        if self._pack is not None:
            self._pack.discard()
            self._pack = None
        self._pending.clear()

    def commit(self) -> None:
        """Make every block added so far durable and visible to every process.

        The per-pack segments of this writer are then merged into one, so lookups stay one binary search
        per backup rather than one per pack (prune merges what remains across backups).
        """
        with self._lock:
            self._finish()
            if len(self._segments) > 1:
                self._merge_own()
            self._segments.clear()
            self._unhold()

    def _unhold(self) -> None:
        if self._holding:
            self._holding = False
            self.store.unhold()

    def _merge_own(self) -> None:
        root = self.store.path
        segs = [s for s in self.store.index.segments if s.name in set(self._segments)]
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

    def abort(self) -> None:
        """Drop the blocks not yet committed."""
        with self._lock:
            self._drop()
            self.closed = True
            self._unhold()
