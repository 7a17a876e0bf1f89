"""Guests that write: random data written into a VM's active layer, as a running guest changes its disk.

The writes go through ``qemu-io`` opened read-write, like the VM's own qemu, so qcow2 allocation, persistent
dirty bitmaps and image locking behave as with a real guest: while a reader that does not share writes (a
backup's ``qemu-nbd`` export of the layer or of an overlay on it) holds the image, the write is refused with a
clear error instead of changing data under the backup. Force-share (-U) is never used for writing.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

from lab import qemu
from lab.errors import LabError

log = logging.getLogger("lab.guest")

# Guests write files, not scattered sectors: changes come in runs of clusters.
MAX_RUN = 16
# Bytes of source files handed to one qemu-io process (bounded temp space, few process starts).
BATCH_BYTES = 64 * 1024**2


def pick_extents(size: int, percent: float, seed: int, cluster: int = 65536) -> list[tuple[int, int]]:
    """Choose ``percent`` % of the clusters of a ``size``-byte disk in runs; merged (start, length), sorted."""
    if not 0 <= percent <= 100:
        raise LabError(f"percent {percent} out of range 0..100")
    n = -(-size // cluster)
    want = round(n * percent / 100)
    rng = random.Random(seed)
    dirty = bytearray(n)
    count = 0
    while count < want:
        start = rng.randrange(n)
        for i in range(start, min(start + rng.randint(1, MAX_RUN), n)):
            if count < want and not dirty[i]:
                dirty[i] = 1
                count += 1
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not dirty[i]:
            i += 1
            continue
        j = i
        while j < n and dirty[j]:
            j += 1
        start, end = i * cluster, min(j * cluster, size)
        out.append((start, end - start))
        i = j
    return out


def write_extents(image: Path | str, fmt: str, extents: list[tuple[int, int]], seed: int) -> None:
    """Write fresh random data (never repeated, so it neither compresses nor deduplicates) at ``extents``."""
    image = Path(image)
    rng = random.Random(seed ^ 0x5EED)
    with tempfile.TemporaryDirectory(prefix="ferry-guest-") as tmp:
        batch: list[str] = []
        batch_bytes = 0
        for k, (off, length) in enumerate(extents):
            src = Path(tmp, f"{k}.bin")
            src.write_bytes(rng.randbytes(length))
            batch.append(f"write -q -s {src} {off} {length}")
            batch_bytes += length
            if batch_bytes >= BATCH_BYTES:
                _io(image, fmt, batch)
                for f in Path(tmp).iterdir():
                    f.unlink()
                batch, batch_bytes = [], 0
        if batch:
            _io(image, fmt, batch)


def _io(image: Path, fmt: str, commands: list[str]) -> None:
    try:
        qemu.io(image, fmt, [*commands, "flush"])
    except LabError as e:
        if "lock" in str(e) or "another process" in str(e):
            raise LabError(f"guest cannot write {image.name}: the image is in use by a reader "
                           "(a backup export or a proxy attachment holds it)") from None
        raise


def write(
    image: Path | str, fmt: str, percent: float, seed: int, cluster: int = 65536
) -> list[dict[str, int | bool]]:
    """Write random data into ``percent`` % of the clusters of a VM's active layer ``image``.

    Returns the changed extents, merged and cluster-aligned, in the shape of ovirt-imageio's
    ``/extents?context=dirty`` entries: ``{"start", "length", "dirty": True, "zero": False}``. A bitmap of
    ``cluster`` granularity on the layer then reports exactly these extents.
    """
    image = Path(image)
    size = int(qemu.info(image, force_share=True)["virtual-size"])
    extents = pick_extents(size, percent, seed, cluster)
    write_extents(image, fmt, extents, seed)
    log.info("Guest wrote image=%s percent=%s extents=%d bytes=%d",
             image.name, percent, len(extents), sum(n for _, n in extents))
    return [{"start": s, "length": n, "dirty": True, "zero": False} for s, n in extents]
