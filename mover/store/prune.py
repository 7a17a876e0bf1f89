"""Prune: drop blocks no backup references, rewrite packs that hold garbage, merge the index.

Runs under the store lock held exclusively (no backup is in flight: writers hold it shared from their first
block until they close the store) and under the prune lock taken without waiting (a second prune fails at
once with ``StoreLocked``). Algorithm (docs/store-format.md, "Prune"):
  1. mark: for every backup's manifest, find each id's first copy in the index (the copy every reader
     uses) and set its flag: one byte per index entry, so memory is bounded by the index, not by Python
     objects;
  2. plan per pack: live and dead bytes; a pack with no live block is deleted, one with at least
     ``REWRITE_DEAD_FRACTION`` dead bytes is rewritten (its live records copied as they are, checksums
     verified, into a new pack);
  3. publish one merged segment holding every live entry (kept packs + new packs), then delete the old
     segments, then the old packs, unindexed packs and temporary files. A crash at any point leaves either
     the old or the new index valid, at worst with duplicate entries that the next prune drops.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mover.errors import StoreCorrupt, StoreFull
from mover.store import check, fsutil, index, lock, pack

if TYPE_CHECKING:
    from mover.store.repo import Store


log = logging.getLogger(__name__)

# Rewrite a pack once a tenth of it is garbage: rewriting copies the live 90%, so a lower threshold spends
# more I/O than the space it frees; any pack that is all garbage is deleted outright.
REWRITE_DEAD_FRACTION = 0.10

Row = tuple[bytes, int, int, int, int, int]


def prune(store: Store, wait: float = 60.0, rewrite_fraction: float = REWRITE_DEAD_FRACTION) -> dict[str, int]:
    """Prune ``store``; waits up to ``wait`` seconds for running backups to end. Returns counts."""
    root = store.path
    prune_lock = lock.FileLock(root, lock.PRUNE_LOCK)
    prune_lock.acquire(exclusive=True, timeout=0.0, busy="another prune is running")
    try:
        # a descriptor of its own: backups in flight in this very process (holds) make it wait too
        store_lock = lock.FileLock(root, lock.STORE_LOCK)
        store_lock.acquire(exclusive=True, timeout=wait, busy="a backup is running; try again later")
        try:
            try:
                return _prune(store, rewrite_fraction)
            except StoreFull as e:
                if rewrite_fraction > 1:
                    raise
                # A full store is when prune matters most, and rewriting needs room: free what can be
                # freed without writing new packs (whole dead packs), then let the next prune rewrite.
                log.warning("No space to rewrite packs, pruning without rewriting reason=%r", e.reason)
                result = _prune(store, rewrite_fraction=2.0)
                result["rewrite_skipped_no_space"] = 1
                return result
        finally:
            store_lock.release()
    finally:
        prune_lock.release()


def _prune(store: Store, rewrite_fraction: float) -> dict[str, int]:
    root = store.path
    started = time.monotonic()
    idx = index.Index(root)
    if idx.bad:
        name, reason = next(iter(idx.bad.items()))
        raise StoreCorrupt(f"not pruning: index segment {name} is damaged ({reason}); run check", path=root)
    segments = list(idx.segments)
    live = [bytearray(s.count) for s in segments]
    missing = 0
    backups = store.backup_ids()
    for b in backups:
        m = store.load_manifest(b)  # a damaged manifest raises: never prune blocks it may reference
        try:
            for chunk in m.chunks():
                missing += index.count_missing(idx.segments, chunk, live)
        finally:
            m.close()

    # per pack: live bytes by the index; dead bytes are the rest of the file, so records an earlier
    # prune dropped from the index without rewriting their pack (no room then) still count as garbage
    live_bytes: dict[str, int] = {}
    for s, flags in zip(segments, live, strict=True):
        for i in range(s.count):
            bid, off, slen, rlen, pno, fl = s.raw(i)
            p = s.packs[pno]
            live_bytes[p] = live_bytes.get(p, 0) + (pack.RECORD.size + slen if flags[i] else 0)
    on_disk = check.pack_names(root)
    usage: dict[str, list[int]] = {}
    for p, lv in live_bytes.items():
        size = os.path.getsize(pack.pack_path(root, p)) - pack.HEADER.size if p in on_disk else lv
        usage[p] = [lv, max(0, size - lv)]
    delete = {p for p, (lv, _) in usage.items() if lv == 0}
    rewrite = {p for p, (lv, dead) in usage.items() if lv and dead and dead >= rewrite_fraction * (lv + dead)}
    delete |= {p for p in usage if p not in on_disk}  # already gone: just drop its entries
    rewrite -= delete

    # the live records of the packs to rewrite, gathered in one pass over the index (memory: their rows)
    todo: dict[str, list[tuple[int, int, int, int, bytes]]] = {}
    if rewrite:
        for s, flags in zip(segments, live, strict=True):
            for i in range(s.count):
                bid, off, slen, rlen, pno, fl = s.raw(i)
                if flags[i] and s.packs[pno] in rewrite:
                    todo.setdefault(s.packs[pno], []).append((off, slen, rlen, fl, bid))
    # copy them as they are (no recompression), in pack order; rows of new pack k carry -1 - k until
    # the final pack numbering is known
    new_rows: list[Row] = []
    new_packs: list[str] = []
    writer: pack.PackWriter | None = None
    try:
        for p in sorted(todo):
            path = pack.pack_path(root, p)
            fd = os.open(path, os.O_RDONLY)
            try:
                for off, slen, rlen, fl, bid in sorted(todo[p]):
                    rid, _, _, data = pack.read_record(fd, off, slen, path, root)
                    if writer is None:
                        writer = pack.PackWriter(root)
                    rec = writer.append(rid, data, rlen, fl)
                    new_rows.append((bid, rec.offset, slen, rlen, -1 - len(new_packs), fl))
                    if writer.size >= store.config.pack_size:
                        writer.finish()
                        new_packs.append(writer.name)
                        writer = None
            finally:
                os.close(fd)
        if writer is not None:
            writer.finish()
            new_packs.append(writer.name)
            writer = None
    except BaseException:
        if writer is not None:
            writer.discard()
        for p in new_packs:
            fsutil.remove(pack.pack_path(root, p))
        raise
    del todo

    # one merged segment: live entries of kept packs + the rewritten ones
    gone = delete | rewrite
    kept_packs = sorted({p for p in usage if p not in gone})
    all_packs = kept_packs + new_packs
    pno_of = {p: i for i, p in enumerate(all_packs)}

    def kept_rows(s: index.Segment, flags: bytearray) -> Iterator[Row]:
        for i in range(s.count):
            bid, off, slen, rlen, pno, fl = s.raw(i)
            if flags[i] and s.packs[pno] not in gone:
                yield bid, off, slen, rlen, pno_of[s.packs[pno]], fl

    # rows of new packs carry -1 - k for "the k-th pack written so far": fix the number up now
    fixed = sorted((bid, off, slen, rlen, pno_of[new_packs[-1 - pno]], fl)
                   for bid, off, slen, rlen, pno, fl in new_rows)
    count = sum(1 for s, f in zip(segments, live, strict=True) for _ in kept_rows(s, f)) + len(fixed)
    merged_name = None
    if count:
        merged_name = uuid.uuid4().hex
        streams = [kept_rows(s, f) for s, f in zip(segments, live, strict=True)] + [iter(fixed)]
        try:
            index.write_segment(root, merged_name, all_packs, heapq.merge(*streams), count)
        except BaseException:
            for p in new_packs:
                fsutil.remove(pack.pack_path(root, p))
            raise
    # the new index is durable: now drop the old segments, then the packs they alone pointed into
    for s in segments:
        fsutil.remove(s.path)
    fsutil.fsync_dir(os.path.join(root, index.INDEX_DIR))
    referenced = set(all_packs)
    removed_packs = 0
    freed = 0
    doomed = (on_disk - referenced) & gone  # packs this prune emptied or replaced
    kept_unindexed = on_disk - referenced - gone
    if missing:
        # Backups name blocks the index lacks: an unindexed pack (its segment lost) may hold them, and
        # `repair` can index it again. Never delete such packs while anything is missing.
        log.warning("Keeping unindexed packs count=%d because missing_blocks=%d; run repair",
                    len(kept_unindexed), missing)
    else:
        doomed |= kept_unindexed  # left by writers that died between pack and segment: garbage
        kept_unindexed = set()
    for p in sorted(doomed):
        path = pack.pack_path(root, p)
        with contextlib.suppress(OSError):
            freed += os.path.getsize(path)
        fsutil.remove(path)
        removed_packs += 1
    tmp_dir = os.path.join(root, fsutil.TMP_DIR)
    for f in os.listdir(tmp_dir):  # no writer runs (we hold the store lock): every temp file is debris
        path = os.path.join(tmp_dir, f)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            fsutil.remove(path)
    idx.close()
    store.refresh()
    dead_blocks = sum(f.count(0) for f in live)
    result = {
        "backups": len(backups),
        "blocks_kept": count,
        "blocks_removed": dead_blocks,
        "missing_blocks": missing,
        "packs_deleted": len(delete & on_disk),
        "packs_rewritten": len(rewrite),
        "packs_written": len(new_packs),
        "packs_removed": removed_packs,
        "bytes_freed": freed - sum(os.path.getsize(pack.pack_path(root, p)) for p in new_packs),
        "segments_merged": len(segments),
        "unindexed_packs_kept": len(kept_unindexed),
    }
    log.info("Pruned store path=%s %s seconds=%.2f", root,
             " ".join(f"{k}={v}" for k, v in result.items()), time.monotonic() - started)
    return result

