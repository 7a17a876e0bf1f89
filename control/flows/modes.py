"""Modes of moving disk data: how a flow turns a disk at a point in time into a mover job and back.

A mode gives the source of an export job (and releases what it used), and the sink of a restore job.
``imageio`` is built here; ``ssh`` and ``attach`` register themselves the same way when they land.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from control.engine import DiskInfo, Transfer
from control.errors import EngineError, UsageError

if TYPE_CHECKING:
    from control.flows.backup import BackupFlow
    from control.flows.restore import RestoreFlow

log = logging.getLogger(__name__)


@dataclass
class DiskPlan:
    """What the backup flow does with one disk."""

    disk: DiskInfo
    kind: str  # full | incremental
    base: str | None = None  # store backup id of the disk's previous backup (incremental)
    note: str | None = None
    snapshot_volume: str | None = None  # snapshot method: the disk snapshot (volume) to read
    # snapshot method, incremental: the new snapshot's volume is the one layer added since the last backup,
    # so reading only the clusters it holds (a shallow transfer) reads exactly what changed.
    shallow: bool = False
    transfer: Transfer | None = None
    store_backup_id: str | None = None


class Mode(Protocol):
    name: str

    def prepare_export(self, flow: BackupFlow, plan: DiskPlan) -> dict[str, Any]:
        """Make the disk readable for a mover (registering clean-up on ``flow``); return the job's source."""
        ...

    def finish_export(self, flow: BackupFlow, plan: DiskPlan) -> None:
        """Release what ``prepare_export`` took, after the mover's success."""
        ...

    def prepare_restore(self, flow: RestoreFlow, disk_id: str, size: int) -> dict[str, Any]:
        """Make a new empty disk writable for a mover; return the job's sink."""
        ...

    def finish_restore(self, flow: RestoreFlow, disk_id: str) -> None: ...


class ImageioMode:
    """Disk image transfer: the engine opens an imageio ticket; movers read or write over HTTPS."""

    name = "imageio"

    def prepare_export(self, flow: BackupFlow, plan: DiskPlan) -> dict[str, Any]:
        from control.flows.backup import ca_pem

        c = flow.client
        if flow.method == "checkpoint":
            t = c.start_transfer(plan.disk.id, "download", backup_id=flow.engine_backup_id, fmt="raw")
        else:
            # Full: the transfer serves the whole chain up to the snapshot, as guest data. Incremental: one
            # layer (shallow), whose unallocated clusters are holes the mover skips, taking them from the base.
            t = c.start_transfer(plan.disk.id, "download", snapshot_id=plan.snapshot_volume, fmt="raw",
                                 shallow=plan.shallow)
        plan.transfer = t
        flow.on_failure(f"cancel transfer of disk {plan.disk.alias}", lambda: c.cancel_transfer(t.id))
        url = t.transfer_url or t.proxy_url
        if not url:
            raise EngineError(f"transfer of disk {plan.disk.alias} has no URL", url=c.url)
        return {"type": "imageio", "transfer_url": url,
                "proxy_url": t.proxy_url if t.transfer_url else None, "ca_pem": ca_pem(flow.engine),
                "size": plan.disk.size, "format": "raw",
                "dirty": plan.kind == "incremental" and flow.method == "checkpoint", "shallow": plan.shallow}

    def finish_export(self, flow: BackupFlow, plan: DiskPlan) -> None:
        if plan.transfer is None:
            return
        phase = flow.client.finalize_transfer(plan.transfer.id)
        if phase not in ("finished_success", "gone"):
            raise EngineError(f"transfer of disk {plan.disk.alias} ended {phase}", url=flow.client.url)

    def prepare_restore(self, flow: RestoreFlow, disk_id: str, size: int) -> dict[str, Any]:
        from control.flows.backup import ca_pem

        c = flow.client
        t = c.start_transfer(disk_id, "upload", fmt="raw")
        flow.transfers[disk_id] = t
        flow.on_failure(f"cancel upload to disk {disk_id}", lambda: c.cancel_transfer(t.id))
        url = t.transfer_url or t.proxy_url
        if not url:
            raise EngineError(f"upload to disk {disk_id} has no URL", url=c.url)
        return {"type": "imageio", "transfer_url": url, "proxy_url": t.proxy_url if t.transfer_url else None,
                "ca_pem": ca_pem(flow.engine), "size": size, "format": "raw"}

    def finish_restore(self, flow: RestoreFlow, disk_id: str) -> None:
        t = flow.transfers.get(disk_id)
        if t is None:
            return
        phase = flow.client.finalize_transfer(t.id)
        if phase not in ("finished_success", "gone"):
            raise EngineError(f"upload to disk {disk_id} ended {phase}", url=flow.client.url)


MODES: dict[str, Mode] = {"imageio": ImageioMode()}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise UsageError(f"mode {name!r} is not available here (available: {', '.join(sorted(MODES))})") \
            from None


def register_mode(mode: Mode) -> None:
    """Add a mode (the ssh and attach modes call this)."""
    MODES[mode.name] = mode
