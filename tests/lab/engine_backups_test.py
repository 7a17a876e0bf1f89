"""VM backups and checkpoints with the real ovirtsdk4 and ovirt_imageio.client: full then incremental, dirty
extents equal to what the guest wrote, a point-in-time view while the guest keeps writing, root-only
checkpoint removal, a broken checkpoint."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import ovirtsdk4
import pytest
from ovirt_imageio import client
from ovirtsdk4 import types

from lab.client import Lab

MiB = 1024**2
B = types.BackupPhase


def wait_backup(svc: Any, timeout: float = 20) -> types.Backup:
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while time.monotonic() < deadline:
        b = svc.get()
        if not seen or seen[-1] != b.phase:
            seen.append(b.phase)
        if b.phase in (B.READY, B.SUCCEEDED, B.FAILED):
            return b
        time.sleep(0.02)
    raise AssertionError(f"backup stuck: {seen}")


def finalize(svc: Any) -> None:
    svc.finalize()
    deadline = time.monotonic() + 20
    b = svc.get()
    while b.phase not in (B.SUCCEEDED, B.FAILED):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        b = svc.get()
    assert b.phase == B.SUCCEEDED


def transfer(sdk: Any, disk: str, backup: str, proxy: bool = False) -> tuple[Any, str]:
    transfers = sdk.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(disk=types.Disk(id=disk), backup=types.Backup(id=backup),
                                          direction=types.ImageTransferDirection.DOWNLOAD,
                                          format=types.DiskFormat.RAW))
    svc = transfers.image_transfer_service(t.id)
    while t.phase != types.ImageTransferPhase.TRANSFERRING:
        time.sleep(0.05)
        t = svc.get()
    return svc, t.proxy_url if proxy else t.transfer_url


def end(svc: Any) -> None:
    svc.finalize()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if svc.get().phase == types.ImageTransferPhase.FINISHED_SUCCESS:
                return
        except ovirtsdk4.NotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError("transfer did not finish")


def current(lab: Lab, disk: str, tmp: Path) -> bytes:
    out = tmp / f"{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", lab.volume_paths(disk)[-1], str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def merged(extents: list[dict[str, Any]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in sorted((int(x["start"]), int(x["length"])) for x in extents):
        if out and out[-1][0] + out[-1][1] == e[0]:
            out[-1] = (out[-1][0], out[-1][1] + e[1])
        else:
            out.append(e)
    return out


def test_full_then_incremental(lab: Lab, sdk: Any, tmp_path: Path) -> None:
    info = lab.create_vm(f"bk-{uuid.uuid4().hex[:6]}", disks=[
        {"size": 32 * MiB, "fill": 0.2, "seed": 3},
        {"size": 16 * MiB, "format": "raw", "fill": 0, "storage_domain": "iscsi-data", "sparse": False}])
    d0, d1 = info["disks"]
    vm = sdk.system_service().vms_service().vm_service(info["id"])
    backups = vm.backups_service()

    # Full backup of both disks; the raw disk is always full.
    b = backups.add(types.Backup(disks=[types.Disk(id=d0), types.Disk(id=d1)]))
    assert b.phase == B.INITIALIZING
    bsvc = backups.backup_service(b.id)
    b = wait_backup(bsvc)
    assert b.phase == B.READY and b.to_checkpoint_id
    assert {d.id: d.backup_mode for d in bsvc.disks_service().list()} == {
        d0: types.DiskBackupMode.FULL, d1: types.DiskBackupMode.FULL}
    with pytest.raises(ovirtsdk4.Error, match="backup") as e:
        vm.snapshots_service().add(types.Snapshot(description="during backup"))
    assert e.value.code == 409
    point = current(lab, d0, tmp_path)
    # The guest keeps writing; the backup must still export the point in time.
    during = lab.write(info["id"], 0, 5, seed=10)
    tsvc, url = transfer(sdk, d0, b.id)
    client.download(url, str(tmp_path / "full.raw"), lab.ca_file, fmt="raw")
    end(tsvc)
    finalize(bsvc)
    assert (tmp_path / "full.raw").read_bytes() == point
    assert len(lab.volume_paths(d0)) == 1  # the backup's temporary layer is merged back
    cps = vm.checkpoints_service().list()
    assert [c.id for c in cps] == [b.to_checkpoint_id]
    assert [d.id for d in vm.checkpoints_service().checkpoint_service(cps[0].id).disks_service().list()] == [d0]

    # The guest writes; the incremental backup's dirty extents are the writes since the checkpoint.
    wrote = lab.write(info["id"], 0, 3, seed=11)
    after_writes = current(lab, d0, tmp_path)
    b2 = backups.add(types.Backup(disks=[types.Disk(id=d0)], from_checkpoint_id=b.to_checkpoint_id))
    b2svc = backups.backup_service(b2.id)
    b2 = wait_backup(b2svc)
    assert b2.from_checkpoint_id == b.to_checkpoint_id
    assert [d.backup_mode for d in b2.disks] == [types.DiskBackupMode.INCREMENTAL]
    tsvc, url = transfer(sdk, d0, b2.id)
    with client.ImageioClient(url, cafile=lab.ca_file) as c:
        dirty = [e for e in c.extents("dirty") if e.dirty]
        # Apply the dirty extents to the full copy: that is the incremental restore point.
        image = bytearray((tmp_path / "full.raw").read_bytes())
        for e in dirty:
            buf = bytearray(e.length)
            c.read(e.start, memoryview(buf))
            image[e.start:e.start + e.length] = buf
    # The client's own incremental download: a qcow2 holding only the dirty extents, on top of the full.
    client.download(url, str(tmp_path / "inc.qcow2"), lab.ca_file, fmt="qcow2", incremental=True,
                    backing_file=str(tmp_path / "full.raw"), backing_format="raw")
    end(tsvc)
    # Through the engine's proxy (imageio in the proxy role): the same dirty extents.
    tsvc, purl = transfer(sdk, d0, b2.id, proxy=True)
    with client.ImageioClient(purl, cafile=lab.ca_file) as c:
        assert [(e.start, e.length) for e in c.extents("dirty") if e.dirty] == [(e.start, e.length) for e in dirty]
    end(tsvc)
    inc_raw = tmp_path / "inc.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "inc.qcow2"), str(inc_raw)], check=True)
    assert inc_raw.read_bytes() == after_writes
    alloc = subprocess.run(["qemu-img", "map", "--output=json", str(tmp_path / "inc.qcow2")],
                           capture_output=True, text=True, check=True).stdout

    own = [m for m in json.loads(alloc) if m["depth"] == 0 and m["data"]]
    assert sum(m["length"] for m in own) == sum(e.length for e in dirty)
    finalize(b2svc)
    # The dirty extents are exactly the writes after the first backup's point in time (during it, and after).
    assert merged([{"start": e.start, "length": e.length} for e in dirty]) == merged(during + wrote)
    assert bytes(image) == after_writes
    assert len(vm.checkpoints_service().list()) == 2

    # Only the root checkpoint can be removed.
    cps = vm.checkpoints_service().list()
    with pytest.raises(ovirtsdk4.Error, match="root") as e:
        vm.checkpoints_service().checkpoint_service(cps[1].id).remove()
    assert e.value.code == 409
    vm.checkpoints_service().checkpoint_service(cps[0].id).remove()
    assert [c.id for c in vm.checkpoints_service().list()] == [cps[1].id]
    assert vm.checkpoints_service().list()[0].parent_id is None

    # A broken checkpoint: its bitmap is gone, the incremental backup fails and leaves no layer behind.
    lab.fault("checkpoint_broken", cps[1].id)
    try:
        b3 = backups.add(types.Backup(disks=[types.Disk(id=d0)], from_checkpoint_id=cps[1].id))
        b3 = wait_backup(backups.backup_service(b3.id))
        assert b3.phase == B.FAILED
        assert len(lab.volume_paths(d0)) == 1
    finally:
        lab.clear_faults()
    with pytest.raises(ovirtsdk4.Error, match="does not exist"):
        backups.add(types.Backup(disks=[types.Disk(id=d0)], from_checkpoint_id=str(uuid.uuid4())))
    vm.stop()
    vm.remove()
