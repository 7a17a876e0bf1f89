"""The core comparison: the same image backed up and restored by every tool, changed by 1%, backed up again.

Order of one run (every tool sees the same warm page cache and the same bytes):
1. copy the cached image to ``disk.raw`` in the workdir; measure the compression bound on it;
2. first backup with each tool; stored bytes after it;
3. restore each first backup, check it is bit-identical to the original and sparse, measure the rate;
4. ``change_blocks`` 1% of the 64 KiB clusters of ``disk.raw`` (extents written as imageio's dirty JSON);
5. second backup with each tool (Ferry: full re-read with ``--base``, then ``--changed`` with ``--base``);
6. Ferry's incremental restore point restored and compared with the changed image.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import bound
from bench.measure import BenchError, data_bytes, du, identical, run, warm
from bench.peers import Tool
from lab import images

log = logging.getLogger(__name__)

# 1% of the clusters, as the targets say.
CHANGE_PERCENT = 1.0


@dataclass
class Context:
    """What every suite of a run shares."""

    workdir: Path
    image: images.ImageInfo  # the cached original (read-only)
    seed: int = 0
    restore_dir: Path | None = None  # where restores are written (default: the workdir's disk)
    results: dict[str, Any] = field(default_factory=dict)


def _step(m: Any, **extra: Any) -> dict[str, Any]:
    return {"seconds": round(m.seconds, 3), "peak_rss": m.peak_rss, **extra}


def compare(ctx: Context, tools: list[Tool], with_bound: bool = True) -> dict[str, Any]:
    """Run the comparison over ``tools``; returns ``{"image", "bound", "tools": {name: {...}}}``."""
    disk = ctx.workdir / "disk.raw"
    disk.unlink(missing_ok=True)
    _sparse_copy(ctx.image.path, disk)
    size = disk.stat().st_size
    out: dict[str, Any] = {
        "image": {
            "size": size,
            "files": ctx.image.files,
            "file_bytes": ctx.image.data_bytes,
            "allocated": du(disk),
            "data_extents": data_bytes(disk),
        },
        "tools": {},
    }
    warm(disk)
    if with_bound:
        b = bound.measure(disk)
        out["bound"] = {"seconds": round(b.seconds, 3), "data_bytes": b.data_bytes, "compressed": b.compressed,
                        "threads": b.threads}
        log.info("Bound seconds=%.2f data=%d compressed=%d", b.seconds, b.data_bytes, b.compressed)

    rows: dict[str, dict[str, Any]] = out["tools"]
    for tool in tools:
        tool.setup()
        m = tool.backup(disk)
        rows[tool.name] = {"backup1": _step(m, stored=tool.stored())}
        log.info("Backup tool=%s seconds=%.2f", tool.name, m.seconds)

    for tool in tools:
        dest = (ctx.restore_dir or ctx.workdir) / f"restore-{tool.name}.raw"
        dest.unlink(missing_ok=True)
        m = tool.restore(tool.backups[0], dest)
        rows[tool.name]["restore"] = _restore_facts(m, dest, ctx.image.path, size)
        dest.unlink()
        log.info("Restore tool=%s seconds=%.2f", tool.name, m.seconds)

    extents = images.change_blocks(disk, CHANGE_PERCENT, seed=ctx.seed + 1)
    changed = ctx.workdir / "changed.json"
    changed.write_text(json.dumps(extents))
    out["change"] = {"percent": CHANGE_PERCENT, "dirty_bytes": images.dirty_bytes(extents),
                     "dirty_extents": sum(1 for e in extents if e["dirty"])}
    warm(disk)

    for tool in tools:
        before = tool.stored()
        first = tool.backups[0]
        m = tool.backup(disk, base=first if tool.incremental else None)
        rows[tool.name]["backup2"] = _step(m, stored_delta=tool.stored() - before)
        if tool.incremental:
            before = tool.stored()
            m = tool.backup(disk, base=first, changed=changed)
            rows[tool.name]["backup2_changed"] = _step(m, stored_delta=tool.stored() - before)
            # The restore point made from only the changed ranges must be the whole changed disk.
            dest = (ctx.restore_dir or ctx.workdir) / f"restore-{tool.name}-incr.raw"
            dest.unlink(missing_ok=True)
            m = tool.restore(tool.backups[-1], dest)
            rows[tool.name]["restore_changed"] = _restore_facts(m, dest, disk, size)
            dest.unlink()
        rows[tool.name]["stored_total"] = tool.stored()
    return out


def sparse_image(ctx: Context, tool: Tool, size: int, pieces: int = 8, piece: int = 32 * 1024**2) -> dict[str, Any]:
    """Back up a large sparse image (mostly holes; ``pieces`` runs of real data spread over it) with ``tool``."""
    path = ctx.workdir / "sparse.raw"
    path.unlink(missing_ok=True)
    piece = min(piece, ctx.image.size // pieces)
    with open(ctx.image.path, "rb") as src, open(path, "wb") as dst:
        dst.truncate(size)
        for i in range(pieces):
            dst.seek(i * (size // pieces))
            dst.write(src.read(piece))
    try:
        tool.setup()
        m = tool.backup(path)
        result = _step(m, size=size, data=data_bytes(path), stored=tool.stored())
        dest = (ctx.restore_dir or ctx.workdir) / "restore-sparse.raw"
        dest.unlink(missing_ok=True)
        r = tool.restore(tool.backups[0], dest)
        result["restore"] = {"seconds": round(r.seconds, 3), "allocated": du(dest),
                             "rate_gbps": round(size / r.seconds / 1e9, 3)}
        dest.unlink()
    finally:
        path.unlink(missing_ok=True)
    return result


def _restore_facts(m: Any, dest: Path, original: Path, size: int) -> dict[str, Any]:
    if not dest.exists():
        raise BenchError(f"restore did not create {dest.name}")
    # Some tools fsync their output (Ferry, qemu-img), others leave it in the page cache (borg, restic): the
    # time to make the file durable afterwards puts them on equal terms.
    sync = run(["sync", str(dest)], logdir=dest.parent / ".sync-logs").check()
    shutil.rmtree(dest.parent / ".sync-logs", ignore_errors=True)
    allocated = du(dest)
    return _step(
        m,
        rate_gbps=round(size / m.seconds / 1e9, 3),
        durable_seconds=round(m.seconds + sync.seconds, 3),
        allocated=allocated,
        sparse=is_sparse(allocated, du(original), size),
        identical=identical(dest, original),
    )


def is_sparse(allocated: int, original_allocated: int, size: int) -> bool:
    """A restore is sparse when at least 90% of the original's holes stayed holes.

    The slack allows for tools that store larger blocks than the original's 4 KiB holes.
    """
    return allocated <= original_allocated + 0.1 * (size - original_allocated)


def _sparse_copy(src: Path, dst: Path) -> None:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], logdir=dst.parent / "logs").check()
