"""The store's writer under concurrent workers: records built outside the lock stay whole and checked."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.store import Store, pack
from mover.store import writer as writer_mod

BS = 64 * 1024  # the block size of the ``store`` fixture (tests/mover/conftest.py)


def block(i: int) -> bytes:
    """Half compressible, half random: some blocks end up zstd, some (seeded differently) raw."""
    rnd = random.Random(i)
    if i % 3 == 0:
        return rnd.randbytes(BS)  # incompressible: stored raw
    return rnd.randbytes(256) * (BS // 512) + rnd.randbytes(BS // 2)


def test_concurrent_adds_give_whole_records_with_good_checksums(store: Store) -> None:
    w = store.writer()
    blocks = {store.block_id(block(i)): block(i) for i in range(120)}
    items = list(blocks.items())
    errors: list[BaseException] = []

    def work(part: list[tuple[bytes, bytes]]) -> None:
        try:
            for bid, data in part:
                w.add(bid, data)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(items[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    w.commit()
    # Every record in every pack: header, lengths and checksum hold, each block once.
    seen: dict[bytes, int] = {}
    packs = list(Path(store.path, "packs").rglob("*.pack"))
    assert len(packs) > 1  # several packs filled and published while the others appended
    for p in packs:
        fd = os.open(p, os.O_RDONLY)
        try:
            for rec in pack.scan(str(p), store.path):
                bid, raw_len, flags, _ = pack.read_record(fd, rec.offset, rec.stored_len, str(p), store.path)
                assert bid == rec.id and raw_len == BS
                assert flags == (0 if rec.stored_len == BS else pack.FLAG_ZSTD)
                seen[bid] = seen.get(bid, 0) + 1
        finally:
            os.close(fd)
    assert seen == dict.fromkeys(blocks, 1)
    for bid, data in items:
        assert store.read_block(bid) == data


def test_checksum_is_computed_outside_the_lock(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record checksum (a pass over the stored bytes) runs in the calling thread without the writer's
    lock: another thread can append meanwhile (it used to run inside ``PackWriter.append`` under it)."""
    w = store.writer()
    held: list[bool] = []
    real = pack.checksum

    def spy(data: bytes | bytearray | memoryview) -> int:
        held.append(w._lock.locked())
        return real(data)

    monkeypatch.setattr(writer_mod.pack, "checksum", spy)
    for i in range(5):
        data = block(i)
        w.add(store.block_id(data), data)
    w.commit()
    assert held == [False] * 5
    monkeypatch.undo()
    report = store.check(read_data=True)
    assert report["ok"] and not report["problems"], report


def test_same_blocks_from_many_threads_are_stored_once(store: Store) -> None:
    """Each worker appends to a pack of its own; a block claimed by one is skipped by the others."""
    w = store.writer()
    items = [(store.block_id(block(i)), block(i)) for i in range(40)]
    written: list[int] = []
    barrier = threading.Barrier(4)

    def work(seed: int) -> None:
        part = items[:]
        random.Random(seed).shuffle(part)
        barrier.wait()
        written.append(sum(w.add(bid, data) for bid, data in part))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.commit()
    one_copy = sum(pack.RECORD.size + len(r) for r in _stored_records(store))
    assert sum(written) == one_copy
    assert sorted(r for r in _record_ids(store)) == sorted(bid for bid, _ in items)  # each id once
    for bid, data in items:
        assert store.read_block(bid) == data


def test_a_failed_append_fails_the_commit(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append that fails (here ENOSPC on the 7th) sticks: the next adds and the commit raise it, since
    another worker may already have counted that block as stored."""
    w = store.writer()
    calls = []
    real = writer_mod._PackWriter.append_built

    def flaky(self: writer_mod._PackWriter, *args: object, **kw: object) -> pack.Record:
        calls.append(w._lock.locked())
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_mod._PackWriter, "append_built", flaky)
    with pytest.raises(OSError):
        for i in range(20):
            data = block(i)
            w.add(store.block_id(data), data)
    assert calls == [False] * 7  # appends run outside the writer's lock
    with pytest.raises(OSError):
        w.add(store.block_id(block(30)), block(30))
    with pytest.raises(OSError):
        w.commit()
    w.abort()
    assert not list(Path(store.path, "packs").rglob("*.pack"))  # nothing of it published
    assert not list(Path(store.path, "tmp").iterdir())


def _stored_records(store: Store) -> Iterator[bytes]:
    for p in Path(store.path, "packs").rglob("*.pack"):
        fd = os.open(p, os.O_RDONLY)
        try:
            for rec in pack.scan(str(p), store.path):
                yield pack.read_record(fd, rec.offset, rec.stored_len, str(p), store.path)[3]
        finally:
            os.close(fd)


def _record_ids(store: Store) -> Iterator[bytes]:
    for p in Path(store.path, "packs").rglob("*.pack"):
        for rec in pack.scan(str(p), store.path):
            yield rec.id


def test_workers_that_do_not_meet_fill_one_pack(store: Store) -> None:
    """Open packs are handed out free one first: two workers taking turns (a small incremental's
    pattern) share one pack instead of leaving one small pack each."""
    w = store.writer()
    turn = threading.Lock()

    def work(part: range) -> None:
        for i in part:
            with turn:
                data = block(i)
                w.add(store.block_id(data), data)

    threads = [threading.Thread(target=work, args=(range(k, 10, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.commit()
    assert len(list(Path(store.path, "packs").rglob("*.pack"))) == 1
    for i in range(10):
        assert store.read_block(store.block_id(block(i))) == block(i)
