"""The store on a local directory: round trips, dedup, zero blocks, incrementals, format and metadata."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest

from mover.errors import NotFound, StoreCorrupt, StoreError
from mover.store import ZERO_ID, BackupInfo, Store
from mover.store import config as cfg
from mover.store import manifest as mf
from mover.store.simple import backup_bytes, backup_file, restore_bytes, restore_file

BS = 64 * 1024  # the block size of the ``store`` fixture (tests/mover/conftest.py)


def image(blocks: int, seed: int = 1) -> bytearray:
    """Random-looking but compressible data: blocks repeat a random 4 KiB pattern of their own."""
    rnd = random.Random(seed)
    out = bytearray()
    for _ in range(blocks):
        out += rnd.randbytes(4096) * (BS // 4096 // 2) + rnd.randbytes(BS // 2)
    return out


def stored_bytes(store: Store) -> int:
    return sum(f.stat().st_size for f in Path(store.path, "packs").rglob("*.pack"))


def test_round_trip_with_short_last_block(store: Store) -> None:
    data = image(10) + b"tail" * 100
    info = backup_bytes(store, data)
    assert info.id and info.size == len(data) and info.kind == "full"
    assert restore_bytes(store, info.id) == data
    assert store.backup(info.id).size == len(data)
    assert [b.id for b in store.backups()] == [info.id]


def test_zero_blocks_are_not_stored(store: Store) -> None:
    data = image(2) + bytes(BS * 30) + image(1, seed=2)
    info = backup_bytes(store, data)
    m = store.load_manifest(info.id)
    assert sum(m[i] == ZERO_ID for i in range(len(m))) == 30
    m.close()
    assert len(store.index) == 3
    assert info.stats["zero"] == 30
    assert stored_bytes(store) < 3 * BS + 4096  # only the three data blocks (compressed) plus headers
    assert restore_bytes(store, info.id) == data


def test_all_zero_disk_stores_nothing(store: Store) -> None:
    info = backup_bytes(store, bytes(BS * 8))
    assert len(store.index) == 0 and stored_bytes(store) == 0
    assert restore_bytes(store, info.id) == bytes(BS * 8)


def test_dedup_across_backups_and_within_one(store: Store) -> None:
    data = image(20)
    first = backup_bytes(store, data)
    size1 = stored_bytes(store)
    second = backup_bytes(store, data)
    assert stored_bytes(store) == size1
    assert second.stats["stored"] == 0 and second.stats["duplicate"] == 20
    same = image(1) * 5  # five copies of one block
    third = backup_bytes(store, same)
    assert third.stats["stored"] == 0
    assert restore_bytes(store, first.id) == data and restore_bytes(store, third.id) == same


def test_incremental_is_a_full_manifest(store: Store) -> None:
    data = image(16)
    full = backup_bytes(store, data)
    changed = bytearray(data)
    changed[3 * BS : 4 * BS] = image(1, seed=99)
    # an incremental as --changed does it: start from the base manifest, set only the changed block
    w = store.writer()
    m = store.new_manifest(len(changed), base=full.id)
    bid = store.block_id(changed[3 * BS : 4 * BS])
    assert w.add(bid, changed[3 * BS : 4 * BS]) > 0
    m[3] = bid
    w.commit()
    inc = store.save_backup(BackupInfo(id="", size=len(changed), block_size=BS, created=0.0, base=full.id,
                                       kind="incremental"), m)
    m.close()
    store.delete_backup(full.id)  # the incremental does not need its base
    store.prune()
    assert restore_bytes(store, inc.id) == changed
    assert store.check(read_data=True)["ok"]


def test_incremental_of_a_grown_disk(store: Store) -> None:
    full = backup_bytes(store, image(4))
    m = store.new_manifest(8 * BS, base=full.id)
    assert len(m) == 8 and m[5] == ZERO_ID and m[0] != ZERO_ID
    m.close()


def test_block_ids_are_keyed_per_store(tmp_path: Path, store: Store) -> None:
    other = Store.init(str(tmp_path / "other"), block_size=BS)
    data = image(1)
    assert store.block_id(data) != other.block_id(data)
    assert store.block_id(data) == store.block_ids(data)[0]
    other.close()


def test_hmac_store_round_trip(tmp_path: Path) -> None:
    with Store.init(str(tmp_path / "h"), block_size=BS, hash="hmac-sha256") as s:
        data = image(5)
        info = backup_bytes(s, data)
        assert restore_bytes(s, info.id) == data
        assert s.check(read_data=True)["ok"]


def test_file_round_trip_is_sparse(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    data = image(4) + bytes(BS * 64) + image(2, seed=3)
    src.write_bytes(data)
    info = backup_file(store, str(src))
    dst = tmp_path / "restored.raw"
    restore_file(store, info.id, str(dst))
    assert dst.read_bytes() == data
    assert os.stat(dst).st_blocks * 512 < len(data) // 2  # the zero run is a hole


def test_save_refuses_a_manifest_naming_unknown_blocks(store: Store) -> None:
    m = store.new_manifest(2 * BS)
    m[0] = b"\x01" * 32
    with pytest.raises(StoreError, match="not in the store"):
        store.save_backup(BackupInfo(id="", size=2 * BS, block_size=BS, created=0.0), m)
    assert list(store.backups()) == []


def test_aborted_writer_leaves_nothing(store: Store) -> None:
    w = store.writer()
    data = image(1)
    w.add(store.block_id(data), data)
    w.abort()
    assert not store.has(store.block_id(data))
    assert os.listdir(os.path.join(store.path, "tmp")) == []
    assert stored_bytes(store) == 0


def test_writer_merges_its_segments_on_commit(store: Store) -> None:
    backup_bytes(store, image(40))  # 40 blocks of 64 KiB into 1 MiB packs: several packs
    assert len(list(Path(store.path, "packs").rglob("*.pack"))) > 1
    assert len(os.listdir(os.path.join(store.path, "index"))) == 1


def test_unknown_backup(store: Store) -> None:
    with pytest.raises(NotFound):
        store.load_manifest("nope")
    with pytest.raises(NotFound):
        store.delete_backup("nope")
    with pytest.raises(NotFound):
        store.backup("../config.json")


def test_newer_format_is_refused(store: Store) -> None:
    path = os.path.join(store.path, "config.json")
    raw = json.loads(Path(path).read_text())
    raw["version"] = cfg.FORMAT_VERSION + 1
    Path(path).write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="newer than this Ferry supports"):
        Store.open(store.path)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a Ferry store"):
        Store.open(str(tmp_path))
    with pytest.raises(StoreError, match="already exists"):
        Store.init(str(tmp_path / "s")).close()
        Store.init(str(tmp_path / "s"))


def test_open_create_is_idempotent(tmp_path: Path) -> None:
    a = Store.open(str(tmp_path / "s"), create=True, block_size=BS)
    b = Store.open(str(tmp_path / "s"), create=True)
    assert a.config.id == b.config.id and b.block_size == BS
    a.close()
    b.close()


def test_bad_block_size_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="power of two"):
        Store.init(str(tmp_path / "s"), block_size=100_000)


def test_key_is_private(store: Store) -> None:
    assert os.stat(os.path.join(store.path, "key")).st_mode & 0o077 == 0


def test_corrupt_manifest_detected(store: Store) -> None:
    info = backup_bytes(store, image(3))
    path = os.path.join(store.path, "backups", info.id, mf.MANIFEST_FILE)
    raw = bytearray(Path(path).read_bytes())
    raw[mf.HEADER.size + 5] ^= 1
    Path(path).write_bytes(raw)
    with pytest.raises(StoreCorrupt, match="checksum"):
        store.load_manifest(info.id)
    report = store.check()
    assert not report["ok"] and report["broken_backups"][0]["id"] == info.id


def test_threads_share_one_writer_without_duplicates(store: Store) -> None:
    """Four threads add overlapping blocks while packs fill and publish outside the writer's lock."""
    blocks = [image(1, seed=s) for s in range(48)]
    ids = [store.block_id(b) for b in blocks]
    w = store.writer()
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(48):
                i = (k + offset) % 48
                w.add(ids[i], blocks[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n * 12,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.commit()
    assert not errors
    assert w.packs_written > 1
    assert len(store.index) == 48  # every block once, though four threads offered each
    assert all(store.read_block(i) == b for i, b in zip(ids, blocks, strict=True))


def test_many_backups_keep_the_index_compact(store: Store) -> None:
    ids = [backup_bytes(store, image(2, seed=100 + n)).id for n in range(20)]
    assert len(store.index.segments) <= 16
    assert len(os.listdir(os.path.join(store.path, "index"))) == len(store.index.segments)
    assert len(store.index) == 40
    assert restore_bytes(store, ids[0]) == image(2, seed=100)
    report = store.check(read_data=True)
    assert report["ok"] and report["counts"]["segments"] == len(store.index.segments)
    assert report["counts"]["blocks"] == report["counts"]["blocks_read"] == 40


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_manifest_of_a_huge_disk_costs_only_touched_pages(store: Store) -> None:
    before = rss()
    m = store.new_manifest(1 << 40)  # 1 TiB: 16M entries, 512 MiB of ids at 64 KiB blocks
    assert len(m) == (1 << 40) // BS and m[len(m) - 1] == ZERO_ID
    m[12345] = b"\x07" * 32
    grown = rss() - before
    m.close()
    assert grown < 16 << 20, grown


def test_prune_interrupted_after_publishing_keeps_everything(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune that dies right after its new index is published (before removing the old one)."""
    from mover.store import fsutil

    keep = backup_bytes(store, image(6, seed=40))
    gone = backup_bytes(store, image(6, seed=41))
    store.delete_backup(gone.id)

    def crash(path: str) -> None:
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(fsutil, "remove", crash)
    with pytest.raises(KeyboardInterrupt):
        store.prune()
    monkeypatch.undo()
    fresh = Store.open(store.path)
    report = fresh.check(read_data=True)
    assert report["ok"], report
    assert restore_bytes(fresh, keep.id) == image(6, seed=40)
    fresh.prune()
    assert len(fresh.index) == 6 and fresh.check(read_data=True)["warnings"] == []
    fresh.close()


def test_threads_read_through_a_tiny_descriptor_cache(store: Store) -> None:
    """Evicting a pack descriptor another thread is reading from must not break that read."""
    from mover.store import files

    infos = [backup_bytes(store, image(6, seed=200 + n)) for n in range(5)]  # five backups, five packs
    store._packs = files.PackFiles(store.path, limit=2)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for r in range(4):
                n = (k + r) % 5
                assert restore_bytes(store, infos[n].id) == image(6, seed=200 + n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_prune_deletes_and_rewrites_packs(store: Store) -> None:
    base = image(20, seed=300)
    a = backup_bytes(store, base)
    changed = bytearray(base)
    changed[: 5 * BS] = image(5, seed=301)  # a quarter of a's blocks replaced
    b = backup_bytes(store, changed)
    c = backup_bytes(store, image(4, seed=302))
    before = stored_bytes(store)
    store.delete_backup(a.id)
    store.delete_backup(c.id)
    result = store.prune()
    assert result["packs_rewritten"] >= 1 and result["packs_deleted"] >= 1
    assert result["blocks_removed"] == 5 + 4 and result["blocks_kept"] == 20 and result["missing_blocks"] == 0
    assert stored_bytes(store) < before * 0.7
    assert len(store.index) == 20 and len(store.index.segments) == 1
    assert restore_bytes(store, b.id) == changed
    assert store.check(read_data=True)["ok"]
    assert store.prune()["packs_rewritten"] == 0  # nothing left to do


def test_named_objects(store: Store) -> None:
    ovf = b"<ovf:Envelope>...</ovf:Envelope>"
    store.put_object("vm", "vm-1@2026", ovf)
    store.put_object("vm", "vm-1@2026", ovf + b"!")  # replaced atomically
    assert store.get_object("vm", "vm-1@2026") == ovf + b"!"
    assert store.object_names("vm") == ["vm-1@2026"] and store.object_names("none") == []
    with pytest.raises(StoreError, match="invalid object name"):
        store.put_object("vm", "../config.json", b"x")
    store.delete_object("vm", "vm-1@2026")
    with pytest.raises(NotFound):
        store.get_object("vm", "vm-1@2026")
    assert os.listdir(os.path.join(store.path, "tmp")) == []


def test_has_many(store: Store) -> None:
    data = image(3, seed=500)
    backup_bytes(store, data)
    ids = store.block_ids(data)
    probe = b"".join([ids[0], ZERO_ID, b"\x05" * 32, ids[2]])
    assert store.has_many(probe) == bytearray([1, 1, 0, 1])
    assert [store.has(probe[i : i + 32]) for i in range(0, 128, 32)] == [True, True, False, True]


def test_open_create_reports_bad_parameters_at_once(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="power of two"):
        Store.open(str(tmp_path / "s"), create=True, block_size=3)
