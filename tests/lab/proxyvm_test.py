"""Tests of lab.proxyvm: attached disks are real loop devices with the image's content, and go away cleanly."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import proxyvm, qemu
from lab.errors import LabError
from lab.proxyvm import ProxyVM
from lab.storage import Domain

MiB = 1024**2


def _leftovers(vm: ProxyVM, images: list[Path]) -> list[str]:
    """Anything of the proxy VM still alive: loop devices on its files, FUSE mounts, processes."""
    out: list[str] = []
    loops = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    out += [line for line in loops.splitlines() if str(vm.dir) in line]
    with open("/proc/self/mountinfo") as f:
        out += [line for line in f if str(vm.dir) in line]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(str(i) in cmdline for i in images) or str(vm.dir) in cmdline:
                out.append(cmdline)
    return out


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[ProxyVM]:
    try:
        proxyvm.check_host()
    except LabError as e:
        pytest.skip(str(e))
    v = ProxyVM(tmp_path / "proxy", str(uuid.uuid4()))
    try:
        yield v
    finally:
        v.detach_all()


def _raw(image: Path, fmt: str, out: Path) -> bytes:
    qemu.convert(image, out, fmt, "raw")
    return out.read_bytes()


def test_attach_snapshot_read_only(vm: ProxyVM, tmp_path: Path) -> None:
    dom = Domain(tmp_path / "mnt", str(uuid.uuid4()), "nfs1", "file")
    disk, snap, top = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    dom.create_volume(disk, snap, 8 * MiB, "cow")
    qemu.io(dom.volume_path(disk, snap), "qcow2", ["write -P 0x61 0 3M", "write -P 0x62 5M 1M"])
    dom.add_layer(disk, snap, top)
    qemu.io(dom.volume_path(disk, top), "qcow2", ["write -P 0x63 0 1M"])
    image = dom.volume_path(disk, snap)

    dev = vm.attach(disk, image, "qcow2", read_only=True)
    assert dev.startswith("/dev/loop") and stat.S_ISBLK(os.stat(dev).st_mode)
    link = vm.by_id / f"virtio-{disk[:20]}"
    assert os.path.realpath(link) == dev
    assert vm.attachments()[disk]["logical_name"] == dev
    with open(link, "rb") as f:
        content = f.read()
    # The snapshot's content, not the VM's current one: the layer above is not part of it.
    assert content == _raw(image, "qcow2", tmp_path / "snap.raw")
    assert content[:1] == b"\x61" and len(content) == 8 * MiB
    assert subprocess.run(["blockdev", "--getro", dev], capture_output=True, text=True).stdout.strip() == "1"
    # Depending on the kernel, opening for write or the write itself is refused; either way nothing is written.
    with pytest.raises(OSError):
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    vm.detach(disk)
    assert not link.exists() and vm.attachments() == {}
    assert _leftovers(vm, [image]) == []


def test_attach_writable_for_restore(vm: ProxyVM, tmp_path: Path) -> None:
    image = tmp_path / "restore.qcow2"
    qemu.create(image, "qcow2", size=4 * MiB)
    disk = str(uuid.uuid4())
    dev = vm.attach(disk, image, "qcow2", read_only=False)
    payload = os.urandom(MiB)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, payload, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    vm.detach(disk)
    data = _raw(image, "qcow2", tmp_path / "r.raw")
    assert data[MiB:2 * MiB] == payload and data[:MiB] == bytes(MiB)
    assert _leftovers(vm, [image]) == []


def test_detach_after_restart_and_detach_all(vm: ProxyVM, tmp_path: Path) -> None:
    images = []
    for i in range(2):
        img = tmp_path / f"d{i}.raw"
        with open(img, "wb") as f:
            f.truncate(MiB)
        images.append(img)
        vm.attach(f"disk-{i}-{uuid.uuid4()}", img, "raw")
    with pytest.raises(LabError, match="already attached"):
        vm.attach(next(iter(vm.attachments())), images[0], "raw")
    # A restarted lab knows the attachments from the VM's state file.
    again = ProxyVM(vm.dir.parent, vm.vm_id)
    assert len(again.attachments()) == 2
    again.detach_all()
    assert vm.attachments() == {} and _leftovers(vm, images) == []


def test_bad_input(vm: ProxyVM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabError, match="no image"):
        vm.attach("d1", tmp_path / "missing.qcow2", "qcow2")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image" * 100)
    with pytest.raises(LabError):
        vm.attach("d2", bad, "qcow2")
    assert vm.attachments() == {} and _leftovers(vm, [bad]) == []
    monkeypatch.setattr(proxyvm.shutil, "which", lambda tool: None if tool == "nbdfuse" else "/bin/x")
    with pytest.raises(LabError, match="needs nbdfuse"):
        vm.attach("d3", bad, "qcow2")
