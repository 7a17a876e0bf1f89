"""Tests of lab.sshd: a real sshd reached with asyncssh, host key verified, volumes and tools reachable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from lab import qemu
from lab.procs import alive as _alive
from lab.procs import descendants as _descendants
from lab.sshd import Sshd
from lab.storage import Domain

MiB = 1024**2


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = Sshd(tmp_path_factory.mktemp("hosts"), "host1")
    s.start()
    try:
        yield s
    finally:
        pid = s.proc.pid if s.proc else 0
        kids = _descendants(pid)
        s.stop()
        assert not s.running and not _alive(pid) and not any(_alive(k) for k in kids)


class Result:
    """Exit status and output of one remote command."""

    def __init__(self, r: asyncssh.SSHCompletedProcess) -> None:
        self.exit_status = r.exit_status
        self.stdout = bytes(r.stdout or b"")  # type: ignore[arg-type]
        self.stderr = bytes(r.stderr or b"")  # type: ignore[arg-type]


def _run(sshd: Sshd, command: str, known_hosts: str | None = None) -> Result:
    async def go() -> Result:
        async with asyncssh.connect(
            "127.0.0.1", port=sshd.port, username=sshd.user, client_keys=[str(sshd.client_key)],
            known_hosts=asyncssh.import_known_hosts(known_hosts or sshd.known_hosts_line() + "\n"),
        ) as conn:
            return Result(await conn.run(command, check=False, encoding=None))

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_read_volume_and_qemu_img(sshd: Sshd, tmp_path: Path) -> None:
    dom = Domain(tmp_path / "mnt", str(uuid.uuid4()), "nfs1", "file")
    disk, vol = str(uuid.uuid4()), str(uuid.uuid4())
    path = dom.create_volume(disk, vol, 4 * MiB, "cow")
    qemu.io(path, "qcow2", ["write -P 0x5c 0 1M"])
    r = _run(sshd, f"cat {path}")
    assert r.exit_status == 0 and r.stdout == path.read_bytes()
    r = _run(sshd, f"qemu-img info --output json -U {path}")
    assert r.exit_status == 0
    info = json.loads(r.stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 * MiB
    r = _run(sshd, "command -v nc qemu-nbd")
    assert r.exit_status == 0 and len(r.stdout.split()) == 2


def test_wrong_host_key_rejected(sshd: Sshd, tmp_path: Path) -> None:
    other = Sshd(tmp_path, "other")
    other._prepare()
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        _run(sshd, "true", known_hosts=f"[127.0.0.1]:{sshd.port} {other.host_key}\n")


def test_emulated_lvm(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "blockSD"
    dom = Domain(root, str(uuid.uuid4()), "iscsi1", "block")
    sshd.add_lvm_root(root)
    disk, vol = str(uuid.uuid4()), str(uuid.uuid4())
    dom.create_volume(disk, vol, 2 * MiB, "raw")
    qemu.io(dom.volume_path(disk, vol), "raw", ["write -P 0x33 0 2M"])
    dom.deactivate(vol)

    r = _run(sshd, f"lvs --noheadings --separator '|' -o lv_name,lv_attr,lv_size,lv_tags {dom.id}/{vol}")
    assert r.exit_status == 0
    name, attr, size, tags = r.stdout.decode().strip().split("|")
    assert (name, attr[4], int(size)) == (vol, "-", 2 * MiB) and f"IU_{disk}" in tags.split(",")
    dev = dom.dev_path(vol)
    r = _run(sshd, f"cat {dev}")
    assert r.exit_status != 0

    r = _run(sshd, f"lvchange -ay {dom.id}/{vol} && sha256sum {dev}")
    assert r.exit_status == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(b"\x33" * 2 * MiB).hexdigest()
    assert dom.is_active(vol)
    assert _run(sshd, f"lvs --noheadings -o lv_attr {dev}").stdout.strip()[4:5] == b"a"
    r = _run(sshd, f"lvchange -an {dev}")
    assert r.exit_status == 0 and not dom.is_active(vol)
    r = _run(sshd, f"lvs {dom.id}/{'0' * 36}")
    assert r.exit_status == 5 and b"Failed to find logical volume" in r.stderr
    r = _run(sshd, "lvs nosuchvg")
    assert r.exit_status == 5 and b"not found" in r.stderr


def test_stop_ends_open_sessions(tmp_path: Path) -> None:
    s = Sshd(tmp_path, "h")
    s.start()

    async def hold() -> list[int]:
        async with asyncssh.connect(
            "127.0.0.1", port=s.port, username=s.user, client_keys=[str(s.client_key)],
            known_hosts=asyncssh.import_known_hosts(s.known_hosts_line() + "\n"),
        ) as conn:
            proc = await conn.create_process("sleep 60")
            await asyncio.sleep(0.3)
            assert s.proc is not None
            kids = _descendants(s.proc.pid)
            s.stop()
            await proc.wait(timeout=10)
            return kids

    kids = asyncio.run(hold())
    assert kids and not any(_alive(k) for k in kids)


def test_restart_after_crash_ends_stale_sshd(tmp_path: Path) -> None:
    first = Sshd(tmp_path, "h")
    first.start()
    assert first.proc is not None
    stale = first.proc.pid
    first.proc = None
    second = Sshd(tmp_path, "h")
    try:
        second.start()
        assert not _alive(stale) and second.running
        assert _run(second, "echo ok").stdout == b"ok\n"
    finally:
        second.stop()
