"""Verify a store: structure (config, packs, index segments, manifests agree) and, optionally, every block.

The report says which blocks are missing or corrupt and WHICH BACKUPS they break, as a JSON-ready dict:
    {"ok", "read_data", "store": {...}, "counts": {...}, "problems": [{"kind", "object", "detail"}],
     "missing_blocks": n, "corrupt_blocks": n, "damaged_blocks": [{"id", "state", "pack"}] (first 100),
     "broken_backups": [{"id", "missing", "corrupt", "detail"}], "warnings": [...]}
Memory: the sets of damaged ids (only damaged blocks) and one segment's pages at a time.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from mover.errors import FerryError, StoreCorrupt
from mover.store import fsutil, index, pack
from mover.store.api import ZERO_ID

if TYPE_CHECKING:
    from mover.store.repo import Store

log = logging.getLogger(__name__)

MAX_LISTED = 100  # ids listed in the report; counts stay exact


def pack_names(root: str) -> set[str]:
    """Names of every pack file on disk."""
    names: set[str] = set()
    top = os.path.join(root, pack.PACK_DIR)
    for sub in os.listdir(top):
        d = os.path.join(top, sub)
        if os.path.isdir(d):
            names.update(f[: -len(".pack")] for f in os.listdir(d) if f.endswith(".pack"))
    return names


def check(store: Store, read_data: bool = False) -> dict[str, Any]:
    """Check ``store``; with ``read_data`` re-read, decompress and re-hash every indexed block."""
    root = store.path
    problems: list[dict[str, str]] = []
    warnings: list[str] = []
    idx = index.Index(root)  # a fresh view: no segment cached from before the damage
    for name, reason in sorted(idx.bad.items()):
        problems.append({"kind": "index", "object": name, "detail": reason})
    on_disk = pack_names(root)
    referenced: set[str] = set()
    missing: set[bytes] = set()  # ids whose (first) copy's pack is gone
    corrupt: set[bytes] = set()
    bad: set[tuple[bytes, str]] = set()  # copies found bad: (id, pack)
    where: dict[bytes, str] = {}
    blocks = 0
    stored = 0
    checked = 0
    for seg in idx.segments:
        pack_end: dict[str, int] = {}
        for e in seg:
            blocks += 1
            stored += e.stored_len
            referenced.add(e.pack)
            pack_end[e.pack] = max(pack_end.get(e.pack, 0), e.offset + pack.RECORD.size + e.stored_len)
        for p, end in pack_end.items():
            if p not in on_disk:
                problems.append({"kind": "pack", "object": p, "detail": f"missing (indexed by segment {seg.name})"})
                continue
            size = os.path.getsize(pack.pack_path(root, p))
            if size < end:
                problems.append({"kind": "pack", "object": p, "detail": f"truncated: {size} bytes, index needs {end}"})
        gone = {p for p in pack_end if p not in on_disk}
        if not read_data and not gone:
            continue
        for e in seg:
            if e.pack in gone:
                missing.add(e.id)
                bad.add((e.id, e.pack))
                where[e.id] = e.pack
            elif read_data:
                try:
                    store.read_entry(e, verify=True)
                    checked += 1
                except StoreCorrupt as err:
                    corrupt.add(e.id)
                    bad.add((e.id, e.pack))
                    where[e.id] = e.pack
                    log.warning("Corrupt block id=%s pack=%s reason=%r", e.id.hex()[:16], e.pack, err.reason)
    for p in sorted(on_disk - referenced):
        warnings.append(f"pack {p} is not indexed (left by an interrupted writer, or its segment is damaged)")

    # an id with one good copy is not lost (reads fall back to it): only ids with none break backups
    def state(bid: bytes) -> str | None:
        if bid not in missing and bid not in corrupt:
            return None if idx.find(bid) is not None else "missing"
        if any((e.id, e.pack) not in bad for e in idx.find_all(bid)):
            return None
        return "corrupt" if bid in corrupt else "missing"

    broken: list[dict[str, Any]] = []
    lost: dict[bytes, str] = {}
    backups = store.backup_ids()
    for b in backups:
        try:
            store.backup(b)
            m = store.load_manifest(b)
        except FerryError as err:
            problems.append({"kind": "backup", "object": b, "detail": str(err)})
            broken.append({"id": b, "missing": 0, "corrupt": 0, "detail": str(err)})
            continue
        counts = {"missing": 0, "corrupt": 0}
        try:
            if m.block_size != store.block_size:
                problems.append({"kind": "backup", "object": b, "detail": f"block size {m.block_size}"})
            for i in range(m.count):
                bid = m[i]
                if bid == ZERO_ID:
                    continue
                s = state(bid)
                if s is not None:
                    counts[s] += 1
                    lost[bid] = s
        finally:
            m.close()
        if counts["missing"] or counts["corrupt"]:
            broken.append({"id": b, **counts, "detail": f"{counts['missing']} missing, {counts['corrupt']} corrupt block(s)"})
    tmp = os.listdir(os.path.join(root, fsutil.TMP_DIR))
    if tmp:
        warnings.append(f"{len(tmp)} temporary file(s) in tmp/ (a running writer's, or left by a crash; prune removes them)")
    damaged = [{"id": k.hex(), "state": v, "pack": where.get(k, "")} for k, v in list(lost.items())[:MAX_LISTED]]
    for bid in list(corrupt | missing):
        if bid not in lost and len(damaged) < MAX_LISTED:
            damaged.append({"id": bid.hex(), "state": "corrupt" if bid in corrupt else "missing",
                            "pack": where.get(bid, "")})
    report = {
        "ok": not problems and not broken and not corrupt and not missing,
        "read_data": read_data,
        "store": {"path": root, "version": store.config.version, "block_size": store.block_size,
                  "hash": store.config.hash, "compression": f"zstd-{store.config.zstd_level}"},
        "counts": {"packs": len(on_disk), "segments": len(idx.segments), "blocks": blocks,
                   "stored_bytes": stored, "blocks_read": checked, "backups": len(backups)},
        "problems": problems,
        "missing_blocks": len(missing | {k for k, v in lost.items() if v == "missing"}),
        "corrupt_blocks": len(corrupt),
        "damaged_blocks": damaged,
        "broken_backups": broken,
        "warnings": warnings,
    }
    idx.close()
    log.info("Checked store path=%s ok=%s problems=%d broken_backups=%d", root, report["ok"], len(problems),
             len(broken))
    return report
