"""Image transfers with the real ovirtsdk4 and ovirt_imageio.client: full download (host and proxy URL),
disk snapshot download, upload to a new disk, bit for bit; phases, pause/resume, cancel, 409s, faults."""

from __future__ import annotations

import os
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
T = types.ImageTransferPhase


def wait_phase(svc: Any, phases: tuple[types.ImageTransferPhase, ...], timeout: float = 20) -> types.ImageTransfer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = svc.get()
        if t.phase in phases:
            return t
        time.sleep(0.05)
    raise AssertionError(f"transfer not in {phases}: {t.phase}")


def start(sdk: Any, **kw: Any) -> tuple[Any, types.ImageTransfer]:
    transfers = sdk.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(**kw))
    assert t.phase == T.INITIALIZING
    svc = transfers.image_transfer_service(t.id)
    t = wait_phase(svc, (T.TRANSFERRING,))
    assert t.transfer_url.startswith("https://127.0.0.1:") and "/images/" in t.transfer_url
    assert t.proxy_url.startswith("https://127.0.0.1:") and t.proxy_url != t.transfer_url
    return svc, t


def finish(svc: Any) -> None:
    """Finalize and follow the transfer to finished_success, as the SDK examples do."""
    svc.finalize()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            t = svc.get()
        except ovirtsdk4.NotFoundError:
            return
        if t.phase == T.FINISHED_SUCCESS:
            return
        assert t.phase != T.FINISHED_FAILURE
        time.sleep(0.05)
    raise AssertionError("transfer did not finish")


def raw_of(path: str, tmp: Path) -> bytes:
    out = tmp / f"{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Any:
    info = lab.create_vm(f"xfer-{uuid.uuid4().hex[:6]}", disks=[{"size": 32 * MiB, "fill": 0.2, "seed": 7}],
                         start=False)
    return info


def test_download_full_via_host_and_proxy(lab: Lab, sdk: Any, vm: Any, tmp_path: Path) -> None:
    did = vm["disks"][0]
    expected = raw_of(lab.volume_paths(did)[-1], tmp_path)
    svc, t = start(sdk, disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD,
                   format=types.DiskFormat.RAW)
    disk = sdk.system_service().disks_service().disk_service(did).get()
    assert disk.status == types.DiskStatus.LOCKED
    client.download(t.transfer_url, str(tmp_path / "host.raw"), lab.ca_file, fmt="raw")
    client.download(t.proxy_url, str(tmp_path / "proxy.raw"), lab.ca_file, fmt="raw")
    with client.ImageioClient(t.transfer_url, cafile=lab.ca_file) as c:
        zero = c.extents("zero")
        assert c.size() == 32 * MiB
    finish(svc)
    assert (tmp_path / "host.raw").read_bytes() == expected
    assert (tmp_path / "proxy.raw").read_bytes() == expected
    data = [e for e in zero if not e.zero]
    assert data and sum(e.length for e in data) < 32 * MiB  # free space of the filesystem is holes
    assert sdk.system_service().disks_service().disk_service(did).get().status == types.DiskStatus.OK
    with pytest.raises((ovirtsdk4.Error, ovirtsdk4.NotFoundError)) as e:
        svc.finalize()
    assert e.value.code in (404, 409)


