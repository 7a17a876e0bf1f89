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
        self.closed = False

    def _compressor(self) -> zstandard.ZstdCompressor:
        # a ZstdCompressor must not be used by two threads at once: one per thread
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.store.config.zstd_level)
        return c

    def add(self, block_id: bytes, data: bytes | memoryview) -> int:
        """Store ``data`` under ``block_id`` unless the store has it; returns the bytes written (0 if not)."""
        if self.closed:
            raise ValueError("writer is closed")
        if block_id == ZERO_ID or block_id in self._pending or self.store.has(block_id):
            return 0
        raw_len = len(data)
        stored: bytes | memoryview = self._compressor().compress(data)
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
        """Make every block added so far durable and visible to every process."""
        with self._lock:
            self._finish()

    def abort(self) -> None:
        """Drop the blocks not yet committed."""
        with self._lock:
            self._drop()
            self.closed = True
