"""The backup pipeline and restore against the real store: round trips bit for bit, sparse restores,
incrementals (``--changed`` and full re-read), several readers, loop devices, failures that save nothing."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mover.errors import Cancelled, SourceError, UsageError
from mover.kernels import ZERO_ID
from mover.pipeline import backup
from mover.progress import Progress
from mover.restore import restore
from mover.sinks.device import DeviceSink
from mover.sinks.file import FileSink
from mover.sources.base import Extent
from mover.sources.device import DeviceSource
from mover.sources.file import FileSource
from mover.store.api import StoreAPI
from mover.store.repo import Store

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB  # small blocks: many blocks per chunk and per test, quickly


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreAPI]:
    s = Store.open(str(tmp_path / "store"), create=True, block_size=BS)
    try:
        yield cast(StoreAPI, s)  # Store narrows save_backup to its own Manifest class
    finally:
        s.close()


def write_image(path: Path, size: int, seed: int = 0) -> None:
    """A sparse image: random runs, a repeated block (dedup within the disk), zeros written as data, holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        repeated = rng.randbytes(BS)
        pos = 0
        while pos < size:
            kind = rng.random()
            n = min(rng.randrange(1, 40) * 16 * KiB + rng.randrange(0, 3) * 512, size - pos)
            f.seek(pos)
            if kind < 0.35:
                f.write(rng.randbytes(n))
            elif kind < 0.5:
                f.write(b"ferry " * (n // 6) + b"x" * (n % 6))  # compressible
            elif kind < 0.6:
                f.write(bytes(n))  # zeros written out (allocated, not a hole)
            elif kind < 0.7 and pos % BS == 0 and n >= BS:
                f.write(repeated)
                n = BS
            pos += n  # else: leave a hole


def sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def do_backup(store: StoreAPI, path: Path, **kw: object) -> str:
    changed = kw.pop("changed_list", None)
    src = FileSource(str(path), changed=changed)  # type: ignore[arg-type]
    try:
        return backup(store, src, **kw).id  # type: ignore[arg-type]
    finally:
        src.close()


def do_restore(store: StoreAPI, backup_id: str, out: Path) -> dict[str, Any]:
    sink = FileSink(str(out))
    try:
        return restore(store, backup_id, sink)
    finally:
        sink.close()


def entries(store: StoreAPI, backup_id: str) -> list[bytes]:
    m = store.load_manifest(backup_id)
    return [m[i] for i in range(len(m))]


def test_round_trip_sparse(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    size = 24 * MiB + 12345  # the last block is short
    write_image(img, size)
    info_id = do_backup(store, img, labels={"disk": "d1"})
    info = store.backup(info_id)
    s = info.stats
    assert s["read"] < size  # holes were not read
    assert s["read"] + s["zero"] > size  # zero blocks written out were read, then found zero
    assert s["new"] + s["duplicate"] + s["zero"] == size
    assert s["duplicate"] > 0  # the repeated block
    assert 0 < s["stored"] < s["new"]  # compressed
    assert info.labels == {"disk": "d1"} and info.kind == "full"
    out = tmp_path / "out.img"
    st = do_restore(store, info_id, out)
    assert os.path.getsize(out) == size
    assert sha(out) == sha(img)
    # zeros (holes and written zeros) stay holes: the restore allocates no more than the data needs
    assert os.stat(out).st_blocks * 512 <= os.stat(img).st_blocks * 512
    assert st["written"] + st["zero"] == size


def test_empty_and_all_zero(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    bid = do_backup(store, img)
    assert set(entries(store, bid)) == {ZERO_ID}
    out = tmp_path / "out.img"
    do_restore(store, bid, out)
    assert os.stat(out).st_blocks == 0 and os.path.getsize(out) == 8 * MiB


def test_incremental_changed_equals_full(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    size = 16 * MiB
    write_image(img, size, seed=1)
    base = do_backup(store, img)
    # change ~3% of 64 KiB clusters, unaligned to the block, and report them as imageio would
    rng = random.Random(7)
    changed: list[Extent] = []
    with open(img, "r+b") as f:
        for c in sorted(rng.sample(range(size // (64 * KiB)), 8)):
            off = c * 64 * KiB + 4096
            f.seek(off)
            f.write(rng.randbytes(8192))
            changed.append(Extent(c * 64 * KiB, 64 * KiB))
    inc = do_backup(store, img, base=base, changed=True, changed_list=changed)
    info = store.backup(inc)
    assert info.kind == "incremental" and info.base == base
    assert info.stats["read"] == 8 * 64 * KiB  # only dirty blocks were read
    full = do_backup(store, img)  # a fresh full backup of the changed image, no base
    assert entries(store, inc) == entries(store, full)
    reread = do_backup(store, img, base=base)  # full re-read on top of the base
    s = store.backup(reread).stats
    assert s["new"] == 0  # the --changed backup stored the changes already
    assert entries(store, reread) == entries(store, full)
    out = tmp_path / "out.img"
    do_restore(store, inc, out)
    assert sha(out) == sha(img)


def test_reread_stores_only_changes(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    write_image(img, 16 * MiB, seed=2)
    base = do_backup(store, img)
    with open(img, "r+b") as f:
        f.seek(5 * BS)
        f.write(os.urandom(BS))
    bid = do_backup(store, img, base=base)
    s = store.backup(bid).stats
    assert s["new"] == BS
    assert s["read"] == store.backup(base).stats["read"] + (BS if entries(store, base)[5] == ZERO_ID else 0)


def test_readers_and_workers_agree(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    write_image(img, 20 * MiB, seed=3)
    one = do_backup(store, img, readers=1, workers=1)
    many = do_backup(store, img, readers=4, workers=4)
    assert entries(store, one) == entries(store, many)
    assert store.backup(many).stats["new"] == 0  # all blocks were in the store already


def test_changed_needs_base(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    write_image(img, MiB)
    with pytest.raises(UsageError):
        do_backup(store, img, changed=True, changed_list=[Extent(0, BS)])


def test_source_shrinks_mid_backup(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(48 * MiB))
    truncated = threading.Event()

    def shrink(_: dict[str, object]) -> None:
        if not truncated.is_set():
            truncated.set()
            os.truncate(img, 0)  # the source vanishes under the readers

    progress = Progress(listener=shrink, interval=0)
    with pytest.raises(SourceError, match="ended at offset"):
        do_backup(store, img, progress=progress)
    assert truncated.is_set()
    assert list(store.backups()) == []  # nothing saved


def test_cancel(store: StoreAPI, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(32 * MiB))
    cancel = threading.Event()
    progress = Progress(listener=lambda _: cancel.set(), interval=0)
    with pytest.raises(Cancelled):
        do_backup(store, img, progress=progress, cancel=cancel)
    assert list(store.backups()) == []


@pytest.fixture
def loop_pair(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """Two real loop devices: one over a sparse image with data, one over 16 MiB of random junk."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write_image(a, 16 * MiB, seed=4)
    b.write_bytes(os.urandom(16 * MiB))
    devs: list[str] = []
    try:
        for f in (a, b):
            devs.append(subprocess.run(["losetup", "-f", "--show", str(f)], check=True, capture_output=True,
                                       text=True).stdout.strip())
        yield devs[0], devs[1], a
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)


def test_loop_device_source_and_sink(store: StoreAPI, loop_pair: tuple[str, str, Path]) -> None:
    src_dev, dst_dev, img = loop_pair
    src = DeviceSource(src_dev, direct=True)
    try:
        info = backup(store, src, readers=3)
    finally:
        src.close()
    assert info.stats["read"] == 16 * MiB  # a device has no holes: everything is read
    assert info.stats["zero"] > 0  # zero blocks found by the pipeline
    sink = DeviceSink(dst_dev)  # not fresh: zero ranges must overwrite the junk
    try:
        restore(store, info.id, sink)
    finally:
        sink.close()
    assert sha(dst_dev) == sha(img)


@given(
    bs=st.sampled_from([512, 4096, 65536]),
    cuts=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=12),
    flags=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_touched_blocks_match_reference(bs: int, cuts: list[int], flags: list[bool]) -> None:
    """``_touched`` finds exactly the blocks any wanted extent overlaps, as maximal runs."""
    from mover.pipeline import _touched

    pos = 0
    extents = []
    for length, want in zip(cuts, flags, strict=False):
        extents.append(Extent(pos, length, zero=not want, dirty=want))
        pos += length  # contiguous, as sources report them
    want_blocks: set[int] = set()
    for e in extents:
        if e.dirty:
            want_blocks.update(range(e.start // bs, (e.end + bs - 1) // bs))
    runs = list(_touched(iter(extents), bs, lambda e: e.dirty))
    got: set[int] = set()
    for first, end in runs:
        assert first < end
        got.update(range(first, end))
    assert got == want_blocks
    for (_, a_end), (b_first, _) in itertools.pairwise(runs):
        assert a_end < b_first  # maximal: runs neither overlap nor touch


def test_reread_sees_data_turned_into_holes(store: StoreAPI, tmp_path: Path) -> None:
    """A full re-read on top of a base: blocks that became holes (discarded) must be zero, not the base's."""
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    data = os.urandom(10 * BS)
    for path, n in ((old, 10), (new, 4)):
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
            f.write(data[: n * BS])
    base = do_backup(store, old)
    bid = do_backup(store, new, base=base)
    ids = entries(store, bid)
    assert ids[:4] == entries(store, base)[:4]
    assert set(ids[4:]) == {ZERO_ID}
    out = tmp_path / "out.img"
    do_restore(store, bid, out)
    assert sha(out) == sha(new)
