"""``Store.read_into``, the batched read path of restore, against ``read_block`` and on damaged stores.

Real stores on disk, real damage (bytes changed, packs removed); the fast path must return exactly what
``read_block`` returns and fail with the same one-line errors, falling back to good copies as it does.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.errors import StoreCorrupt
from mover.restore import restore
from mover.sinks.file import FileSink
from mover.store import Store, index, pack
from mover.store.simple import backup_bytes

BS = 64 * 1024


def image(blocks: int, seed: int, tail: int = 0) -> bytes:
    """Compressible, incompressible and zero blocks, optionally a short last block."""
    rnd = random.Random(seed)
    parts = []
    for i in range(blocks):
        kind = i % 3
        if kind == 0:
            parts.append(rnd.randbytes(BS // 2) + bytes(BS // 2))  # compresses: stored as zstd
        elif kind == 1:
            parts.append(rnd.randbytes(BS))  # does not: stored raw
        else:
            parts.append(bytes(BS))
    return b"".join(parts) + rnd.randbytes(tail)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.init(str(tmp_path / "store"), block_size=BS, pack_size=256 * 1024)  # several packs
    yield s
    s.close()


def ids_of(store: Store, backup_id: str) -> list[bytes]:
    m = store.load_manifest(backup_id)
    try:
        return [m[i] for i in range(len(m))]
    finally:
        m.close()


def read_all(store: Store, ids: list[bytes]) -> tuple[bytes, list[int]]:
    out = memoryview(bytearray(len(ids) * BS))
    lengths = store.read_into(ids, out)
    return b"".join(bytes(out[k * BS : k * BS + n]) for k, n in enumerate(lengths)), lengths


def data_ids(ids: list[bytes]) -> list[bytes]:
    return [i for i in ids if i != bytes(32)]


def flip(store: Store, block_id: bytes, at: int = 100) -> index.Entry:
    entry = store.index.lookup(block_id)
    assert entry is not None
    with open(pack.pack_path(store.path, entry.pack), "r+b") as f:
        f.seek(entry.offset + pack.RECORD.size + at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return entry


def test_read_into_matches_read_block(store: Store) -> None:
    data = image(30, 1, tail=1000)
    b = backup_bytes(store, data)
    ids = data_ids(ids_of(store, b.id))
    assert len({store.index.lookup(i).pack for i in ids}) > 1  # type: ignore[union-attr]
    rnd = random.Random(2)
    for _ in range(5):  # any order, repeats, runs spanning packs, the short block anywhere in the run
        pick = [rnd.choice(ids) for _ in range(rnd.randint(1, 25))]
        got, lengths = read_all(store, pick)
        assert got == b"".join(store.read_block(i) for i in pick)
        assert lengths == [len(store.read_block(i)) for i in pick]
    assert 1000 in read_all(store, ids)[1]


def test_flipped_bit_fails_with_one_line(store: Store) -> None:
    b = backup_bytes(store, image(9, 3))
    ids = data_ids(ids_of(store, b.id))
    flip(store, ids[2])
    with pytest.raises(StoreCorrupt, match="fails its checksum") as e:
        read_all(store, ids)
    assert "\n" not in str(e.value)
    assert read_all(store, ids[:2])[0] == b"".join(store.read_block(i) for i in ids[:2])
    out = memoryview(bytearray(len(ids) * BS))
    with pytest.raises(StoreCorrupt, match="fails its checksum"):  # without the hash, the checksum catches it
        store.read_into(ids, out, verify=False)


def test_a_good_copy_saves_a_corrupt_block(store: Store) -> None:
    data = image(6, 4)
    b = backup_bytes(store, data)
    ids = data_ids(ids_of(store, b.id))
    first = store.index.lookup(ids[0])
    assert first is not None
    w = pack.PackWriter(store.path)  # a second copy, as a concurrent writer would store it
    w.append(ids[0], store.read_block(ids[0]), first.raw_len, 0)
    w.finish()
    index.write_pack_segment(store.path, w.name, w.records)
    store.index.refresh()
    want = b"".join(store.read_block(i) for i in ids)
    entry = flip(store, ids[0])
    assert store.index.lookup(ids[0]) == entry  # the damaged copy is the one found first
    assert read_all(store, ids)[0] == want


def test_record_that_passes_its_checksum_but_not_its_hash(store: Store) -> None:
    """Other bytes under a right checksum (as a bug writing the wrong data would leave): the keyed hash catches it."""
    b = backup_bytes(store, image(3, 5))
    bid = data_ids(ids_of(store, b.id))[1]  # the incompressible block: stored raw, BS bytes
    entry = store.index.lookup(bid)
    assert entry is not None and entry.flags == 0 and entry.stored_len == BS
    other = random.Random(9).randbytes(BS)
    with open(pack.pack_path(store.path, entry.pack), "r+b") as f:
        f.seek(entry.offset)
        f.write(pack.RECORD.pack(bid, BS, BS, 0, pack.checksum(other)) + other)
    with pytest.raises(StoreCorrupt, match="fails its hash"):
        read_all(store, [bid])
    out = memoryview(bytearray(BS))
    assert store.read_into([bid], out, verify=False) == [BS] and out == other  # what verify=False skips


def test_missing_pack(store: Store) -> None:
    b = backup_bytes(store, image(9, 6))
    ids = data_ids(ids_of(store, b.id))
    entry = store.index.lookup(ids[-1])
    assert entry is not None
    os.unlink(pack.pack_path(store.path, entry.pack))
    with pytest.raises(StoreCorrupt, match="missing") as e:
        read_all(store, ids)
    assert "\n" not in str(e.value)


def test_restore_uses_the_fast_path_and_keeps_holes(store: Store, tmp_path: Path) -> None:
    data = image(40, 7, tail=5000)
    b = backup_bytes(store, data)
    out = tmp_path / "disk.raw"
    sink = FileSink(str(out))
    try:
        st = restore(store, b.id, sink, workers=3)  # type: ignore[arg-type]
    finally:
        sink.close()
    assert out.read_bytes() == data
    assert st["zero"] > 0 and os.stat(out).st_blocks * 512 < len(data) - st["zero"] // 2
    flip(store, data_ids(ids_of(store, b.id))[5])
    sink = FileSink(str(out), overwrite=True)
    try:
        with pytest.raises(StoreCorrupt, match="fails its checksum"):
            restore(store, b.id, sink)  # type: ignore[arg-type]
    finally:
        sink.close()
