"""Repair: rebuild the index of packs no valid segment covers (after a truncated or damaged segment).

Pack records carry their own id, lengths and checksum, so the index can always be rebuilt from the packs.
Runs under the prune lock and the exclusive store lock, like prune. Damaged segments are moved aside to
``index/<name>.idx.damaged`` (never deleted: they are evidence), each unindexed pack gets a fresh
segment of the records whose checksum holds, and bad records are reported, not indexed.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from mover.errors import StoreCorrupt
from mover.store import check, fsutil, index, lock, pack

if TYPE_CHECKING:
    from mover.store.repo import Store

log = logging.getLogger(__name__)


def repair(store: Store, wait: float = 60.0) -> dict[str, int]:
    """Rebuild missing index segments from their packs; returns counts."""
    root = store.path
    prune_lock = lock.FileLock(root, lock.PRUNE_LOCK)
    prune_lock.acquire(exclusive=True, timeout=0.0, busy="a prune or repair is running")
    store_lock = lock.FileLock(root, lock.STORE_LOCK)
    try:
        store_lock.acquire(exclusive=True, timeout=wait, busy="a backup is running; try again later")
        idx = index.Index(root)
        moved = 0
        for name in sorted(idx.bad):
            src = index.segment_path(root, name)
            os.rename(src, src + ".damaged")
            moved += 1
        fsutil.fsync_dir(os.path.join(root, index.INDEX_DIR))
        covered = {p for s in idx.segments for p in s.packs}
        rebuilt = blocks = bad = 0
        for p in sorted(check.pack_names(root) - covered):
            path = pack.pack_path(root, p)
            records = []
            fd = os.open(path, os.O_RDONLY)
            try:
                try:
                    for rec in pack.scan(path, root):
                        try:
                            pack.read_record(fd, rec.offset, rec.stored_len, path, root)
                        except StoreCorrupt:
                            bad += 1
                            continue
                        records.append(rec)
                except StoreCorrupt as e:
                    # a torn tail (a crash mid-append): keep the records before it
                    log.warning("Pack damaged name=%s reason=%r", p, e.reason)
                    bad += 1
            finally:
                os.close(fd)
            if records:
                # newest-wins is not needed: equal ids hold equal data (checked when read back)
                index.write_pack_segment(root, p, records)
                rebuilt += 1
                blocks += len(records)
        idx.close()
        store.index.refresh()
        result = {"segments_set_aside": moved, "segments_rebuilt": rebuilt, "blocks_indexed": blocks,
                  "bad_records": bad}
        log.info("Repaired store path=%s %s", root, " ".join(f"{k}={v}" for k, v in result.items()))
        return result
    except OSError as e:
        raise fsutil.store_error(e, root, "repair failed") from e
    finally:
        store_lock.release()
        prune_lock.release()
