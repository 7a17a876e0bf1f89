"""Incrementals whose dirty extents cover store blocks only in part: the rest of each block is the base's.

A store block (256 KiB) spans four 64 KiB qcow2 clusters or bitmap granules. The snapshot method reads one
qcow2 layer alone (a shallow transfer), where clusters the layer does not hold read as zeros; the checkpoint
method reads the whole disk with 64 KiB-granular dirty extents. Either way a partly dirty block must be the
source's bytes in the dirty ranges and the base block's bytes elsewhere. The real test runs the real imageio
daemon over qemu-nbd serving a qcow2 layer without its backing file, as vdsm serves a shallow transfer.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from imageio_env import ImageioDaemon, QemuNbd, make_image, qemu_img, qemu_io, raw_content

from mover.kernels import ZERO_ID
from mover.pipeline import _clean, _dirty_runs, _touched, backup
from mover.restore import restore
from mover.sinks.file import FileSink
from mover.sources.base import Extent
from mover.sources.file import FileSource
from mover.sources.imageio import ImageioSource
from mover.store.api import StoreAPI
from mover.store.repo import Store

KiB = 1024
MiB = 1024 * KiB
BS = 256 * KiB  # the store's default block: four qcow2 clusters
CL = 64 * KiB  # a qcow2 cluster, a bitmap granule


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreAPI]:
    s = Store.open(str(tmp_path / "store"), create=True, block_size=BS)
    try:
        yield cast(StoreAPI, s)
    finally:
        s.close()


def restored(store: StoreAPI, backup_id: str, path: Path) -> bytes:
    sink = FileSink(str(path), overwrite=True)
    try:
        restore(store, backup_id, sink)
    finally:
        sink.close()
    return path.read_bytes()


def test_dirty_runs_marks_partial_blocks() -> None:
    size = 4 * BS + 100 * KiB  # a short last block
    extents = [
        Extent(0, CL, dirty=False),
        Extent(CL, CL, dirty=True),  # block 0, second cluster only
        Extent(2 * CL, BS, dirty=False),
        Extent(BS + 2 * CL, 2 * CL, dirty=True, zero=True),  # block 1, last two clusters (zeroed)
        Extent(2 * BS, CL, dirty=True),  # block 2, first cluster: the next block continues the run
        Extent(2 * BS + CL, 2 * BS - CL, dirty=False),
        Extent(4 * BS, 100 * KiB, dirty=True),  # the whole (short) last block
    ]
    pos = 0
    for e in extents:  # the list covers the disk, as sources give it
        assert e.start == pos
        pos = e.end
    assert pos == size
    runs = list(_dirty_runs(iter(extents), BS, size))
    assert runs == [
        (0, 3, {0: [(CL, 2 * CL)], 1: [(2 * CL, 4 * CL)], 2: [(0, CL)]}),
        (4, 5, {}),  # the short last block is covered whole
    ]
    # Two dirty extents that together cover a block (data then zeros) leave it whole.
    both = [Extent(0, CL, dirty=True), Extent(CL, BS - CL, dirty=True, zero=True), Extent(BS, BS, dirty=False)]
    assert list(_dirty_runs(iter(both), BS, 2 * BS)) == [(0, 1, {})]


@given(
    bs=st.sampled_from([4096, 65536]),
    cuts=st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=12),
    flags=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_dirty_runs_match_reference(bs: int, cuts: list[int], flags: list[bool]) -> None:
    """Same runs as ``_touched``; the partial map is exactly each touched block's dirty bytes when not all."""
    pos = 0
    extents = []
    for length, dirty in zip(cuts, flags, strict=False):
        extents.append(Extent(pos, length, dirty=dirty))
        pos += length
    size = pos
    mask = bytearray(size)  # 1 where dirty: the reference, byte by byte
    for e in extents:
        if e.dirty:
            mask[e.start : e.end] = b"\1" * e.length
    got = list(_dirty_runs(iter(extents), bs, size))
    assert [(f, e) for f, e, _ in got] == list(_touched(iter(extents), bs, lambda e: e.dirty))
    for first, end, partial in got:
        for idx in range(first, end):
            block = mask[idx * bs : (idx + 1) * bs]
            if all(block):
                assert idx not in partial
                continue
            parts = partial[idx]
            covered = bytearray(len(block))
            for lo, hi in parts:
                covered[lo:hi] = b"\1" * (hi - lo)
            assert covered == block
            assert all(a[1] < b[0] for a, b in itertools.pairwise(parts))  # merged, in order
            assert sum(hi - lo for lo, hi in _clean(parts, len(block))) == block.count(0)


