"""The backup pipeline: read -> zero-check -> hash -> dedup -> compress -> store, on threads.

Shape: one planner thread turns the source's extents into runs of blocks to read (blocks wholly in holes
become zero entries without a read); reader threads (several readers of the source) fill buffers taken from
a fixed pool; worker threads zero-check and hash a whole buffer in one GIL-free call, drop blocks whose id
equals the base manifest's at the same offset or that the store already has, and hand new ones to the
store's writer (which compresses in the worker). Memory is bounded by the pool: ``readers + workers + 1``
buffers of ``CHUNK`` bytes, whatever the size of the disk.

The pipeline is a library: no printing, no argument parsing. Progress goes to a ``Progress``; a
``cancel`` event stops it; any failure aborts the writer so nothing half-written is published.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mover.crew import Crew
from mover.errors import FerryError, SourceError, StoreError, StoreFull, UsageError
from mover.kernels import ZERO_ID, zero_flags
from mover.progress import Progress
from mover.sources.base import Extent, Source
from mover.store.api import BackupInfo, BlockWriter, Manifest, StoreAPI

log = logging.getLogger(__name__)

# Bytes per read and per hash batch: large enough that per-call overhead (a preadv, a GIL round trip per
# kernel) is noise, small enough that the whole pool stays a few tens of MiB.
CHUNK = 4 * 1024 * 1024

def default_workers() -> int:
    """One worker per core: hashing and zstd release the GIL, so workers scale with cores."""
    return max(1, os.cpu_count() or 1)


def store_error(store: StoreAPI, e: OSError) -> FerryError:
    """An OS error from the store as a one-line Ferry error (ENOSPC is StoreFull, retryable)."""
    if e.errno == errno.ENOSPC:
        return StoreFull(e.strerror or "ENOSPC", path=store.path)
    return StoreError(e.strerror or str(e), path=store.path)


def close_manifest(manifest: Manifest) -> None:
    """Release a manifest's mapping now (the store's manifests are mmapped), not at garbage collection."""
    close = getattr(manifest, "close", None)
    if close is not None:
        close()


# Entries set per call when zeroing a run: 2 MiB of ids, so a huge hole costs neither time nor memory.
_ZERO_RUN = 65536


def set_zero(manifest: Manifest, first: int, end: int) -> None:
    """Set entries [first, end) to ``ZERO_ID``, in bulk where the manifest offers ``set_range``."""
    set_range = getattr(manifest, "set_range", None)
    if set_range is None:
        for i in range(first, end):
            manifest[i] = ZERO_ID
        return
    for i in range(first, end, _ZERO_RUN):
        n = min(_ZERO_RUN, end - i)
        set_range(i, ZERO_ID * n)


def _touched(extents: Iterator[Extent], bs: int, want: Callable[[Extent], bool]) -> Iterator[tuple[int, int]]:
    """Runs (first, end) of block indices touched by the extents for which ``want`` is true."""
    run_first = run_end = -1
    for e in extents:
        if e.length == 0 or not want(e):
            continue
        first, end = e.start // bs, (e.end + bs - 1) // bs
        if first <= run_end:  # overlaps or continues the current run (blocks shared by two extents)
            run_end = max(run_end, end)
            continue
        if run_end > run_first:
            yield run_first, run_end
        run_first, run_end = first, end
    if run_end > run_first:
        yield run_first, run_end


# Byte ranges [lo, hi) inside one block, relative to the block's start.
Parts = list[tuple[int, int]]


def _dirty_runs(extents: Iterator[Extent], bs: int, size: int) -> Iterator[tuple[int, int, dict[int, Parts]]]:
    """Runs (first, end) of blocks touched by dirty extents, each with its partly dirty blocks.

    The third item maps a block index to the dirty ranges inside it, for the blocks of the run that dirty
    extents do not cover whole (the rest of such a block is unchanged and comes from the base). Only the
    first and last block of an extent can be partial, so the map stays as small as the extent list.
    """
    run_first = run_end = -1
    edges: dict[int, Parts] = {}
    for e in extents:
        if e.length == 0 or not e.dirty:
            continue
        first, end = e.start // bs, (e.end + bs - 1) // bs
        if first > run_end:
            if run_end > run_first:
                yield run_first, run_end, _partial(edges, bs, size)
            run_first, run_end, edges = first, end, {}
        else:  # continues the run (a block shared with the previous dirty extent, or the next block)
            run_end = max(run_end, end)
        for idx in {first, end - 1}:
            base = idx * bs
            edges.setdefault(idx, []).append((max(e.start, base) - base, min(e.end, base + bs) - base))
    if run_end > run_first:
        yield run_first, run_end, _partial(edges, bs, size)


def _partial(edges: dict[int, Parts], bs: int, size: int) -> dict[int, Parts]:
    """The blocks of ``edges`` whose dirty ranges (merged) leave part of the block clean."""
    out: dict[int, Parts] = {}
    for idx, parts in edges.items():
        blen = min(bs, size - idx * bs)
        merged: Parts = []
        for lo, hi in sorted(parts):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        if merged != [(0, blen)]:
            out[idx] = merged
    return out


def _clean(parts: Parts, blen: int) -> Parts:
    """The complement of sorted, merged ``parts`` in [0, blen)."""
    out: Parts = []
    pos = 0
    for lo, hi in parts:
        if lo > pos:
            out.append((pos, lo))
        pos = hi
    if pos < blen:
        out.append((pos, blen))
    return out


class _Backup:
    """One backup run; see module docstring."""

    def __init__(
        self,
        store: StoreAPI,
        source: Source,
        manifest: Manifest,
        writer: BlockWriter,
        progress: Progress,
        have_base: bool,
        changed: bool,
        readers: int,
        workers: int,
        crew: Crew,
    ) -> None:
        self.store = store
        self.source = source
        self.manifest = manifest
        self.writer = writer
        self.progress = progress
        self.have_base = have_base
        self.changed = changed
        self.bs = store.block_size
        self.size = source.size
        self.nblocks = len(manifest)
        self.chunk_blocks = max(1, CHUNK // self.bs)
        self.readers = readers
        self.workers = workers
        self.crew = crew
        self.tasks: queue.Queue[tuple[int, int, dict[int, Parts]] | None] = queue.Queue(maxsize=readers * 2)
        self.filled: queue.Queue[tuple[int, int, dict[int, Parts], mmap.mmap] | None] = queue.Queue()
        # mmap gives page-aligned buffers, which O_DIRECT readers need; they are reused for the whole run.
        self.pool: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(readers + workers + 1):
            self.pool.put(mmap.mmap(-1, self.chunk_blocks * self.bs))
        self._readers_left = readers
        self._lock = threading.Lock()

    def _span(self, first: int, end: int) -> tuple[int, int]:
        """(offset, length) of blocks [first, end), clipped to the source size (the last block is short)."""
        start = first * self.bs
        return start, min(end * self.bs, self.size) - start

    def run(self) -> None:
        crew = self.crew
        crew.spawn("backup-plan", self.plan)
        for i in range(self.readers):
            crew.spawn(f"backup-read-{i}", self.read)
        for i in range(self.workers):
            crew.spawn(f"backup-work-{i}", self.work)
        crew.join()
        # The buffers are left to the garbage collector: a failed thread's traceback may still hold a view
        # of one, and closing an mmap with views exported raises.

    def plan(self) -> None:
        """Queue the runs of blocks to read; set zero entries for untouched blocks of a full read."""
        runs: Iterator[tuple[int, int, dict[int, Parts]]]
        if self.changed:
            runs = _dirty_runs(self.source.extents("dirty"), self.bs, self.size)
        else:
            runs = ((f, e, {}) for f, e in _touched(self.source.extents("zero"), self.bs, lambda e: not e.zero))
        pos = 0
        for first, end, partial in runs:
            self._skip(pos, first)
            keys = sorted(partial)
            k = 0
            for f in range(first, end, self.chunk_blocks):
                e = min(f + self.chunk_blocks, end)
                parts: dict[int, Parts] = {}
                while k < len(keys) and keys[k] < e:
                    parts[keys[k]] = partial[keys[k]]
                    k += 1
                self.crew.put(self.tasks, (f, e, parts))
            pos = end
        self._skip(pos, self.nblocks)
        for _ in range(self.readers):
            self.crew.put(self.tasks, None)

    def _skip(self, first: int, end: int) -> None:
        """Blocks not read: zeros on a full read (holes), the base's entries with ``--changed``."""
        if end <= first:
            return
        _, length = self._span(first, end)
        if self.changed:
            self.progress.add(done=length, unchanged=length)
            return
        if self.have_base:  # a new manifest is all zero already; a copy of the base is not
            set_zero(self.manifest, first, end)
        self.progress.add(done=length, zero=length)

    def read(self) -> None:
        reader = self.source.reader()
        try:
            while True:
                task = self.crew.get(self.tasks)
                if task is None:
                    break
                first, end, parts = task
                offset, length = self._span(first, end)
                buf = self.crew.get(self.pool)
                try:
                    n = reader.readinto(offset, memoryview(buf)[:length])
                except BaseException:
                    self.pool.put(buf)
                    raise
                if n != length:
                    self.pool.put(buf)
                    raise _source_shrank(self.source, offset + n)
                self.crew.put(self.filled, (first, end, parts, buf))
        finally:
            reader.close()
            with self._lock:
                self._readers_left -= 1
                last = self._readers_left == 0
            if last and not self.crew.stop.is_set():
                for _ in range(self.workers):
                    self.filled.put(None)

    def work(self) -> None:
        while True:
            item = self.crew.get(self.filled)
            if item is None:
                return
            first, end, parts, buf = item
            try:
                self._process(first, end, parts, memoryview(buf))
            finally:
                self.pool.put(buf)

    def _process(self, first: int, end: int, parts: dict[int, Parts], buf: memoryview) -> None:
        bs = self.bs
        _, length = self._span(first, end)
        data = buf[:length]
        for idx, dirty in parts.items():
            self._merge_base(idx, dirty, data[(idx - first) * bs : (idx - first) * bs + bs])
        flags = zero_flags(data, bs)
        ids = self.store.block_ids(data, zero=bytes(flags))
        known = self.writer.known(b"".join(ids))  # the whole buffer's dedup lookups in one call
        zero = dup = new = stored = 0
        for i, block_id in enumerate(ids):
            idx = first + i
            blen = min(bs, length - i * bs)
            if block_id == ZERO_ID:
                zero += blen
            elif known[i] or (self.have_base and self.manifest[idx] == block_id):
                dup += blen  # in the store already, or unchanged since the base
            else:
                try:
                    n = self.writer.add(block_id, data[i * bs : i * bs + blen], looked_up=True)
                except OSError as e:
                    raise store_error(self.store, e) from None
                if n:
                    new += blen
                    stored += n
                else:
                    dup += blen
            self.manifest[idx] = block_id
        self.progress.add(done=length, read=length, zero=zero, duplicate=dup, new=new, stored=stored)

    def _merge_base(self, idx: int, dirty: Parts, block: memoryview) -> None:
        """Put the base block's bytes in the clean ranges of a partly dirty block.

        With ``changed`` only dirty extents come from the source: a shallow source (one qcow2 layer) reads
        clusters the layer does not hold as zeros, so the rest of the block must be the base's. A source
        showing the whole disk (a checkpoint backup) reads the same bytes there, so merging is right for both.
        """
        base_id = self.manifest[idx]  # still the base's entry: only this worker writes this block's entry
        clean = _clean(dirty, len(block))
        if base_id == ZERO_ID:
            for lo, hi in clean:
                block[lo:hi] = bytes(hi - lo)
            return
        try:
            base = self.store.read_block(base_id)
        except OSError as e:
            raise store_error(self.store, e) from None
        for lo, hi in clean:
            block[lo:hi] = base[lo:hi]


