"""Several processes on one store: concurrent writers, prune during a backup, two prunes, SIGKILL.

Workers are real separate processes (``python -c`` on the repo's code), so the flock-based protocol is
exercised across processes exactly as movers use it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.errors import StoreLocked
from mover.store import Store
from mover.store.simple import backup_bytes, restore_bytes

BS = 64 * 1024
ROOT = str(Path(__file__).resolve().parents[2])

# A worker: backs up a deterministic image (seeded) into the store; with pause=stdin it waits for a line
# between adding the blocks and committing (so the parent can act while the backup is in flight); with
# pause=stream it adds new blocks forever (to be killed in the middle of writing a pack).
WORKER = r"""
import random, sys, time
from mover.store import Store, BackupInfo, ZERO_ID
from mover import kernels
path, seed, blocks, shared, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = Store.open(path)
bs = s.block_size
rnd = random.Random(seed)
common = random.Random(0)
data = bytearray()
for i in range(blocks):
    src = common if i < shared else rnd  # the first `shared` blocks are the same in every worker
    data += src.randbytes(bs // 2) + bytes(bs // 2)
w = s.writer()
if pause == "stream":  # add new blocks until killed: packs fill, publish, and one is always half-written
    n = 0
    while True:
        block = rnd.randbytes(bs // 2) + bytes(bs // 2)
        w.add(s.block_id(block), block)
        n += 1
        if n == 20:
            print("added", flush=True)
m = s.new_manifest(len(data))
for i, bid in enumerate(s.block_ids(data)):
    w.add(bid, memoryview(data)[i * bs:(i + 1) * bs])
    m[i] = bid
print("added", flush=True)
if pause == "stdin":
    sys.stdin.readline()
w.commit()
info = s.save_backup(BackupInfo(id="", size=len(data), block_size=bs, created=time.time()), m)
s.close()
print("saved", info.id, flush=True)
"""


def image(seed: int, blocks: int, shared: int) -> bytes:
    """The image WORKER builds for ``seed``."""
    rnd, common = random.Random(seed), random.Random(0)
    out = bytearray()
    for i in range(blocks):
        src = common if i < shared else rnd
        out += src.randbytes(BS // 2) + bytes(BS // 2)
    return bytes(out)


def worker(path: str, seed: int, blocks: int, shared: int = 0, pause: str = "no") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, path, str(seed), str(blocks), str(shared), pause],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.init(str(tmp_path / "store"), block_size=BS, pack_size=512 * 1024)
    procs: list[subprocess.Popen[str]] = []
    s.procs = procs  # type: ignore[attr-defined]
    yield s
    for p in procs:  # never leave a worker behind, whatever the test did
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f:
                f.close()
    s.close()


def start(store: Store, *args: object, **kw: object) -> subprocess.Popen[str]:
    p = worker(store.path, *args, **kw)  # type: ignore[arg-type]
    store.procs.append(p)  # type: ignore[attr-defined]
    return p


def saved_id(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    lines = p.stdout.read().split()
    assert p.wait(timeout=60) == 0
    return lines[lines.index("saved") + 1]


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    procs = {seed: start(store, seed, 40, 10) for seed in range(1, 5)}
    ids = {seed: saved_id(p) for seed, p in procs.items()}
    for seed, bid in ids.items():
        assert restore_bytes(store, bid) == image(seed, 40, 10)
    report = store.check(read_data=True)
    assert report["ok"], report
    # 4 x 30 own blocks + the 10 shared ones (racing writers may each have stored a shared block once)
    assert 130 <= report["counts"]["blocks"] <= 130 + 3 * 10
    store.prune()
    assert len(store.index) == 130
    assert store.check(read_data=True)["ok"]


def test_prune_waits_for_a_running_backup(store: Store) -> None:
    old = backup_bytes(store, image(7, 20, 20))  # every block also in the worker's image (shared=20)
    p = start(store, 8, 30, 20, pause="stdin")
    assert p.stdout is not None and p.stdout.readline().strip() == "added"  # deduplicated against `old`
    store.delete_backup(old.id)  # its blocks are now unreferenced... except by the backup in flight

    with pytest.raises(StoreLocked, match="backup is running"):
        Store.open(store.path).prune(wait=0)

    result: dict[str, object] = {}
    pruner = Store.open(store.path)
    t = threading.Thread(target=lambda: result.update(pruner.prune(wait=30)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "prune must wait while a backup holds the store"
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    new = saved_id(p)
    t.join(30)
    pruner.close()
    assert not t.is_alive() and result["missing_blocks"] == 0
    assert restore_bytes(store, new) == image(8, 30, 20)
    assert store.check(read_data=True)["ok"]


def test_two_prunes_at_once(store: Store) -> None:
    backup_bytes(store, image(3, 10, 0))
    holder = store.new_manifest(BS)  # a backup in flight: the first prune waits on it, holding the prune lock
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mover.store import Store; "
         "print(Store.open(sys.argv[1]).prune(wait=30)['backups'])", store.path],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    store.procs.append(first)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    second = Store.open(store.path)
    while True:  # until the first prune holds its lock, ours just finds the backup in flight
        with pytest.raises(StoreLocked) as e:
            second.prune(wait=0)
        if "another prune is running" in str(e.value):
            break
        assert "backup is running" in str(e.value)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second.close()
    holder.close()  # the backup in flight ends: the first prune proceeds
    assert first.stdout is not None
    assert first.stdout.read().strip() == "1" and first.wait(30) == 0


def test_sigkill_mid_backup_leaves_store_consistent(store: Store) -> None:
    before = image(11, 30, 0)
    old = backup_bytes(store, before)
    p = start(store, 12, 0, 0, pause="stream")  # writes blocks until killed
    deadline = time.monotonic() + 30
    assert p.stdout is not None
    p.stdout.readline()
    while len(os.listdir(os.path.join(store.path, "index"))) < 3:  # it has published packs of its own
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(random.random() * 0.05)  # somewhere in the middle of appending to the next pack
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    half_written = os.listdir(os.path.join(store.path, "tmp"))
    report = store.check(read_data=True)
    assert report["ok"] and not report["broken_backups"], report
    if half_written:  # almost always: the kill lands while a pack is being appended to
        assert any("temporary file" in w for w in report["warnings"])
    assert restore_bytes(store, old.id) == before
    store.prune()  # the dead writer's packs hold no referenced block: gone
    report = store.check(read_data=True)
    assert report["ok"] and report["warnings"] == [] and report["counts"]["blocks"] == 30
    assert restore_bytes(store, old.id) == before


def test_processes_creating_one_store_agree_on_its_key(tmp_path: Path) -> None:
    """Several movers open the same new store with create=True at once: one key, every block id agrees."""
    path = str(tmp_path / "new")
    code = ("import sys; from mover.store import Store; s = Store.open(sys.argv[1], create=True, block_size=65536); "
            "print(s.block_id(b'x' * 65536).hex())")
    procs = [subprocess.Popen([sys.executable, "-c", code, path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = []
    for p in procs:
        assert p.stdout is not None
        outs.append(p.stdout.read().strip())
        assert p.wait(30) == 0
        p.stdout.close()
    with Store.open(path) as s:
        assert set(outs) == {s.block_id(b"x" * 65536).hex()}


def test_check_while_another_process_writes(store: Store) -> None:
    """Packs and segments appearing under a running check are never reported as damage."""
    old = backup_bytes(store, image(13, 10, 0))
    p = start(store, 14, 0, 0, pause="stream")
    assert p.stdout is not None
    p.stdout.readline()
    for _ in range(3):
        report = store.check()
        assert report["ok"] and report["problems"] == [] and report["broken_backups"] == [], report
    p.kill()
    p.wait()
    assert restore_bytes(store, old.id) == image(13, 10, 0)
