"""Image transfers: download of a disk, disk snapshot or backup; upload to a disk; finalize; cancel."""

from __future__ import annotations

import logging
from typing import Any

import ovirtsdk4.types as types

from control.engine.base import EngineBase, Transfer
from control.errors import EngineConflict, EngineError, EngineUnreachable, NotFound

log = logging.getLogger(__name__)

# Seconds without I/O before the engine cancels a transfer on its own: longer than a mover's worst pause
# (a redelivery after a killed mover waits for the ack deadline), so a live job is never cut off.
INACTIVITY_TIMEOUT = 600

_ENDED = (types.ImageTransferPhase.FINISHED_SUCCESS, types.ImageTransferPhase.FINISHED_FAILURE,
          types.ImageTransferPhase.CANCELLED, types.ImageTransferPhase.CANCELLED_SYSTEM,
          types.ImageTransferPhase.CANCELLED_USER, types.ImageTransferPhase.FINISHED_CLEANUP)
_FAILED = (types.ImageTransferPhase.FINISHED_FAILURE, types.ImageTransferPhase.CANCELLED,
           types.ImageTransferPhase.CANCELLED_SYSTEM, types.ImageTransferPhase.CANCELLED_USER,
           types.ImageTransferPhase.PAUSED_SYSTEM, types.ImageTransferPhase.FINALIZING_FAILURE)


def _short_id(tid: str) -> str:
    return tid[:8]


class TransferOps(EngineBase):
    def transfer_service(self, transfer_id: str) -> Any:
        return self.system.image_transfers_service().image_transfer_service(transfer_id)

    def start_transfer(self, disk_id: str, direction: str, *, backup_id: str | None = None,
                       snapshot_id: str | None = None, fmt: str = "raw", shallow: bool = False,
                       timeout: float | None = None) -> Transfer:
        """Create an image transfer and wait until it is transferring (URLs ready).

        ``snapshot_id`` is a disk snapshot (volume) id; ``backup_id`` a VM backup id; neither: the disk.
        """
        spec = types.ImageTransfer(
            direction=types.ImageTransferDirection(direction),
            format=types.DiskFormat(fmt),
            inactivity_timeout=INACTIVITY_TIMEOUT,
            shallow=shallow or None,
            backup=types.Backup(id=backup_id) if backup_id else None,
            snapshot=types.DiskSnapshot(id=snapshot_id) if snapshot_id else None,
            disk=types.Disk(id=disk_id) if not snapshot_id else None,
        )
        t = self.call("start image transfer", lambda: self.system.image_transfers_service().add(spec),
                      "disk", disk_id)
        log.info("transfer started disk=%s transfer=%s direction=%s", disk_id, _short_id(t.id), direction)
        svc = self.transfer_service(t.id)
        try:
            t = self.wait(
                f"image transfer of disk {disk_id}", lambda: self.call("get transfer", svc.get, "transfer"),
                done=lambda x: x.phase == types.ImageTransferPhase.TRANSFERRING,
                failed=lambda x: f"phase {x.phase.value}" if x.phase in _FAILED or x.phase in _ENDED else None,
                timeout=timeout)
        except BaseException:
            self.cancel_transfer(t.id)
            raise
        return Transfer(id=t.id, transfer_url=t.transfer_url, proxy_url=t.proxy_url, phase=t.phase.value)

    def finalize_transfer(self, transfer_id: str) -> str:
        """Finalize and wait for the end; returns the final phase ('gone' if it vanished). Idempotent.

        The normal path (a transfer the mover is done with, still transferring): finalize is sent without
        looking first, one engine round trip less per disk; a transfer that had ended anyway answers the
        refusal with its end phase, as the look first would have."""
        return self._end(transfer_id, "finalize", look_first=False)

    def cancel_transfer(self, transfer_id: str) -> str:
        """Cancel and wait for the end (clean-up path). Idempotent."""
        return self._end(transfer_id, "cancel")

    def _end(self, transfer_id: str, action: str, look_first: bool = True) -> str:
        svc = self.transfer_service(transfer_id)

        def probe() -> Any:
            try:
                return self.call("get transfer", svc.get, "transfer", transfer_id)
            except NotFound:
                return None

        send = True
        if look_first:
            t = probe()
            if t is None:
                return "gone"
            send = t.phase not in _ENDED
        if send:
            try:
                self.call(f"{action} transfer", getattr(svc, action), "transfer", transfer_id)
            except (NotFound, EngineConflict):
                pass  # ended meanwhile (or gone), or already finalizing: waiting below tells which
            except EngineError as e:
                if look_first or isinstance(e, EngineUnreachable):
                    raise
                # Refused without a look first: an ended transfer is what a look would have found (waited
                # for below); one still running refused it for a reason of its own.
                t = probe()
                if t is not None and t.phase not in _ENDED:
                    raise
        end = self.wait(f"{action} of transfer {_short_id(transfer_id)}", probe,
                        done=lambda x: x is None or x.phase in _ENDED)
        phase = end.phase.value if end is not None else "gone"
        log.info("transfer ended transfer=%s action=%s phase=%s", _short_id(transfer_id), action, phase)
        return phase

    def transfers(self) -> list[Any]:
        return self.call("list transfers", lambda: self.system.image_transfers_service().list())
