"""Snapshots: create with a subset of disks, wait, list disk snapshots, remove (retrying 409s)."""

from __future__ import annotations

import logging
import time
from typing import Any

import ovirtsdk4.types as types

from control.engine.base import EngineBase
from control.errors import EngineConflict, NotFound

log = logging.getLogger(__name__)

# A snapshot removal answers 409 while the engine still merges or locks the VM; real engines stay busy for
# seconds to minutes, so retry with backoff for up to this long before giving up.
REMOVE_CONFLICT_TIMEOUT = 300.0


class SnapshotOps(EngineBase):
    def snapshots(self, vm_id: str) -> list[Any]:
        """Regular snapshots of the VM (not the 'Active VM' pseudo-snapshot), oldest first."""
        snaps = self.call("list snapshots", lambda: self.vm_service(vm_id).snapshots_service().list(), "VM", vm_id)
        snaps = [s for s in snaps if s.snapshot_type != types.SnapshotType.ACTIVE]
        return sorted(snaps, key=lambda s: s.date.timestamp() if s.date else 0.0)

    def create_snapshot(self, vm_id: str, disk_ids: list[str], description: str) -> str:
        """Create a crash-consistent snapshot of ``disk_ids`` (no memory); return its id once it is ok."""
        svc = self.vm_service(vm_id).snapshots_service()
        snap = types.Snapshot(
            description=description, persist_memorystate=False,
            disk_attachments=[types.DiskAttachment(disk=types.Disk(id=d)) for d in disk_ids])
        created = self.call("create snapshot", lambda: svc.add(snap), "VM", vm_id)
        log.info("snapshot created vm=%s snapshot=%s disks=%d", vm_id, created.id, len(disk_ids))
        return str(created.id)

    def wait_snapshot(self, vm_id: str, snapshot_id: str) -> Any:
        svc = self.vm_service(vm_id).snapshots_service().snapshot_service(snapshot_id)
        return self.wait(
            f"snapshot {snapshot_id}",
            lambda: self.call("get snapshot", svc.get, "snapshot", snapshot_id),
            done=lambda s: s.snapshot_status == types.SnapshotStatus.OK,
            failed=lambda s: None if s.snapshot_status in (types.SnapshotStatus.OK, types.SnapshotStatus.LOCKED)
            else f"status {s.snapshot_status}")

    def snapshot_disks(self, vm_id: str, snapshot_id: str) -> dict[str, str]:
        """disk id -> disk snapshot id (the snapshot's volume) of the disks in a snapshot."""
        svc = self.vm_service(vm_id).snapshots_service().snapshot_service(snapshot_id).disks_service()
        disks = self.call("list snapshot disks", svc.list, "snapshot", snapshot_id)
        return {d.id: d.image_id for d in disks}

    def disk_snapshots(self, disk_id: str) -> list[Any]:
        """Disk snapshots of a disk (its qcow2 volumes held by snapshots)."""
        svc = self.system.disks_service().disk_service(disk_id).disk_snapshots_service()
        return self.call("list disk snapshots", svc.list, "disk", disk_id)

    def remove_snapshot(self, vm_id: str, snapshot_id: str, timeout: float = REMOVE_CONFLICT_TIMEOUT) -> bool:
        """Remove a snapshot (merging it) and wait until it is gone. False if it was already gone.

        Idempotent: clean-up calls it whatever state the flow reached.
        """
        svc = self.vm_service(vm_id).snapshots_service().snapshot_service(snapshot_id)
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                self.call("remove snapshot", svc.remove, "snapshot", snapshot_id)
                break
            except NotFound:
                return False
            except EngineConflict as e:
                if time.monotonic() > deadline:
                    raise
                log.info("snapshot busy, retrying vm=%s snapshot=%s reason=%s", vm_id, snapshot_id, e.reason)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

        def gone() -> bool:
            try:
                self.call("get snapshot", svc.get, "snapshot", snapshot_id)
                return False
            except NotFound:
                return True

        self.wait(f"removal of snapshot {snapshot_id}", gone, done=bool)
        log.info("snapshot removed vm=%s snapshot=%s", vm_id, snapshot_id)
        return True
