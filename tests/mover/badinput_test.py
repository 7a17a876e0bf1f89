"""The bad inputs of issue 2 through the CLI, end to end: each gives one clear error line and loses nothing.

Unreadable or vanished source (missing, a directory, real I/O errors from a block layer that fails reads),
a store on a full filesystem (a small loop-mounted ext4), a flipped bit in a pack, a truncated index, a
missing pack, two prunes at once, and a backup killed with SIGKILL in the middle.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MiB = 1024 * 1024
FERRY = [str(Path(sys.executable).parent / "ferry")]


def ferry(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"ferry {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def ferry_json(*args: str) -> Any:
    return json.loads(ferry(*args, "--json").stdout)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The single ``ferry: error:`` line on stderr of a failed command: no traceback, no log noise."""
    assert p.returncode != 0, p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ferry: error: "), p.stderr
    return lines[0]


def sha(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def packs(store: Path) -> set[Path]:
    return set((store / "packs").rglob("*.pack"))


def assert_restores(store: Path, backup_id: str, image: Path, tmp: Path) -> None:
    out = tmp / f"restore-{backup_id}.img"
    ferry("image", "restore", backup_id, str(out), "--store", str(store), "--force")
    assert sha(out) == sha(image)
    out.unlink()


def backup_ids(store: Path) -> list[str]:
    return [b["id"] for b in ferry_json("image", "list", "--store", str(store))]


@dataclass
class TwoBackups:
    store: Path
    a: str
    b: str
    img_a: Path
    img_b: Path
    packs_a: set[Path]


def library_backup(store: Path, image: Path) -> str:
    """Set-up backups go through the library (the bad inputs themselves go through the ``ferry`` CLI)."""
    from mover.pipeline import backup
    from mover.sources.file import FileSource
    from mover.store.repo import Store

    s = Store.open(str(store), create=True)
    src = FileSource(str(image))
    try:
        return backup(s, src).id  # type: ignore[arg-type]
    finally:
        src.close()
        s.close()


@pytest.fixture
def two_backups(tmp_path: Path) -> TwoBackups:
    """A store with backups of two unrelated images; A's blocks are in packs of their own."""
    store = tmp_path / "store"
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    random_image(img_a, 4 * MiB)
    random_image(img_b, 4 * MiB)
    a = library_backup(store, img_a)
    packs_a = packs(store)
    b = library_backup(store, img_b)
    assert packs_a and packs(store) - packs_a
    return TwoBackups(store, a, b, img_a, img_b, packs_a)


# --- unreadable or vanished source --------------------------------------------------------------------


def test_missing_source(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    p = ferry("image", "backup", str(tmp_path / "gone.img"), "--store", str(t.store), check=False)
    assert p.returncode == 3
    assert "cannot read source" in one_line_error(p) and "no such file" in p.stderr
    p = ferry("image", "backup", str(tmp_path), "--store", str(t.store), check=False)
    assert p.returncode == 3 and "cannot read source" in one_line_error(p)
    assert backup_ids(t.store) == [t.a, t.b]


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB disk whose reads fail with EIO from 8 MiB on, as a disk with bad sectors does.

    Real layers: qemu's blkdebug driver injects the error under a raw image, qemu-nbd serves it, nbdfuse
    exposes it as a file. Always unmounted, its processes always ended.
    """
    raw = tmp_path / "bad.raw"
    random_image(raw, 16 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    spec = json.dumps({
        "driver": "raw",
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "none", "iotype": "read", "errno": 5, "sector": 8 * MiB // 512}],
            "image": {"driver": "file", "filename": str(raw)},
        },
    })
    log = open(tmp_path / "nbdfuse.log", "wb")
    proc = subprocess.Popen(
        ["nbdfuse", str(mnt / "disk"), "--socket-activation", "qemu-nbd", "--read-only", f"json:{spec}"],
        stdout=log, stderr=log, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (mnt / "disk").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdfuse did not start: {(tmp_path / 'nbdfuse.log').read_text()}")
            time.sleep(0.05)
        yield mnt / "disk"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_source_read_errors(two_backups: TwoBackups, failing_disk: Path, tmp_path: Path) -> None:
    t = two_backups
    before = packs(t.store)
    p = ferry("image", "backup", str(failing_disk), "--store", str(t.store), check=False)
    assert p.returncode == 3
    line = one_line_error(p)
    assert "cannot read source" in line and str(failing_disk) in line
    assert backup_ids(t.store) == [t.a, t.b]  # nothing saved
    assert ferry_json("check", "--store", str(t.store))["ok"] is True
    assert packs(t.store) == before  # no pack of the failed backup was published
    assert_restores(t.store, t.a, t.img_a, tmp_path)


# --- a store on a full filesystem ---------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 on a loop device, mounted; always unmounted and detached."""
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(24 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def test_store_full(small_fs: Path, tmp_path: Path) -> None:
    store = small_fs / "store"
    small, big = tmp_path / "small.img", tmp_path / "big.img"
    random_image(small, 4 * MiB)
    random_image(big, 48 * MiB)  # random data does not compress: twice what the filesystem holds
    first = ferry_json("image", "backup", str(small), "--store", str(store))["id"]
    p = ferry("image", "backup", str(big), "--store", str(store), check=False)
    assert p.returncode == 4
    assert "no space left on device" in one_line_error(p)
    assert backup_ids(store) == [first]
    assert ferry_json("check", "--store", str(store), "--read-data")["ok"] is True
    assert_restores(store, first, small, tmp_path)
    # the failed backup left nothing behind that would keep the space: a small backup fits again
    again = ferry_json("image", "backup", str(small), "--store", str(store))
    assert again["stats"]["new"] == 0


# --- damaged store ------------------------------------------------------------------------------------


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_flipped_bit_in_pack(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    (pack_a,) = t.packs_a
    flip_bit(pack_a, 16 + 48 + 4096)  # inside the first record's data (after the pack and record headers)
    p = ferry("check", "--read-data", "--store", str(t.store), check=False)
    assert p.returncode == 4
    line = one_line_error(p)
    assert "1 corrupt blocks" in line and t.a in line and t.b not in line
    p = ferry("image", "restore", t.a, str(tmp_path / "a.out"), "--store", str(t.store), check=False)
    assert p.returncode == 4 and "damaged" in one_line_error(p)
    assert not (tmp_path / "a.out").exists()  # no half-restored image left to be mistaken for a good one
    assert_restores(t.store, t.b, t.img_b, tmp_path)  # the other backup is whole


def test_missing_pack(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    for pk in t.packs_a:
        pk.unlink()
    p = ferry("check", "--store", str(t.store), check=False)  # structure alone finds it
    assert p.returncode == 4
    line = one_line_error(p)
    assert "missing" in line and t.a in line and t.b not in line
    p = ferry("image", "restore", t.a, str(tmp_path / "a.out"), "--store", str(t.store), check=False)
    assert p.returncode == 4 and "damaged" in one_line_error(p)
    assert_restores(t.store, t.b, t.img_b, tmp_path)


def test_truncated_index(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    segments = sorted((t.store / "index").glob("*.idx"))
    assert segments
    for seg in segments:
        os.truncate(seg, seg.stat().st_size // 2)
    p = ferry("check", "--store", str(t.store), check=False)
    assert p.returncode == 4
    line = one_line_error(p)
    assert "structural problem" in line and t.a in line
    assert "truncated" in p.stdout  # the report names the damaged segment
    # nothing is lost: packs describe themselves, so the index is rebuilt from them
    ferry("repair", "--store", str(t.store))
    assert ferry_json("check", "--read-data", "--store", str(t.store))["ok"] is True
    assert_restores(t.store, t.a, t.img_a, tmp_path)
    assert_restores(t.store, t.b, t.img_b, tmp_path)


# --- concurrency and crashes --------------------------------------------------------------------------


def test_two_prunes_at_once(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    ferry("image", "delete", t.a, "--store", str(t.store))
    procs = [subprocess.Popen([*FERRY, "prune", "--store", str(t.store), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 4]), results
    for code, _, err in results:
        if code == 4:
            assert "busy" in one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert not (packs(t.store) & t.packs_a)  # A's blocks were freed by one of them
    assert ferry_json("check", "--read-data", "--store", str(t.store))["ok"] is True
    assert_restores(t.store, t.b, t.img_b, tmp_path)


def test_backup_killed_midway(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    big = tmp_path / "big.img"
    random_image(big, 160 * MiB)
    proc = subprocess.Popen([*FERRY, "image", "backup", str(big), "--store", str(t.store), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait until it is really in the middle: data read and a pack being written under tmp/
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the backup finished before it could be killed"
            assert time.monotonic() < deadline
            io = Path(f"/proc/{proc.pid}/io").read_text()
            rchar = int(next(ln.split()[1] for ln in io.splitlines() if ln.startswith("rchar")))
            if rchar > 24 * MiB and any((t.store / "tmp").iterdir()):
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert backup_ids(t.store) == [t.a, t.b]
    assert ferry_json("check", "--read-data", "--store", str(t.store))["ok"] is True
    assert_restores(t.store, t.a, t.img_a, tmp_path)
    assert_restores(t.store, t.b, t.img_b, tmp_path)
    # the store takes new backups and prunes after the crash
    c = ferry_json("image", "backup", str(t.img_a), "--store", str(t.store))
    assert c["stats"]["new"] == 0
    ferry("prune", "--store", str(t.store))
    assert ferry_json("check", "--read-data", "--store", str(t.store))["ok"] is True


def test_ctrl_c_aborts_cleanly(two_backups: TwoBackups, tmp_path: Path) -> None:
    t = two_backups
    big = tmp_path / "big.img"
    random_image(big, 160 * MiB)
    proc = subprocess.Popen([*FERRY, "image", "backup", str(big), "--store", str(t.store), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the backup finished before it could be interrupted"
        assert time.monotonic() < deadline
        io = Path(f"/proc/{proc.pid}/io").read_text()
        if int(next(ln.split()[1] for ln in io.splitlines() if ln.startswith("rchar"))) > 24 * MiB:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines in (["ferry: interrupted"], ["ferry: error: cancelled: interrupted"]), err
    assert backup_ids(t.store) == [t.a, t.b]
    assert not any((t.store / "tmp").iterdir())  # the writer's unfinished pack was removed
    assert ferry_json("check", "--store", str(t.store))["ok"] is True


def test_restore_destination_full(small_fs: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    big = tmp_path / "big.img"
    random_image(big, 40 * MiB)
    b = ferry_json("image", "backup", str(big), "--store", str(store))["id"]
    dest = small_fs / "restored.img"
    p = ferry("image", "restore", b, str(dest), "--store", str(store), check=False)
    assert p.returncode == 3
    line = one_line_error(p)
    assert "No space left on device" in line and str(dest) in line
    assert not dest.exists()  # the partial image was removed
    assert ferry_json("check", "--store", str(store))["ok"] is True