def test_upload_to_new_disk(lab: Lab, sdk: Any, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(10 * MiB)
        f.write(b"ferry" * 1000)
    for fmt, sd in ((types.DiskFormat.COW, "nfs-data"), (types.DiskFormat.RAW, "iscsi-data")):
        disks = sdk.system_service().disks_service()
        d = disks.add(types.Disk(name=f"up-{fmt.value}", format=fmt, sparse=fmt == types.DiskFormat.COW,
                                 provisioned_size=16 * MiB, storage_domains=[types.StorageDomain(name=sd)]))
        while disks.disk_service(d.id).get().status != types.DiskStatus.OK:
            time.sleep(0.05)
        svc, t = start(sdk, disk=types.Disk(id=d.id), direction=types.ImageTransferDirection.UPLOAD,
                       format=types.DiskFormat.RAW)
        client.upload(str(src), t.transfer_url, lab.ca_file)
        finish(svc)
        assert raw_of(lab.volume_paths(d.id)[-1], tmp_path) == src.read_bytes()
        disks.disk_service(d.id).remove()


def test_download_disk_snapshot(lab: Lab, sdk: Any, tmp_path: Path) -> None:
    info = lab.create_vm(f"snapx-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}])
    lab.write(info["id"], 0, 30, seed=4)
    did = info["disks"][0]
    vm = sdk.system_service().vms_service().vm_service(info["id"])
    snaps = vm.snapshots_service()
    s = snaps.add(types.Snapshot(description="x"))
    while snaps.snapshot_service(s.id).get().snapshot_status != types.SnapshotStatus.OK:
        time.sleep(0.05)
    lab.write(info["id"], 0, 30, seed=5)
    ds = sdk.system_service().disks_service().disk_service(did).disk_snapshots_service().list()
    assert len(ds) == 1
    expected = raw_of(lab.volume_paths(did)[0], tmp_path)
    # A disk of a running VM cannot be downloaded directly: 409, as on a real engine.
    with pytest.raises(ovirtsdk4.Error, match="running VM") as e:
        sdk.system_service().image_transfers_service().add(types.ImageTransfer(
            disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD))
    assert e.value.code == 409
    svc, t = start(sdk, snapshot=types.DiskSnapshot(id=ds[0].id), direction=types.ImageTransferDirection.DOWNLOAD,
                   format=types.DiskFormat.RAW)
    client.download(t.transfer_url, str(tmp_path / "snap.raw"), lab.ca_file, fmt="raw")
    finish(svc)
    assert (tmp_path / "snap.raw").read_bytes() == expected
    # shallow + cow: the layer's own qcow2 bytes.
    svc, t = start(sdk, snapshot=types.DiskSnapshot(id=ds[0].id), direction=types.ImageTransferDirection.DOWNLOAD,
                   format=types.DiskFormat.COW, shallow=True)
    with client.ImageioClient(t.transfer_url, cafile=lab.ca_file) as c:
        buf = bytearray(4)
        c.read(0, memoryview(buf))
        size = c.size()
    finish(svc)
    assert bytes(buf) == b"QFI\xfb"
    assert size == os.path.getsize(lab.volume_paths(did)[0])
    vm.stop()


def test_phases_pause_resume_cancel(lab: Lab, sdk: Any, vm: Any) -> None:
    did = vm["disks"][0]
    svc, _t = start(sdk, disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD)
    svc.pause()
    assert svc.get().phase == T.PAUSED_USER
    with pytest.raises(ovirtsdk4.Error) as e:
        svc.pause()
    assert e.value.code == 409
    svc.resume()
    wait_phase(svc, (T.TRANSFERRING,))
    # Another transfer of a locked disk is refused.
    with pytest.raises(ovirtsdk4.Error, match="locked"):
        sdk.system_service().image_transfers_service().add(types.ImageTransfer(
            disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD))
    svc.cancel()
    wait_phase(svc, (T.FINISHED_FAILURE,))
    with pytest.raises(ovirtsdk4.Error) as e:
        svc.finalize()
    assert e.value.code == 409
    # The engine forgets finished transfers after a while.
    deadline = time.monotonic() + 15
    while True:
        try:
            svc.get()
        except ovirtsdk4.NotFoundError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_transfer_hang_and_inactivity(lab: Lab, sdk: Any, vm: Any) -> None:
    did = vm["disks"][0]
    transfers = sdk.system_service().image_transfers_service()
    lab.fault("transfer_hang", "initializing")
    try:
        t = transfers.add(types.ImageTransfer(disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD))
        svc = transfers.image_transfer_service(t.id)
        time.sleep(1.0)
        assert svc.get().phase == T.INITIALIZING
    finally:
        lab.clear_faults()
    t = wait_phase(svc, (T.TRANSFERRING,))
    svc.finalize()
    wait_phase(svc, (T.FINISHED_SUCCESS,))
    t = transfers.add(types.ImageTransfer(disk=types.Disk(id=did), direction=types.ImageTransferDirection.DOWNLOAD,
                                          inactivity_timeout=1))
    svc = transfers.image_transfer_service(t.id)
    t = wait_phase(svc, (T.FINISHED_FAILURE,), timeout=15)
    assert t.inactivity_timeout == 1
