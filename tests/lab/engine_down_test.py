"""``lab down`` with everything in flight (a transfer, a backup, a proxy VM attachment) leaves nothing behind,
and the same directory comes up again with its VMs, the backup failed and its temporary layer merged back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from ovirtsdk4 import types

from lab import client

from .conftest import leftovers

MiB = 1024**2


def wait(pred: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_down_in_flight_then_up_again(tmp_path: Path) -> None:
    d = tmp_path / "lab"
    lab = client.up(d)
    try:
        info = lab.create_vm(f"inflight-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0},
                                                                         {"size": 16 * MiB, "fill": 0}])
        d0, d1 = info["disks"]
        lab.write(info["id"], 0, 10, seed=1)
        with lab.connection() as conn:
            vm = conn.system_service().vms_service().vm_service(info["id"])
            snaps = vm.snapshots_service()
            s = snaps.add(types.Snapshot(description="s", disk_attachments=[
                types.DiskAttachment(disk=types.Disk(id=d1))]))
            wait(lambda: snaps.snapshot_service(s.id).get().snapshot_status == types.SnapshotStatus.OK)
            proxy = conn.system_service().vms_service().vm_service(lab.proxy_vm).disk_attachments_service()
            a = proxy.add(types.DiskAttachment(disk=types.Disk(id=d1, snapshot=types.Snapshot(id=s.id)),
                                               interface=types.DiskInterface.VIRTIO_SCSI, active=True))
            assert a.logical_name.startswith("/dev/loop")
            b = vm.backups_service().add(types.Backup(disks=[types.Disk(id=d0)]))
            bsvc = vm.backups_service().backup_service(b.id)
            wait(lambda: bsvc.get().phase == types.BackupPhase.READY)
            transfers = conn.system_service().image_transfers_service()
            t = transfers.add(types.ImageTransfer(disk=types.Disk(id=d0), backup=types.Backup(id=b.id),
                                                  direction=types.ImageTransferDirection.DOWNLOAD))
            tsvc = transfers.image_transfer_service(t.id)
            wait(lambda: tsvc.get().phase == types.ImageTransferPhase.TRANSFERRING)
            assert len(lab.volume_paths(d0)) == 2  # the backup's temporary layer
            assert leftovers(d)  # sanity: the check sees the lab's processes
    finally:
        assert client.down(d)
    assert leftovers(d) == []

    lab = client.up(d)
    try:
        with lab.connection() as conn:
            vm = conn.system_service().vms_service().vm_service(info["id"]).get()
            assert vm.name == info["name"]
            backup = conn.system_service().vms_service().vm_service(info["id"]).backups_service() \
                .backup_service(b.id).get()
            assert backup.phase == types.BackupPhase.FAILED
            assert len(lab.volume_paths(d0)) == 1
            for did in (d0, d1):
                disk = conn.system_service().disks_service().disk_service(did).get()
                assert disk.status == types.DiskStatus.OK
            transfers = conn.system_service().image_transfers_service().list()
            assert all(x.phase == types.ImageTransferPhase.FINISHED_FAILURE for x in transfers)
            atts = conn.system_service().vms_service().vm_service(lab.proxy_vm).disk_attachments_service().list()
            assert atts == []
    finally:
        assert client.down(d)
    assert leftovers(d) == []


def test_down_after_the_lab_was_killed(tmp_path: Path) -> None:
    import os
    import signal

    d = tmp_path / "lab"
    lab = client.up(d)
    try:
        info = lab.create_vm(f"killed-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}], start=False)
        with lab.connection() as conn:
            transfers = conn.system_service().image_transfers_service()
            t = transfers.add(types.ImageTransfer(disk=types.Disk(id=info["disks"][0]),
                                                  direction=types.ImageTransferDirection.DOWNLOAD))
            tsvc = transfers.image_transfer_service(t.id)
            wait(lambda: tsvc.get().phase == types.ImageTransferPhase.TRANSFERRING)
            proxy = conn.system_service().vms_service().vm_service(lab.proxy_vm).disk_attachments_service()
            other = lab.create_vm(f"k2-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}], start=False)
            conn.system_service().vms_service().vm_service(other["id"]).disk_attachments_service() \
                .attachment_service(other["disks"][0]).remove()
            a = proxy.add(types.DiskAttachment(disk=types.Disk(id=other["disks"][0]),
                                               interface=types.DiskInterface.VIRTIO_SCSI, active=True))
            assert a.logical_name.startswith("/dev/loop")
        os.kill(int(lab.status["pid"]), signal.SIGKILL)
        wait(lambda: not client._alive(int(lab.status["pid"])))
        assert leftovers(d)  # the lab's children outlive it
    finally:
        client.down(d)
    assert leftovers(d) == []
