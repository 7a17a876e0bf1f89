"""The peer of the imageio benchmark: ovirt-imageio's own client with image transfers made through ovirtsdk4.

What an administrator does without Ferry (the SDK examples ``download_disk.py`` and ``upload_disk.py``): an
image transfer of the disk, ``ovirt_imageio.client.download`` (raw) from its ``transfer_url``, finalize; and
for the way back, a new disk, an upload transfer, ``ovirt_imageio.client.upload``, finalize. Each step's time
covers the engine calls as well as the data, as Ferry's times do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import BenchError

POLL = 0.05
PHASE_TIMEOUT = 120.0


@dataclass
class Timed:
    """A client step: ``seconds`` end to end (engine calls included), ``data_seconds`` the client call alone."""

    seconds: float
    data_seconds: float
    disk_id: str = ""


def _types() -> Any:
    from ovirtsdk4 import types

    return types


def _start(sdk: Any, **kw: Any) -> tuple[Any, Any]:
    """Add an image transfer and wait until it is ``transferring``; (its service, the transfer)."""
    types = _types()
    transfers = sdk.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(**kw))
    svc = transfers.image_transfer_service(t.id)
    deadline = time.monotonic() + PHASE_TIMEOUT
    while time.monotonic() < deadline:
        t = svc.get()
        if t.phase == types.ImageTransferPhase.TRANSFERRING:
            return svc, t
        if t.phase in (types.ImageTransferPhase.FINISHED_FAILURE, types.ImageTransferPhase.CANCELLED):
            break
        time.sleep(POLL)
    raise BenchError(f"image transfer {t.id[:8]} did not start (phase {t.phase})")


def _finish(svc: Any) -> None:
    """Finalize and follow the transfer until it succeeded (or is gone, as an engine cleans up)."""
    import ovirtsdk4

    types = _types()
    svc.finalize()
    deadline = time.monotonic() + PHASE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            t = svc.get()
        except ovirtsdk4.NotFoundError:
            return
        if t.phase == types.ImageTransferPhase.FINISHED_SUCCESS:
            return
        if t.phase == types.ImageTransferPhase.FINISHED_FAILURE:
            raise BenchError("image transfer failed at finalize")
        time.sleep(POLL)
    raise BenchError("image transfer did not finish")


def download(sdk: Any, ca_file: str, disk_id: str, dest: Path) -> Timed:
    """Download a disk (of a VM that is down) to a raw file with ``ovirt_imageio.client.download``."""
    from ovirt_imageio import client

    types = _types()
    t0 = time.perf_counter()
    svc, t = _start(sdk, disk=types.Disk(id=disk_id), direction=types.ImageTransferDirection.DOWNLOAD,
                    format=types.DiskFormat.RAW)
    try:
        t1 = time.perf_counter()
        client.download(t.transfer_url, str(dest), ca_file, fmt="raw", proxy_url=t.proxy_url)
        data = time.perf_counter() - t1
    except BaseException:
        svc.cancel()
        raise
    _finish(svc)
    return Timed(time.perf_counter() - t0, data, disk_id)


def upload(sdk: Any, ca_file: str, src: Path, like: str, name: str) -> Timed:
    """A new disk shaped like disk ``like`` (size, format, domain), ``src`` uploaded into it."""
    from ovirt_imageio import client

    types = _types()
    disks = sdk.system_service().disks_service()
    orig = disks.disk_service(like).get()
    t0 = time.perf_counter()
    d = disks.add(types.Disk(name=name, format=orig.format, sparse=orig.sparse,
                             provisioned_size=orig.provisioned_size,
                             storage_domains=[types.StorageDomain(id=orig.storage_domains[0].id)]))
    deadline = time.monotonic() + PHASE_TIMEOUT
    while disks.disk_service(d.id).get().status != types.DiskStatus.OK:
        if time.monotonic() > deadline:
            raise BenchError(f"new disk {d.id[:8]} not ready")
        time.sleep(POLL)
    svc, t = _start(sdk, disk=types.Disk(id=d.id), direction=types.ImageTransferDirection.UPLOAD,
                    format=types.DiskFormat.RAW)
    try:
        t1 = time.perf_counter()
        client.upload(str(src), t.transfer_url, ca_file, proxy_url=t.proxy_url)
        data = time.perf_counter() - t1
    except BaseException:
        svc.cancel()
        raise
    _finish(svc)
    return Timed(time.perf_counter() - t0, data, d.id)
