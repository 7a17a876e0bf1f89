"""Snapshots through the real ovirtsdk4: a subset of disks, locked -> ok, freeze/thaw around it, content kept
in the snapshot's volume, disk snapshots, merge on removal, the proxy VM's block device, faults."""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import ovirtsdk4
import pytest
from ovirtsdk4 import types

from lab.client import Lab

MiB = 1024**2


def wait_snapshot(svc: Any, sid: str, timeout: float = 20) -> types.Snapshot | None:
    """The snapshot once ok, or None when it disappeared (failed creation or finished removal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = svc.snapshot_service(sid).get()
        except ovirtsdk4.NotFoundError:
            return None
        if s.snapshot_status == types.SnapshotStatus.OK:
            return s
        time.sleep(0.05)
    raise AssertionError(f"snapshot {sid} still locked")


def wait_gone(svc: Any, sid: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            svc.snapshot_service(sid).get()
        except ovirtsdk4.NotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"snapshot {sid} not removed")


def digest(path: str | Path, fmt: str, tmp: Path) -> str:
    """sha256 of the guest-visible content of an image (its whole backing chain)."""
    out = tmp / f"{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


@pytest.fixture
def vm(lab: Lab, sdk: Any) -> Any:
    info = lab.create_vm(f"snap-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0},
                                                                 {"size": 16 * MiB, "fill": 0}])
    lab.write(info["id"], 0, 20, seed=1)
    lab.write(info["id"], 1, 20, seed=2)
    yield info
    svc = sdk.system_service().vms_service().vm_service(info["id"])
    svc.stop()
    svc.remove()


def test_snapshot_subset_freeze_content_merge(lab: Lab, sdk: Any, vm: Any, tmp_path: Path) -> None:
    vms = sdk.system_service().vms_service()
    snaps = vms.vm_service(vm["id"]).snapshots_service()
    d0, d1 = vm["disks"]
    before = digest(lab.volume_paths(d0)[-1], "qcow2", tmp_path)
    t0 = time.time()
    s = snaps.add(types.Snapshot(description="subset", persist_memorystate=False,
                                 disk_attachments=[types.DiskAttachment(disk=types.Disk(id=d0))]))
    assert s.snapshot_status == types.SnapshotStatus.LOCKED
    with pytest.raises(ovirtsdk4.Error, match="being created") as e:
        snaps.snapshot_service(s.id).remove()
    assert e.value.code == 409
    with pytest.raises(ovirtsdk4.Error, match="being created"):
        snaps.add(types.Snapshot(description="second"))
    s = wait_snapshot(snaps, s.id)
    assert s is not None
    t1 = time.time()
    log = [r for r in lab.freeze_log(vm["id"]) if r["time"] >= t0]
    assert [r["op"] for r in log] == ["freeze", "thaw"]
    assert t0 <= log[0]["time"] <= log[1]["time"] <= t1
    assert len(lab.volume_paths(d0)) == 2 and len(lab.volume_paths(d1)) == 1

    # This SDK's SnapshotService.get() has no all_content parameter (it sits on remove()): clients pass
    # the query themselves, or list with all_content.
    full = snaps.snapshot_service(s.id).get(query={"all_content": "true"})
    assert full.initialization.configuration.type == types.ConfigurationType.OVF
    assert d0 in full.initialization.configuration.data
    assert snaps.snapshot_service(s.id).get().initialization is None
    listed = snaps.list(all_content=True)
    assert all(x.initialization.configuration.data for x in listed)
    assert {x.snapshot_type for x in listed} == {types.SnapshotType.ACTIVE, types.SnapshotType.REGULAR}
    sdisks = snaps.snapshot_service(s.id).disks_service().list()
    assert [x.id for x in sdisks] == [d0]

    # Disk snapshots: of the storage domain and of the disk; the volume is the old top.
    sd = lab.storage_domain("nfs-data")["id"]
    sd_snaps = sdk.system_service().storage_domains_service().storage_domain_service(sd) \
        .disk_snapshots_service().list()
    mine = [x for x in sd_snaps if x.disk.id == d0]
    assert len(mine) == 1 and mine[0].snapshot.id == s.id
    disk_snaps = sdk.system_service().disks_service().disk_service(d0).disk_snapshots_service().list()
    assert [x.id for x in disk_snaps] == [mine[0].id]
    snap_volume = lab.volume_paths(d0)[0]
    assert snap_volume.endswith(mine[0].id)

    # The guest writes after the snapshot; the snapshot keeps the old content.
    lab.write(vm["id"], 0, 10, seed=3)
    assert digest(snap_volume, "qcow2", tmp_path) == before
    now = digest(lab.volume_paths(d0)[-1], "qcow2", tmp_path)
    assert now != before

    # Removal merges the layer: one volume again, the guest's current data intact.
    snaps.snapshot_service(s.id).remove()
    with pytest.raises(ovirtsdk4.Error, match="being removed"):
        snaps.snapshot_service(s.id).remove()
    wait_gone(snaps, s.id)
    assert len(lab.volume_paths(d0)) == 1
    assert digest(lab.volume_paths(d0)[-1], "qcow2", tmp_path) == now
    with pytest.raises(ovirtsdk4.Error, match="Active VM"):
        active = next(x for x in snaps.list() if x.snapshot_type == types.SnapshotType.ACTIVE)
        snaps.snapshot_service(active.id).remove()


def test_proxy_vm_block_device_is_snapshot(lab: Lab, sdk: Any, vm: Any, tmp_path: Path) -> None:
    snaps = sdk.system_service().vms_service().vm_service(vm["id"]).snapshots_service()
    d0 = vm["disks"][0]
    s = wait_snapshot(snaps, snaps.add(types.Snapshot(description="for-proxy")).id)
    assert s is not None
    expected = digest(lab.volume_paths(d0)[0], "qcow2", tmp_path)
    lab.write(vm["id"], 0, 10, seed=9)  # the running guest moves on; the attached snapshot must not
    atts = sdk.system_service().vms_service().vm_service(lab.proxy_vm).disk_attachments_service()
    a = atts.add(types.DiskAttachment(disk=types.Disk(id=d0, snapshot=types.Snapshot(id=s.id)),
                                      interface=types.DiskInterface.VIRTIO_SCSI, bootable=False, active=True))
    try:
        assert a.logical_name and a.logical_name.startswith("/dev/loop")
        assert atts.attachment_service(d0).get().logical_name == a.logical_name
        link = Path(lab.status["proxy_vm_by_id"]) / f"virtio-{d0[:20]}"
        assert link.resolve() == Path(a.logical_name)
        with open(a.logical_name, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        assert got == expected
        with pytest.raises(ovirtsdk4.Error, match="attached to VM") as e:
            snaps.snapshot_service(s.id).remove()
        assert e.value.code == 409
    finally:
        atts.attachment_service(d0).remove()
    assert not (Path(lab.status["proxy_vm_by_id"]) / f"virtio-{d0[:20]}").exists()
    snaps.snapshot_service(s.id).remove()
    wait_gone(snaps, s.id)


def test_fault_snapshot_fails(lab: Lab, sdk: Any, vm: Any) -> None:
    snaps = sdk.system_service().vms_service().vm_service(vm["id"]).snapshots_service()
    lab.fault("snapshot_fail", 1)
    s = snaps.add(types.Snapshot(description="doomed"))
    assert wait_snapshot(snaps, s.id) is None
    assert len(lab.volume_paths(vm["disks"][0])) == 1
    events = sdk.system_service().events_service().list(max=20)
    assert any("doomed" in e.description and e.severity == types.LogSeverity.ERROR for e in events)
    assert sdk.system_service().disks_service().disk_service(vm["disks"][0]).get().status == types.DiskStatus.OK
    # The fault fired once; the next snapshot works.
    s = wait_snapshot(snaps, snaps.add(types.Snapshot(description="fine")).id)
    assert s is not None

    lab.fault("snapshot_remove_conflict", 2)
    for _ in range(2):
        with pytest.raises(ovirtsdk4.Error, match="locked") as e:
            snaps.snapshot_service(s.id).remove()
        assert e.value.code == 409
    snaps.snapshot_service(s.id).remove()
    wait_gone(snaps, s.id)
    assert lab.faults() == {}
