"""A damaged store: flipped bit in a pack, truncated index, missing pack, full filesystem.

Each damage is real (bytes changed or files removed on disk, a real small ext4 filesystem on a loop
device), each gives one clear error line, and ``check`` names the backups it breaks.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.errors import StoreCorrupt, StoreFull
from mover.store import Store, index, pack
from mover.store.simple import backup_bytes, restore_bytes

BS = 64 * 1024  # the block size of the ``store`` fixture (tests/mover/conftest.py)


def image(blocks: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(BS // 2) + bytes(BS // 2) for _ in range(blocks))


def packs(store: Store) -> list[Path]:
    return sorted(Path(store.path, "packs").rglob("*.pack"))


def segments(store: Store) -> list[Path]:
    return sorted(Path(store.path, "index").glob("*.idx"))


def test_flipped_bit_in_a_pack_names_the_broken_backup(store: Store) -> None:
    a = backup_bytes(store, image(8, 1))
    b = backup_bytes(store, image(8, 2))
    # the first block of backup b: find its record and flip one bit of its data
    m = store.load_manifest(b.id)
    entry = store.index.lookup(m[0])
    m.close()
    assert entry is not None
    path = pack.pack_path(store.path, entry.pack)
    with open(path, "r+b") as f:
        f.seek(entry.offset + pack.RECORD.size + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    assert store.check()["ok"]  # structure is intact: only reading the data finds it
    report = store.check(read_data=True)
    assert not report["ok"] and report["corrupt_blocks"] == 1
    assert [x["id"] for x in report["broken_backups"]] == [b.id]
    assert report["broken_backups"][0]["corrupt"] == 1
    assert report["damaged_blocks"][0]["pack"] == entry.pack
    with pytest.raises(StoreCorrupt, match="fails its checksum") as e:
        restore_bytes(store, b.id)
    assert "\n" not in str(e.value)
    assert restore_bytes(store, a.id) == image(8, 1)  # the other backup is untouched


def test_a_good_copy_saves_a_corrupt_block(store: Store) -> None:
    """Two writers may store one block twice: a flipped bit in one copy loses nothing."""
    data = image(4, 3)
    a = backup_bytes(store, data)
    # store the same blocks again as a second writer that did not see the first would
    entry = store.index.lookup(store.block_id(data[:BS]))
    assert entry is not None
    w = pack.PackWriter(store.path)
    w.append(entry.id, data[:BS], BS, 0)
    w.finish()
    index.write_pack_segment(store.path, w.name, w.records)
    store.index.refresh()
    with open(pack.pack_path(store.path, entry.pack), "r+b") as f:
        f.seek(entry.offset + pack.RECORD.size)
        f.write(b"\xff\xff")
    report = store.check(read_data=True)
    assert report["corrupt_blocks"] == 1 and report["broken_backups"] == []
    assert restore_bytes(store, a.id) == data


def test_truncated_index_segment(store: Store) -> None:
    a = backup_bytes(store, image(6, 4))
    b = backup_bytes(store, image(6, 5))
    seg = [s for s in segments(store) if b.id and s.stem != ""]
    # truncate the segment that indexes backup b's blocks
    m = store.load_manifest(b.id)
    hit = store.index.find(m[0])
    m.close()
    assert hit is not None
    target = Path(hit[0].path)
    assert target in seg
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size - 100)
    fresh = Store.open(store.path)
    report = fresh.check()
    assert not report["ok"]
    assert report["problems"][0]["kind"] == "index" and "truncated" in report["problems"][0]["detail"]
    assert [x["id"] for x in report["broken_backups"]] == [b.id]
    with pytest.raises(StoreCorrupt, match="missing"):
        restore_bytes(fresh, b.id)
    with pytest.raises(StoreCorrupt, match="damaged"):
        fresh.prune()  # never prune with part of the index unreadable: it would drop live blocks
    # the packs still hold every block: repair rebuilds the index from them
    assert fresh.repair()["blocks_indexed"] == 6
    assert fresh.check(read_data=True)["ok"]
    assert restore_bytes(fresh, b.id) == image(6, 5) and restore_bytes(fresh, a.id) == image(6, 4)
    fresh.close()


def test_missing_pack(store: Store) -> None:
    a = backup_bytes(store, image(4, 6))
    b = backup_bytes(store, image(4, 7))
    m = store.load_manifest(a.id)
    entry = store.index.lookup(m[0])
    m.close()
    assert entry is not None
    os.unlink(pack.pack_path(store.path, entry.pack))
    report = store.check()
    assert not report["ok"]
    assert {"kind": "pack", "object": entry.pack} == {k: report["problems"][0][k] for k in ("kind", "object")}
    assert [x["id"] for x in report["broken_backups"]] == [a.id]
    assert report["broken_backups"][0]["missing"] == 4
    with pytest.raises(StoreCorrupt, match=f"pack {entry.pack} is missing"):
        restore_bytes(store, a.id)
    assert restore_bytes(store, b.id) == image(4, 7)


# --- a full filesystem: a small ext4 on a loop device ------------------------------------------------


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 filesystem mounted on ``tmp_path/mnt``; always unmounted and detached."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a loop-mounted filesystem")
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(24 << 20)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(img))
    try:
        dev = _run("losetup", "-f", "--show", str(img))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr.strip()}")
    try:
        _run("mount", dev, str(mnt))
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], check=False).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=False)  # never leave a mount behind
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_store_full(small_fs: Path) -> None:
    s = Store.init(str(small_fs / "store"), block_size=BS, pack_size=2 << 20)
    try:
        small = image(16, 8)
        first = backup_bytes(s, small)
        rnd = random.Random(9)
        big = rnd.randbytes(40 << 20)  # incompressible and larger than the filesystem
        with pytest.raises(StoreFull, match="no space left on device") as e:
            backup_bytes(s, big)
        assert "\n" not in str(e.value) and e.value.retryable
        # nothing partial is visible, nothing committed is lost
        assert os.listdir(os.path.join(s.path, "tmp")) == []
        assert [b.id for b in s.backups()] == [first.id]
        assert restore_bytes(s, first.id) == small
        report = s.check(read_data=True)
        assert report["ok"] and report["broken_backups"] == []
        s.prune()  # frees the packs the failed backup committed before the disk filled
        assert restore_bytes(s, first.id) == small
        assert s.check(read_data=True)["warnings"] == []

        # prune on a full disk: rewriting a half-dead pack needs room, deleting whole dead packs does not
        old = backup_bytes(s, image(40, 10))
        shared = image(40, 10)[: 20 * BS] + image(20, 11)  # keeps half of old's blocks
        keep = backup_bytes(s, shared)
        s.delete_backup(old.id)
        s.delete_backup(first.id)
        filler = small_fs / "filler"
        with open(filler, "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\xff" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        result = s.prune()
        assert result.get("rewrite_skipped_no_space") == 1 and result["packs_rewritten"] == 0
        assert restore_bytes(s, keep.id) == shared and s.check(read_data=True)["ok"]
        filler.unlink()
        assert s.prune()["packs_rewritten"] >= 1  # with room again, the half-dead pack is rewritten
        assert restore_bytes(s, keep.id) == shared and s.check(read_data=True)["ok"]
    finally:
        s.close()


def test_prune_keeps_unindexed_packs_while_blocks_are_missing(store: Store) -> None:
    """A lost segment makes its pack look like garbage: prune must keep it, repair brings it back."""
    a = backup_bytes(store, image(5, 12))
    for seg in segments(store):
        seg.unlink()
    fresh = Store.open(store.path)
    result = fresh.prune()
    assert result["missing_blocks"] == 5 and result["unindexed_packs_kept"] == 1
    assert len(packs(fresh)) == 1
    assert fresh.repair()["blocks_indexed"] == 5
    assert restore_bytes(fresh, a.id) == image(5, 12) and fresh.check(read_data=True)["ok"]
    fresh.close()
