"""Restore a backup to a sink: blocks fetched and written by several threads, zeros as holes.

Every manifest is full, so a restore reads one manifest and its blocks, whatever chain of incrementals led
to it. Zero entries become ``sink.zero`` calls (nothing for a fresh file or disk); runs of data blocks are
read by ``store.read_into`` (batched: checksums, one GIL-free decompression call, keyed re-hash of every
block; docs/pipeline.md, "What restore verifies") into a buffer each writer thread reuses, and written with
positional writes, in any order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from mover import kernels
from mover.crew import Crew, Stop
from mover.errors import StoreCorrupt
from mover.kernels import ID_SIZE
from mover.pipeline import CHUNK, close_manifest, default_workers
from mover.progress import Progress
from mover.sinks.base import Sink
from mover.store.api import Manifest, StoreAPI

log = logging.getLogger(__name__)


def restore(
    store: StoreAPI,
    backup_id: str,
    sink: Sink,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    sync: bool = True,
) -> dict[str, Any]:
    """Write backup ``backup_id`` to ``sink`` bit for bit; return stats (bytes written, zero, seconds).

    ``sync``: flush the sink at the end (fsync), so the restore is durable when this returns.
    """
    info = store.backup(backup_id)
    manifest = store.load_manifest(backup_id)
    bs = manifest.block_size
    size = info.size
    # Blocks per write: the pipeline's chunk, so a task's memory is bounded as a backup's buffer is.
    task_blocks = max(1, CHUNK // bs)
    progress = progress or Progress()
    progress.start(size)
    workers = max(1, min(workers or default_workers() * 2, sink.max_writers))
    log.info("Restore start backup=%s size=%d sink=%r workers=%d", backup_id, size, sink.name, workers)
    sink.truncate(size)
    crew = Crew(cancel)
    tasks: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=workers * 2)

    def span(first: int, end: int) -> tuple[int, int]:
        start = first * bs
        return start, min(end * bs, size) - start

    def plan() -> None:
        for first, end, zero in _runs(manifest):
            if zero:
                offset, length = span(first, end)
                sink.zero(offset, length)
                progress.add(done=length, zero=length)
            else:
                for i in range(first, end, task_blocks):
                    crew.put(tasks, (i, min(i + task_blocks, end)))
            if crew.stopped():
                raise Stop
        for _ in range(workers):
            crew.put(tasks, None)

    def write() -> None:
        # One buffer per writer, reused for every run: no allocation (and page faults) per block or task.
        out = memoryview(bytearray(task_blocks * bs))
        while True:
            task = crew.get(tasks)
            if task is None:
                return
            _write_run(store, manifest, sink, backup_id, task[0], task[1], size, progress, out)

    crew.spawn("restore-plan", plan)
    for n in range(workers):
        crew.spawn(f"restore-write-{n}", write)
    crew.join()
    close_manifest(manifest)
    if crew.error is not None:
        raise crew.error
    if sync:
        sink.flush()
    snap = progress.finish()
    stats = {"written": snap["written"], "zero": snap["zero"], "seconds": snap["seconds"], "size": size}
    log.info("Restore done backup=%s written=%d zero=%d seconds=%.3f",
             backup_id, stats["written"], stats["zero"], stats["seconds"])
    return stats


def _runs(manifest: Manifest) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first, end, all_zero)`` of the manifest's blocks, in order.

    Zero ids are found by one GIL-free ``zero_flags`` pass per slice of the id array and runs by
    ``bytearray.find``: the work is per run, not per block (a 64 GiB sparse disk has 262144 blocks).
    """
    chunks = getattr(manifest, "chunks", None)
    slices: list[Any] = chunks() if chunks is not None else [b"".join(manifest[i] for i in range(len(manifest)))]
    start, zero = 0, True
    base = 0
    for ids in slices:
        flags = kernels.zero_flags(ids, ID_SIZE)  # 1: ZERO_ID
        i, m = 0, len(flags)
        while i < m:
            here = bool(flags[i])
            j = flags.find(0 if here else 1, i)
            j = m if j < 0 else j
            if here != zero and base + i > start:
                yield start, base + i, zero
                start = base + i
            zero = here
            i = j
        base += m
    if base > start:
        yield start, base, zero


def _write_run(
    store: StoreAPI,
    manifest: Manifest,
    sink: Sink,
    backup_id: str,
    first: int,
    end: int,
    size: int,
    progress: Progress,
    out: memoryview,
) -> None:
    """Fetch blocks [first, end) into ``out`` and write them as one run (one write per task, not per block).

    ``out`` is reused for the next run once ``sink.write`` returns: sinks write synchronously.
    """
    bs = manifest.block_size
    ids = [manifest[i] for i in range(first, end)]
    lengths = store.read_into(ids, out)
    for k, got in enumerate(lengths):
        i = first + k
        want = min(bs, size - i * bs)
        if got != want:
            raise StoreCorrupt(
                f"block {ids[k].hex()[:16]} of backup {backup_id} at offset {i * bs} has "
                f"{got} bytes, expected {want}",
                path=store.path,
            )
    total = (end - first - 1) * bs + lengths[-1]  # every block but the disk's last is a full block
    sink.write(first * bs, out[:total])
    progress.add(done=total, written=total)
