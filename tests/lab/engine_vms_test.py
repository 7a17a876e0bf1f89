"""VMs, disks and disk attachments through the real ovirtsdk4: add/get/list/search/remove, OVF round trip,
start/stop, freeze/thaw, locked -> ok, the engine's 409s."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any

import ovirtsdk4
import pytest
from ovirtsdk4 import types

from lab.client import Lab

MiB = 1024**2


def wait_disk_ok(sdk: Any, disk_id: str, timeout: float = 10) -> types.Disk:
    svc = sdk.system_service().disks_service().disk_service(disk_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = svc.get()
        if d.status == types.DiskStatus.OK:
            return d
        time.sleep(0.05)
    raise AssertionError(f"disk {disk_id} not ok")


def new_vm(sdk: Any, name: str | None = None) -> types.Vm:
    vms = sdk.system_service().vms_service()
    return vms.add(types.Vm(name=name or f"vm-{uuid.uuid4().hex[:8]}", cluster=types.Cluster(name="Default"),
                            template=types.Template(name="Blank"), memory=512 * MiB))


def new_disk(sdk: Any, fmt: types.DiskFormat = types.DiskFormat.COW, sd: str = "nfs-data",
             sparse: bool = True, size: int = 16 * MiB) -> types.Disk:
    d = sdk.system_service().disks_service().add(types.Disk(
        name=f"d-{uuid.uuid4().hex[:6]}", format=fmt, sparse=sparse, provisioned_size=size,
        storage_domains=[types.StorageDomain(name=sd)],
        backup=types.DiskBackup.INCREMENTAL if fmt == types.DiskFormat.COW else None))
    return d


def test_vm_add_get_list_search_remove(sdk: Any) -> None:
    vms = sdk.system_service().vms_service()
    vm = new_vm(sdk, "search-me-1")
    assert vm.status == types.VmStatus.DOWN
    assert vms.vm_service(vm.id).get().name == "search-me-1"
    assert [v.id for v in vms.list(search="name=search-me-1")] == [vm.id]
    assert vm.id in [v.id for v in vms.list(search="name=search-me*")]
    assert vms.list(search="name=nothing-like-this") == []
    with pytest.raises(ovirtsdk4.Error, match="name is already in use"):
        new_vm(sdk, "search-me-1")
    vms.vm_service(vm.id).remove()
    with pytest.raises(ovirtsdk4.NotFoundError):
        vms.vm_service(vm.id).get()


def test_disk_lifecycle_and_sizes(sdk: Any, lab: Lab) -> None:
    disks = sdk.system_service().disks_service()
    d = new_disk(sdk)
    assert d.status == types.DiskStatus.LOCKED  # the engine answers before the volume is ready
    d = wait_disk_ok(sdk, d.id)
    assert d.format == types.DiskFormat.COW and d.sparse
    assert d.backup == types.DiskBackup.INCREMENTAL
    assert d.provisioned_size == 16 * MiB
    assert 0 < d.actual_size < MiB  # an empty qcow2: metadata only
    assert d.storage_domains[0].id == lab.storage_domain("nfs-data")["id"]
    paths = lab.volume_paths(d.id)
    assert len(paths) == 1 and paths[0].endswith(f"/images/{d.id}/{d.image_id}")
    disks.disk_service(d.id).remove()
    with pytest.raises(ovirtsdk4.NotFoundError):
        disks.disk_service(d.id).get()


def test_raw_preallocated_on_block_domain(sdk: Any) -> None:
    d = wait_disk_ok(sdk, new_disk(sdk, types.DiskFormat.RAW, "iscsi-data", sparse=False).id)
    assert d.format == types.DiskFormat.RAW and not d.sparse
    assert d.actual_size >= 16 * MiB
    with pytest.raises(ovirtsdk4.Error, match="incompatible with the storage domain type") as e:
        new_disk(sdk, types.DiskFormat.RAW, "iscsi-data", sparse=True)
    assert e.value.code == 409
    sdk.system_service().disks_service().disk_service(d.id).remove()


def test_attach_detach_and_conflicts(sdk: Any) -> None:
    vm, other = new_vm(sdk), new_vm(sdk)
    d = wait_disk_ok(sdk, new_disk(sdk).id)
    atts = sdk.system_service().vms_service().vm_service(vm.id).disk_attachments_service()
    a = atts.add(types.DiskAttachment(disk=types.Disk(id=d.id), interface=types.DiskInterface.VIRTIO_SCSI,
                                      bootable=True, active=True))
    assert a.id == d.id and a.interface == types.DiskInterface.VIRTIO_SCSI and a.bootable
    assert [x.disk.id for x in atts.list()] == [d.id]
    full = sdk.system_service().vms_service().vm_service(vm.id).get(follow="disk_attachments.disk")
    assert [x.disk.provisioned_size for x in full.disk_attachments] == [16 * MiB]
    other_atts = sdk.system_service().vms_service().vm_service(other.id).disk_attachments_service()
    with pytest.raises(ovirtsdk4.Error, match="already attached") as e:
        other_atts.add(types.DiskAttachment(disk=types.Disk(id=d.id), interface=types.DiskInterface.VIRTIO_SCSI))
    assert e.value.code == 409
    atts.attachment_service(d.id).update(types.DiskAttachment(disk=types.Disk(provisioned_size=20 * MiB)))
    assert sdk.system_service().disks_service().disk_service(d.id).get().provisioned_size == 20 * MiB
    atts.attachment_service(d.id).remove()
    assert atts.list() == []
    assert wait_disk_ok(sdk, d.id)  # detach keeps the disk
    # A new disk in the attachment request itself.
    a2 = other_atts.add(types.DiskAttachment(
        disk=types.Disk(name="inline", format=types.DiskFormat.COW, provisioned_size=8 * MiB,
                        storage_domains=[types.StorageDomain(name="nfs-data")]),
        interface=types.DiskInterface.VIRTIO, active=True))
    wait_disk_ok(sdk, a2.disk.id)
    vms = sdk.system_service().vms_service()
    vms.vm_service(other.id).remove()  # removes its disks too
    with pytest.raises(ovirtsdk4.NotFoundError):
        sdk.system_service().disks_service().disk_service(a2.disk.id).get()
    vms.vm_service(vm.id).remove()
    sdk.system_service().disks_service().disk_service(d.id).remove()


def test_start_stop_freeze_thaw(sdk: Any, lab: Lab) -> None:
    vm = new_vm(sdk)
    svc = sdk.system_service().vms_service().vm_service(vm.id)
    with pytest.raises(ovirtsdk4.Error, match="not running") as e:
        svc.freeze_filesystems()
    assert e.value.code == 409
    svc.start()
    deadline = time.monotonic() + 5
    while svc.get().status != types.VmStatus.UP:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(ovirtsdk4.Error, match="VM is running"):
        svc.remove()
    d = wait_disk_ok(sdk, new_disk(sdk).id)
    svc.disk_attachments_service().add(types.DiskAttachment(disk=types.Disk(id=d.id),
                                                            interface=types.DiskInterface.VIRTIO_SCSI))
    # The guest agent of the running VM reports the device name.
    assert svc.disk_attachments_service().list()[0].logical_name == "/dev/sda"
    t0 = time.time()
    svc.freeze_filesystems()
    svc.thaw_filesystems()
    log = lab.freeze_log(vm.id)
    assert [r["op"] for r in log] == ["freeze", "thaw"]
    assert t0 <= log[0]["time"] <= log[1]["time"]
    lab.set_guest_agent(vm.id, False)
    with pytest.raises(ovirtsdk4.Error, match="Guest agent") as e:
        svc.freeze_filesystems()
    assert e.value.code == 409
    assert svc.get().guest_operating_system is None
    svc.stop()
    assert svc.get().status == types.VmStatus.DOWN
    svc.remove()


def test_ovf_round_trip(sdk: Any, lab: Lab) -> None:
    info = lab.create_vm(f"ovf-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}], start=False,
                         memory=768 * MiB, cpus=2)
    vms = sdk.system_service().vms_service()
    vm = vms.vm_service(info["id"]).get(all_content=True)
    cfg = vm.initialization.configuration
    assert cfg.type == types.ConfigurationType.OVF
    assert "<ovf:Envelope" in cfg.data and info["disks"][0] in cfg.data
    restored = vms.add(types.Vm(name=vm.name + "-restored", cluster=types.Cluster(name="Default"),
                                initialization=types.Initialization(configuration=types.Configuration(
                                    type=types.ConfigurationType.OVF, data=cfg.data))))
    got = vms.vm_service(restored.id).get()
    assert got.memory == 768 * MiB and got.cpu.topology.sockets == 2
    assert got.status == types.VmStatus.DOWN
    vms.vm_service(restored.id).remove()
    vms.vm_service(info["id"]).remove()


def test_jobs_by_correlation_id(sdk: Any, lab: Lab) -> None:
    cid = uuid.uuid4().hex
    d = sdk.system_service().disks_service().add(
        types.Disk(name="job", format=types.DiskFormat.COW, provisioned_size=8 * MiB,
                   storage_domains=[types.StorageDomain(name="nfs-data")]),
        query={"correlation_id": cid})
    jobs = sdk.system_service().jobs_service()
    deadline = time.monotonic() + 10
    while True:
        found = jobs.list(search=f"correlation_id={cid}")
        assert len(found) == 1
        if found[0].status == types.JobStatus.FINISHED:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert jobs.job_service(found[0].id).get().end_time is not None
    assert wait_disk_ok(sdk, d.id).status == types.DiskStatus.OK
    upd = sdk.system_service().disks_service().disk_service(d.id).update(types.Disk(alias="renamed"))
    assert upd.alias == "renamed"
    grown = sdk.system_service().disks_service().disk_service(d.id).update(types.Disk(provisioned_size=12 * MiB))
    assert grown.provisioned_size == 12 * MiB
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", lab.volume_paths(d.id)[-1]],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 12 * MiB
    with pytest.raises(ovirtsdk4.Error, match="larger") as e:
        sdk.system_service().disks_service().disk_service(d.id).update(types.Disk(provisioned_size=4 * MiB))
    assert e.value.code == 409
    sd = next(s for s in sdk.system_service().storage_domains_service().list() if s.name == "nfs-data")
    listed = sdk.system_service().storage_domains_service().storage_domain_service(sd.id).disks_service().list()
    assert d.id in [x.id for x in listed]
    sdk.system_service().disks_service().disk_service(d.id).remove()


def test_proxy_vm_writable_attachment(lab: Lab, sdk: Any, tmp_path: Any) -> None:
    """A restore through the proxy VM: an empty disk attached read-write is a writable block device."""
    d = wait_disk_ok(sdk, new_disk(sdk, size=16 * MiB).id)
    atts = sdk.system_service().vms_service().vm_service(lab.proxy_vm).disk_attachments_service()
    a = atts.add(types.DiskAttachment(disk=types.Disk(id=d.id), interface=types.DiskInterface.VIRTIO_SCSI,
                                      active=True, read_only=False))
    payload = os.urandom(MiB)
    try:
        assert a.logical_name.startswith("/dev/loop") and not a.read_only
        fd = os.open(a.logical_name, os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 4 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        atts.attachment_service(d.id).remove()
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", lab.volume_paths(d.id)[-1], str(out)], check=True)
    data = out.read_bytes()
    assert data[4 * MiB:5 * MiB] == payload
    assert data[:4 * MiB] == bytes(4 * MiB)
    sdk.system_service().disks_service().disk_service(d.id).remove()
