"""VM backups (oVirt 4.4+ incremental backup API) and checkpoints."""

from __future__ import annotations

import logging
from typing import Any

import ovirtsdk4.types as types

from control.engine.base import EngineBase
from control.errors import EngineConflict, EngineError, EngineUnreachable, NotFound

log = logging.getLogger(__name__)

_BACKUP_DONE = (types.BackupPhase.SUCCEEDED, types.BackupPhase.FAILED)


class BackupOps(EngineBase):
    def checkpoints(self, vm_id: str) -> list[Any]:
        """The VM's checkpoints, oldest (the root) first, following parent links."""
        cps = self.call("list checkpoints", lambda: self.vm_service(vm_id).checkpoints_service().list(), "VM", vm_id)
        by_parent = {c.parent_id: c for c in cps}
        ordered: list[Any] = []
        ids = {c.id for c in cps}
        roots = [c for c in cps if not c.parent_id or c.parent_id not in ids]
        cur = roots[0] if roots else None
        while cur is not None and len(ordered) < len(cps):
            ordered.append(cur)
            cur = by_parent.get(cur.id)
        ordered += [c for c in cps if c not in ordered]
        return ordered

    def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> bool:
        """Remove a checkpoint (the engine allows the root only). False if it was already gone."""
        svc = self.vm_service(vm_id).checkpoints_service().checkpoint_service(checkpoint_id)
        try:
            self.call("remove checkpoint", svc.remove, "checkpoint", checkpoint_id)
        except NotFound:
            return False
        log.info("checkpoint removed vm=%s checkpoint=%s", vm_id, checkpoint_id)
        return True

    def start_backup(self, vm_id: str, disk_ids: list[str], from_checkpoint: str | None) -> Any:
        """Start a VM backup of ``disk_ids`` (incremental from ``from_checkpoint`` when given)."""
        svc = self.vm_service(vm_id).backups_service()
        spec = types.Backup(disks=[types.Disk(id=d) for d in disk_ids], from_checkpoint_id=from_checkpoint)
        backup = self.call("start backup", lambda: svc.add(spec, require_consistency=False), "VM", vm_id)
        log.info("backup started vm=%s backup=%s from_checkpoint=%s", vm_id, backup.id, from_checkpoint)
        return backup

    def backup_service(self, vm_id: str, backup_id: str) -> Any:
        return self.vm_service(vm_id).backups_service().backup_service(backup_id)

    def wait_backup_ready(self, vm_id: str, backup_id: str) -> Any:
        svc = self.backup_service(vm_id, backup_id)
        return self.wait(
            f"backup {backup_id}", lambda: self.call("get backup", svc.get, "backup", backup_id),
            done=lambda b: b.phase == types.BackupPhase.READY,
            failed=lambda b: f"phase {b.phase.value}" if b.phase in _BACKUP_DONE else None)

    def backup_disk_modes(self, vm_id: str, backup_id: str) -> dict[str, str]:
        """disk id -> 'full' | 'incremental': what the engine can give for each disk of a ready backup."""
        svc = self.backup_service(vm_id, backup_id).disks_service()
        disks = self.call("list backup disks", svc.list, "backup", backup_id)
        return {d.id: (d.backup_mode.value if d.backup_mode else "full") for d in disks}

    def finalize_backup(self, vm_id: str, backup_id: str, look_first: bool = True) -> str:
        """Finalize a backup and wait for its end; returns the final phase. Idempotent.

        ``look_first=False`` (the normal path: a backup known ready) sends finalize without looking at the
        backup first, one engine round trip less; a refusal is then checked as the look would have been."""
        svc = self.backup_service(vm_id, backup_id)

        def probe() -> Any:
            try:
                return self.call("get backup", svc.get, "backup", backup_id)
            except NotFound:
                return None

        send = True
        if look_first:
            b = probe()
            if b is None:
                return "gone"
            send = b.phase not in _BACKUP_DONE and b.phase != types.BackupPhase.FINALIZING
        if send:
            try:
                self.call("finalize backup", svc.finalize, "backup", backup_id)
            except (EngineConflict, NotFound):
                pass  # finalizing or gone already: waiting below tells which
            except EngineError as e:
                if look_first or isinstance(e, EngineUnreachable):
                    raise
                b = probe()  # refused: fine if it ends or ended anyway (waited for below), an error otherwise
                if b is not None and b.phase not in _BACKUP_DONE and b.phase != types.BackupPhase.FINALIZING:
                    raise

        end = self.wait(f"finalize of backup {backup_id}", probe,
                        done=lambda b: b is None or b.phase in _BACKUP_DONE)
        phase = end.phase.value if end is not None else "gone"
        log.info("backup finalized vm=%s backup=%s phase=%s", vm_id, backup_id, phase)
        return phase

    def backup_checkpoint(self, vm_id: str, backup_id: str) -> str:
        """The checkpoint a backup created (``to_checkpoint_id``)."""
        b = self.call("get backup", self.backup_service(vm_id, backup_id).get, "backup", backup_id)
        if not b.to_checkpoint_id:
            raise EngineError(f"backup {backup_id} reports no checkpoint", url=self.url)
        return str(b.to_checkpoint_id)
