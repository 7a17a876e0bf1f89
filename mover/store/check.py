"""Verify a store: structure (config, packs, index segments, manifests agree) and, optionally, every block.

The report says which blocks are missing or corrupt and WHICH BACKUPS they break, as a JSON-ready dict:
    {"ok", "read_data", "store": {...}, "counts": {...}, "problems": [{"kind", "object", "detail"}],
     "missing_blocks": n, "corrupt_blocks": n, "damaged_blocks": [{"id", "state", "pack"}] (first 100),
     "broken_backups": [{"id", "missing", "corrupt", "detail"}], "warnings": [...]}
Memory: the ids of damaged blocks only, one segment's pages and one batch of blocks at a time.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mover.errors import FerryError, StoreCorrupt
from mover.store import fsutil, index, pack
from mover.store.api import ZERO_ID

if TYPE_CHECKING:
    from mover.store.repo import Store

log = logging.getLogger(__name__)

MAX_LISTED = 100  # ids listed in the report; counts stay exact
READ_BATCH = 64  # blocks read per batch by --read-data: bounds memory to ~64 blocks per thread
READ_THREADS = max(2, os.cpu_count() or 2)  # decompress and hash release the GIL: use every core


def pack_names(root: str) -> set[str]:
    """Names of every pack file on disk."""
    names: set[str] = set()
    top = os.path.join(root, pack.PACK_DIR)
    for sub in os.listdir(top):
        d = os.path.join(top, sub)
        if os.path.isdir(d):
            names.update(f[: -len(".pack")] for f in os.listdir(d) if f.endswith(".pack"))
    return names


@dataclass
class _Scan:
    """What reading the index (and, with read_data, the packs) found."""

    on_disk: set[str]
    problems: list[dict[str, str]] = field(default_factory=list)
    referenced: set[str] = field(default_factory=set)
    missing: set[bytes] = field(default_factory=set)  # ids with a copy in a pack that is gone
    corrupt: set[bytes] = field(default_factory=set)  # ids with a copy that failed to read back
    bad: set[tuple[bytes, str]] = field(default_factory=set)  # the bad copies: (id, pack)
    where: dict[bytes, str] = field(default_factory=dict)
    blocks: int = 0
    stored: int = 0
    read: int = 0

    def mark(self, e: index.Entry, kind: set[bytes]) -> None:
        kind.add(e.id)
        self.bad.add((e.id, e.pack))
        self.where[e.id] = e.pack


def _scan_segment(store: Store, seg: index.Segment, scan: _Scan, read_data: bool, pool: ThreadPoolExecutor) -> None:
    root = store.path
    pack_end: dict[str, int] = {}
    for e in seg:
        scan.blocks += 1
        scan.stored += e.stored_len
        scan.referenced.add(e.pack)
        pack_end[e.pack] = max(pack_end.get(e.pack, 0), e.offset + pack.RECORD.size + e.stored_len)
    gone = set()
    for p, end in pack_end.items():
        if p not in scan.on_disk:
            gone.add(p)
            scan.problems.append({"kind": "pack", "object": p, "detail": f"missing (indexed by segment {seg.name})"})
            continue
        size = os.path.getsize(pack.pack_path(root, p))
        if size < end:
            scan.problems.append({"kind": "pack", "object": p, "detail": f"truncated: {size} bytes, index needs {end}"})
    if not read_data and not gone:
        return

    def verify(e: index.Entry) -> str | None:
        try:
            store.read_entry(e, verify=True)
            return None
        except StoreCorrupt as err:
            return err.reason

    batch: list[index.Entry] = []

    def flush() -> None:
        for e, reason in zip(batch, pool.map(verify, batch), strict=True):
            if reason is None:
                scan.read += 1
            else:
                scan.mark(e, scan.corrupt)
                log.warning("Corrupt block id=%s pack=%s reason=%r", e.id.hex()[:16], e.pack, reason)
        batch.clear()

    for e in seg:
        if e.pack in gone:
            scan.mark(e, scan.missing)
        elif read_data:
            batch.append(e)
            if len(batch) >= READ_BATCH * READ_THREADS:
                flush()
    flush()


def check(store: Store, read_data: bool = False) -> dict[str, Any]:
    """Check ``store``; with ``read_data`` re-read, decompress and re-hash every indexed block.

    Holds the shared store lock (as a backup does), so no prune deletes packs under it; backups and
    index compactions may run meanwhile.
    """
    store.hold()
    try:
        return _check(store, read_data)
    finally:
        store.unhold()


def _check(store: Store, read_data: bool) -> dict[str, Any]:
    root = store.path
    for _ in range(5):
        idx = index.Index(root)  # a fresh view: no segment cached from before the damage
        if not idx.vanished:
            break
        idx.close()  # a compaction replaced segments while we listed them: list again
    scan = _Scan(on_disk=pack_names(root))
    warnings: list[str] = []
    for name, reason in sorted(idx.bad.items()):
        scan.problems.append({"kind": "index", "object": name, "detail": reason})
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="check") as pool:
        for seg in idx.segments:
            _scan_segment(store, seg, scan, read_data, pool)
    for p in sorted(scan.on_disk - scan.referenced):
        warnings.append(f"pack {p} is not indexed (left by an interrupted writer, or its segment is damaged)")

    # an id with one good copy is not lost (reads fall back to it): only ids with none break backups
    def state(bid: bytes) -> str | None:
        if bid not in scan.missing and bid not in scan.corrupt:
            return None if idx.find(bid) is not None else "missing"
        if any((e.id, e.pack) not in scan.bad for e in idx.find_all(bid)):
            return None
        return "corrupt" if bid in scan.corrupt else "missing"

    broken: list[dict[str, Any]] = []
    lost: dict[bytes, str] = {}
    backups = store.backup_ids()
    for b in backups:
        try:
            store.backup(b)
            m = store.load_manifest(b)
        except FerryError as err:
            scan.problems.append({"kind": "backup", "object": b, "detail": str(err)})
            broken.append({"id": b, "missing": 0, "corrupt": 0, "detail": str(err)})
            continue
        counts = {"missing": 0, "corrupt": 0}
        try:
            if m.block_size != store.block_size:
                scan.problems.append({"kind": "backup", "object": b, "detail": f"block size {m.block_size}"})
            any_damage = bool(scan.missing or scan.corrupt)
            for chunk in m.chunks():
                # the healthy case stays in the kernel: one GIL-free lookup pass per segment
                found = bytearray()
                if not index.count_missing(idx.segments, chunk, found=found) and not any_damage:
                    continue
                for i in range(len(found)):
                    bid = bytes(chunk[i * 32 : i * 32 + 32])
                    s = "missing" if not found[i] else state(bid) if any_damage and bid != ZERO_ID else None
                    if s is not None:
                        counts[s] += 1
                        lost[bid] = s
        finally:
            m.close()
        if counts["missing"] or counts["corrupt"]:
            broken.append({"id": b, **counts,
                           "detail": f"{counts['missing']} missing, {counts['corrupt']} corrupt block(s)"})
    tmp = os.listdir(os.path.join(root, fsutil.TMP_DIR))
    if tmp:
        warnings.append(f"{len(tmp)} temporary file(s) in tmp/ (a running writer's, or left by a crash; "
                        "prune removes them)")
    damaged = [{"id": k.hex(), "state": v, "pack": scan.where.get(k, "")} for k, v in list(lost.items())[:MAX_LISTED]]
    for bid in scan.corrupt | scan.missing:
        if bid not in lost and len(damaged) < MAX_LISTED:
            damaged.append({"id": bid.hex(), "state": "corrupt" if bid in scan.corrupt else "missing",
                            "pack": scan.where.get(bid, "")})
    report = {
        "ok": not scan.problems and not broken and not scan.corrupt and not scan.missing,
        "read_data": read_data,
        "store": {"path": root, "version": store.config.version, "block_size": store.block_size,
                  "hash": store.config.hash, "compression": f"zstd-{store.config.zstd_level}"},
        "counts": {"packs": len(scan.on_disk), "segments": len(idx.segments), "blocks": scan.blocks,
                   "stored_bytes": scan.stored, "blocks_read": scan.read, "backups": len(backups)},
        "problems": scan.problems,
        "missing_blocks": len(scan.missing | {k for k, v in lost.items() if v == "missing"}),
        "corrupt_blocks": len(scan.corrupt),
        "damaged_blocks": damaged,
        "broken_backups": broken,
        "warnings": warnings,
    }
    idx.close()
    log.info("Checked store path=%s ok=%s problems=%d broken_backups=%d", root, report["ok"],
             len(scan.problems), len(broken))
    return report
