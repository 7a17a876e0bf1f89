"""Back up and restore a file or a buffer in the calling thread, without the pipeline.

For tests, tools and small images; ``mover.pipeline`` is the fast path (threads, extents, progress).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from mover import kernels
from mover.store.api import ZERO_ID, BackupInfo

if TYPE_CHECKING:
    from mover.store.repo import Store

BATCH_BLOCKS = 16  # blocks per read and per kernel call


def backup_file(store: Store, path: str, base: str | None = None, **info: Any) -> BackupInfo:
    """Back up the file (or device) at ``path``; returns the saved backup's info."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size or f.seek(0, os.SEEK_END)
        return _backup(store, lambda off, n: os.pread(f.fileno(), n, off), size, base, path, info)


def backup_bytes(store: Store, data: bytes | bytearray | memoryview, base: str | None = None,
                 **info: Any) -> BackupInfo:
    """Back up a buffer as a disk of ``len(data)`` bytes."""
    mv = memoryview(data).cast("B")
    return _backup(store, lambda off, n: mv[off : off + n], len(mv), base, "<buffer>", info)


def _backup(store: Store, read: Any, size: int, base: str | None, source: str, extra: dict[str, Any]) -> BackupInfo:
    bs = store.block_size
    started = time.monotonic()
    writer = store.writer()
    manifest = store.new_manifest(size, base)
    stats = {"read": 0, "stored": 0, "zero": 0, "duplicate": 0}
    try:
        step = bs * BATCH_BLOCKS
        for off in range(0, size, step):
            buf = read(off, min(step, size - off))
            stats["read"] += len(buf)
            flags = kernels.zero_flags(buf, bs)
            ids = kernels.block_ids(store.config.hash, store._key, buf, bs, flags)
            manifest.set_range(off // bs, ids)
            for i in range(len(flags)):
                if flags[i]:
                    stats["zero"] += 1
                    continue
                n = writer.add(ids[i * 32 : i * 32 + 32], memoryview(buf)[i * bs : (i + 1) * bs])
                stats["stored"] += n
                stats["duplicate"] += n == 0
        writer.commit()
    except BaseException:
        writer.abort()
        manifest.close()
        raise
    stats["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    info = BackupInfo(id="", size=size, block_size=bs, created=time.time(), base=base,
                      kind="incremental" if base else "full", source=source, labels=extra, stats=stats)
    try:
        return store.save_backup(info, manifest)
    finally:
        manifest.close()


def restore_bytes(store: Store, backup_id: str, verify: bool = True) -> bytes:
    """The whole content of a backup (small disks only: it is held in memory)."""
    m = store.load_manifest(backup_id)
    try:
        out = bytearray(m.size)
        bs = m.block_size
        for i in range(m.count):
            bid = m[i]
            if bid != ZERO_ID:
                data = store.read_block(bid, verify)
                out[i * bs : i * bs + len(data)] = data
        return bytes(out)
    finally:
        m.close()


def restore_file(store: Store, backup_id: str, path: str, verify: bool = True) -> None:
    """Write a backup to ``path`` (zero blocks as holes in a new file)."""
    m = store.load_manifest(backup_id)
    try:
        with open(path, "wb") as f:
            f.truncate(m.size)
            for i in range(m.count):
                bid = m[i]
                if bid != ZERO_ID:
                    os.pwrite(f.fileno(), store.read_block(bid, verify), i * m.block_size)
    finally:
        m.close()