def _source_shrank(source: Source, offset: int) -> FerryError:
    return SourceError(f"source ended at offset {offset}, expected {source.size} bytes (did it shrink?)",
                       path=source.name)


def backup(
    store: StoreAPI,
    source: Source,
    *,
    base: str | None = None,
    changed: bool = False,
    labels: dict[str, Any] | None = None,
    progress: Progress | None = None,
    readers: int | None = None,
    workers: int | None = None,
    cancel: threading.Event | None = None,
) -> BackupInfo:
    """Back up ``source`` into ``store``; return the saved backup's info (with ``stats``).

    ``base``: a backup of the same disk to start from (its blocks at the same offsets need no lookup).
    ``changed``: read only the source's dirty extents (``source.extents("dirty")``) and keep the base's
    entries elsewhere; needs ``base``. On any failure nothing is saved and the writer is aborted.
    """
    if changed and base is None:
        raise UsageError("reading only changed extents needs a base backup")
    size = source.size
    if base is not None:
        base_info = store.backup(base)
        if changed and base_info.size != size:
            raise UsageError(
                f"base backup {base} is of a {base_info.size}-byte disk, the source has {size} bytes"
            )
    progress = progress or Progress()
    progress.start(size)
    readers = max(1, min(readers or source.max_readers, source.max_readers))
    workers = max(1, workers or default_workers())
    manifest = store.new_manifest(size, base=base)
    writer = store.writer()
    crew = Crew(cancel)
    log.info("Backup start source=%r size=%d base=%s changed=%s readers=%d workers=%d",
             source.name, size, base, changed, readers, workers)
    try:
        _Backup(store, source, manifest, writer, progress, base is not None, changed, readers, workers,
                crew).run()
        if crew.error is not None:
            raise crew.error
        data_done = time.monotonic()
        try:
            writer.commit()
        except OSError as e:
            raise store_error(store, e) from None
    except BaseException:
        writer.abort()
        close_manifest(manifest)
        raise
    commit_s = time.monotonic() - data_done  # the wait for the last packs' fsync: logged, it is worth watching
    snap = progress.finish()
    stats = {k: snap.get(k, 0) for k in ("read", "zero", "duplicate", "new", "stored", "unchanged")}
    stats["seconds"] = snap["seconds"]
    info = BackupInfo(
        id="",
        size=size,
        block_size=store.block_size,
        created=time.time(),
        base=base,
        kind="incremental" if base is not None else "full",
        source=source.name,
        labels=dict(labels or {}),
        stats=stats,
    )
    try:
        saved = store.save_backup(info, manifest)
    except OSError as e:
        raise store_error(store, e) from None
    finally:
        close_manifest(manifest)
    log.info("Backup done id=%s %s commit_seconds=%.3f", saved.id, " ".join(f"{k}={v}" for k, v in stats.items()),
             commit_s)
    return saved
