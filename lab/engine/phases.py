"""What VM backups and snapshots share: objects under a VM that move through phases in the background.

A request (add, finalize, remove) puts the object in a phase with a ``due`` time and returns at once, as the
engine does; the background worker calls each module's ``tick``, which runs ``step_due``: every pending
object whose due time has come takes one step, and a step that raises ends the object through the module's
failure handler. The delays and phase sequences stay in ``backups`` and ``snapshots`` (benchmarks depend on
them); here are only the loop and the checks both word the same way (a VM's object, a busy VM, a locked disk).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lab.engine.http import HttpError

if TYPE_CHECKING:
    from lab.engine.app import Engine

Obj = dict[str, Any]
# One step of an object at the tick's time: True when the object changed, False when it only waits.
Step = Callable[["Engine", Obj, float], bool]
# The end of an object whose step raised (called inside the ``except``: ``log.exception`` works there).
Failed = Callable[["Engine", Obj, Exception, float], None]


def step_due(e: Engine, coll: str, pending: Callable[[Obj], bool], step: Step, failed: Failed) -> None:
    """One tick of ``coll``: ``step`` every ``pending`` object whose ``due`` time has come; ``failed`` if it
    raises. The state is marked dirty after every step that changed something (or failed)."""
    now = time.time()
    for o in list(e.state.coll(coll).values()):
        if not pending(o) or o.get("due", 0) > now:
            continue
        try:
            if not step(e, o, now):
                continue
        except Exception as err:
            failed(e, o, err, now)
        e.dirty()


def vm_child(e: Engine, coll: str, vm_id: str, oid: str, kind: str) -> Obj:
    """The object ``oid`` of ``coll`` (a ``kind``) under VM ``vm_id``: 404 for an unknown VM or object, and
    for another VM's object."""
    e.state.get("vms", vm_id, "VM")
    o = e.state.get(coll, oid, kind)
    if o["vm"] != vm_id:
        raise HttpError(404, f"Entity not found: {kind}: id={oid}")
    return o


def vm_busy(e: Engine, vm_id: str) -> str | None:
    """Why a VM cannot take a snapshot/backup now, in the engine's words, or None."""
    v = e.state.coll("vms")[vm_id]
    for s in e.state.coll("snapshots").values():
        if s["vm"] == vm_id and s["status"] == "locked":
            return f"Snapshot is currently being {'created' if s.get('phase') == 'creating' else 'removed'} for VM {v['name']}."
    for b in e.state.coll("backups").values():
        if b["vm"] == vm_id and b["phase"] not in ("succeeded", "failed"):
            return f"VM {v['name']} is currently in backup."
    return None


def refuse_if_busy(e: Engine, vm_id: str, action: str) -> None:
    """409 ``Cannot <action>. <why>`` while the VM has a snapshot or backup under way."""
    busy = vm_busy(e, vm_id)
    if busy:
        raise HttpError(409, f"Cannot {action}. {busy}")


def unlocked_disk(e: Engine, disk_id: str, action: str) -> Obj:
    """The disk, or 404 if unknown, or 409 ``Cannot <action>. Disk <name> is locked...`` while locked."""
    d = e.state.get("disks", disk_id, "Disk")
    if d["status"] != "ok":
        raise HttpError(409, f"Cannot {action}. Disk {d['name']} is locked. Please try again in a few minutes.")
    return d