def test_changed_takes_clean_ranges_from_base(store: StoreAPI, tmp_path: Path) -> None:
    # A source that reads clean ranges as zeros (a shallow layer) or as garbage: only dirty ranges count.
    size = 8 * BS + 64 * KiB
    rng = random.Random(5)
    base_data = bytearray(rng.randbytes(size))
    base_data[3 * BS : 4 * BS] = bytes(BS)  # a zero block in the base (ZERO_ID, no read_block)
    img = tmp_path / "disk.img"
    img.write_bytes(base_data)
    base = backup(store, FileSource(str(img))).id
    assert store.load_manifest(base)[3] == ZERO_ID

    expected = bytearray(base_data)
    layer = bytearray(size)  # clean ranges read as zeros, as from a qcow2 layer without backing
    layer[5 * BS + 10 : 5 * BS + 20] = b"garbage..."  # and here as garbage the pipeline must not take
    dirty = [
        (BS + CL, CL, rng.randbytes(CL)),  # block 1, second cluster: new data
        (2 * BS + 2 * CL, CL, bytes(CL)),  # block 2, a zeroed cluster: dirty zeros
        (3 * BS + CL, CL, rng.randbytes(CL)),  # block 3, data over a zero base block
        (8 * BS, 32 * KiB, rng.randbytes(32 * KiB)),  # the short last block, half dirty
    ]
    changed = []
    for off, n, data in dirty:
        layer[off : off + n] = data
        expected[off : off + n] = data
        changed.append(Extent(off, n, zero=not any(data)))
    img.write_bytes(layer)
    inc = backup(store, FileSource(str(img), changed=changed), base=base, changed=True)
    out = restored(store, inc.id, tmp_path / "out.img")
    assert out == bytes(expected)
    assert inc.stats["read"] == 3 * BS + 64 * KiB  # whole partly-dirty blocks, the last one short
    assert inc.stats["unchanged"] == size - inc.stats["read"]


def test_changed_full_view_same_as_full_backup(store: StoreAPI, tmp_path: Path) -> None:
    # Checkpoint method: the source is the whole disk, dirty extents 64 KiB granular and unaligned to blocks.
    size = 4 * MiB
    rng = random.Random(9)
    img = tmp_path / "disk.img"
    img.write_bytes(rng.randbytes(size))
    base = backup(store, FileSource(str(img))).id
    changed = []
    with open(img, "r+b") as f:
        for c in sorted(rng.sample(range(size // CL), 9)):
            f.seek(c * CL + 512)
            f.write(rng.randbytes(4096))
            changed.append(Extent(c * CL, CL))
    inc = backup(store, FileSource(str(img), changed=changed), base=base, changed=True).id
    full = backup(store, FileSource(str(img))).id
    a, b = store.load_manifest(inc), store.load_manifest(full)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert restored(store, inc, tmp_path / "out.img") == img.read_bytes()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ImageioDaemon]:
    d = ImageioDaemon(tmp_path / "imageio")
    try:
        yield d
    finally:
        d.close()


def imageio_spec(url: str, ca_pem: str, size: int, **kw: object) -> dict[str, object]:
    return {"type": "imageio", "transfer_url": url, "proxy_url": None, "ca_pem": ca_pem, "size": size,
            "format": "raw"} | kw  # fmt: skip


def test_shallow_qcow2_layer_over_imageio(store: StoreAPI, tmp_path: Path, daemon: ImageioDaemon) -> None:
    size = 4 * MiB
    disk = tmp_path / "disk.qcow2"
    make_image(disk, size, [(0, 2 * MiB, 0x41), (3 * MiB, MiB, 0x42)])
    nbd = QemuNbd(disk, tmp_path / "base.sock")
    try:
        url = daemon.add_ticket(nbd.url, size, ["read"])
        src = ImageioSource(imageio_spec(url, daemon.ca_pem, size))
        try:
            base = backup(store, src).id
        finally:
            src.close()
    finally:
        nbd.close()

    # The snapshot's new layer: a data cluster and a zeroed cluster in a block of base data, a block of base
    # data whose only change is a zeroed cluster (dirty zeros: read, not taken from the base), and a data
    # cluster in a block that is zero in the base.
    layer = tmp_path / "layer.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(layer))
    qemu_io(layer, "qcow2", f"write -P 0x66 {BS + CL} {CL}", f"write -z {BS + 3 * CL} {CL}",
            f"write -z {3 * BS + CL} {CL}", f"write -P 0x67 {2 * MiB + 2 * CL} {CL}")  # fmt: skip
    image = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(layer)}})
    nbd = QemuNbd("json:" + image, tmp_path / "layer.sock", fmt=None, allocation_depth=True)
    try:
        url = daemon.add_ticket(nbd.url, size, ["read"])
        src = ImageioSource(imageio_spec(url, daemon.ca_pem, size, shallow=True), shallow=True)
        try:
            inc = backup(store, src, base=base, changed=True)
        finally:
            src.close()
    finally:
        nbd.close()
    assert inc.stats["read"] == 3 * BS  # the three blocks the layer touches
    out = restored(store, inc.id, tmp_path / "out.img")
    assert out == raw_content(layer)  # the whole chain: base under the layer
