"""VM snapshots: create with all or some disks (a new qcow2 layer per disk, locked -> ok, freeze/thaw around
it when the guest agent runs), remove (vdsm's merge), ``all_content`` OVF, and the disks of a snapshot."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine import disks as disks_mod
from lab.engine.http import HttpError, Reply, Request
from lab.engine.phases import refuse_if_busy, step_due, unlocked_disk, vm_child
from lab.engine.state import new_id
from lab.engine.vms import vm_ovf
from lab.engine.xml import href, list_reply, new, obj_reply, read, ref, ts

if TYPE_CHECKING:
    from lab.engine.app import Engine

log = logging.getLogger("lab.engine.snapshots")

CREATE_DELAY = 0.3  # seconds locked before the layers are made, so clients see the locked state
REMOVE_DELAY = 0.3


def snapshot_obj(e: Engine, s: dict[str, Any], all_content: bool = False) -> types.Snapshot:
    init = None
    if all_content:
        data = s.get("ovf") or vm_ovf(e, e.state.coll("vms")[s["vm"]])
        init = types.Initialization(configuration=types.Configuration(type=types.ConfigurationType.OVF, data=data))
    return new(types.Snapshot,
        id=s["id"], href=href("vms", s["vm"], "snapshots", s["id"]), description=s["description"],
        snapshot_type=types.SnapshotType(s["type"]), snapshot_status=types.SnapshotStatus(s["status"]),
        date=ts(s["date"]), persist_memorystate=False, vm=ref(types.Vm, s["vm"], "vms"), initialization=init,
    )


def register(e: Engine) -> None:
    r = e.router

    def snap(vm_id: str, sid: str) -> dict[str, Any]:
        return vm_child(e, "snapshots", vm_id, sid, "Snapshot")

    def list_snaps(req: Request, id: str) -> Reply:
        e.state.get("vms", id, "VM")
        objs = [snapshot_obj(e, s, req.flag("all_content")) for s in e.state.coll("snapshots").values()
                if s["vm"] == id]
        objs.sort(key=lambda o: o.date)
        return list_reply(objs, "snapshots")

    def add(req: Request, id: str) -> Reply:
        v = e.state.get("vms", id, "VM")
        spec: types.Snapshot = read(req, types.Snapshot)
        refuse_if_busy(e, id, "create Snapshot")
        if spec.disk_attachments:
            wanted = [a.disk.id if a.disk else a.id for a in spec.disk_attachments]
            for did in wanted:
                if did not in v["attachments"] or v["attachments"][did].get("snapshot"):
                    raise HttpError(409, f"Cannot create Snapshot. Disk {did} is not attached to VM {v['name']}.")
        else:
            wanted = [did for did, a in v["attachments"].items() if not a.get("snapshot")]
        for did in wanted:
            unlocked_disk(e, did, "create Snapshot")
        sid = new_id()
        s = {
            "id": sid, "vm": id, "type": "regular", "description": spec.description or "", "status": "locked",
            "phase": "creating", "date": time.time(), "disks": dict.fromkeys(wanted, ""), "ovf": None,
            "due": time.time() + CREATE_DELAY, "job": e.job(f"Creating VM Snapshot {spec.description} for VM {v['name']}", req),
        }
        e.state.coll("snapshots")[sid] = s
        for did in wanted:
            e.state.coll("disks")[did]["status"] = "locked"
        e.state.add_event(f"Snapshot '{s['description']}' creation for VM '{v['name']}' was initiated by {req.user}.",
                          code=45, vm=id)
        return obj_reply(snapshot_obj(e, s), 201)

    def remove(req: Request, id: str, sid: str) -> Reply:
        s = snap(id, sid)
        v = e.state.coll("vms")[id]
        if s["type"] == "active":
            raise HttpError(409, "Cannot remove Snapshot. The Active VM snapshot cannot be removed.")
        if s["status"] == "locked":
            raise HttpError(409, f"Cannot remove Snapshot. Snapshot is currently being {'created' if s.get('phase') == 'creating' else 'removed'} for VM {v['name']}.")
        refuse_if_busy(e, id, "remove Snapshot")
        if e.take_fault("snapshot_remove_conflict"):
            raise HttpError(409, f"Cannot remove Snapshot. The following disks are locked: {', '.join(s['disks'])}. Please try again in a few minutes.")
        for did in s["disks"]:
            for other in e.state.coll("vms").values():
                a = other["attachments"].get(did)
                if a and a.get("snapshot") == sid:
                    raise HttpError(409, f"Cannot remove Snapshot. Disk snapshot is attached to VM {other['name']}.")
            if any(t.get("disk") == did and not t["phase"].startswith("finished")
                   for t in e.state.coll("transfers").values()):
                raise HttpError(409, f"Cannot remove Snapshot. Disk {did} is being transferred.")
        s.update(status="locked", phase="removing", due=time.time() + REMOVE_DELAY,
                 job=e.job(f"Removing Snapshot {s['description']} of VM {v['name']}", req))
        for did in s["disks"]:
            if did in e.state.coll("disks"):
                e.state.coll("disks")[did]["status"] = "locked"
        e.state.add_event(f"Snapshot '{s['description']}' deletion for VM '{v['name']}' was initiated by {req.user}.",
                          code=342, vm=id)
        return Reply(200)

    def snap_disks(req: Request, id: str, sid: str) -> Reply:
        s = snap(id, sid)
        out = []
        for d, vol in _volumes(e, s):
            ds = disks_mod.disk_obj(e, d)
            ds.image_id = vol
            ds.snapshot = types.Snapshot(id=sid)
            ds.href = None
            out.append(ds)
        return list_reply(out, "disks")

    r.add("GET", "vms/{id}/snapshots", list_snaps)
    r.add("POST", "vms/{id}/snapshots", add)
    r.add("GET", "vms/{id}/snapshots/{sid}", lambda req, id, sid: obj_reply(snapshot_obj(e, snap(id, sid), req.flag("all_content"))))
    r.add("DELETE", "vms/{id}/snapshots/{sid}", remove)
    r.add("GET", "vms/{id}/snapshots/{sid}/disks", snap_disks)
    e.ticks.append(tick)


def tick(e: Engine) -> None:
    step_due(e, "snapshots", lambda s: s["status"] == "locked", _step, _step_failed)


def _step(e: Engine, s: dict[str, Any], now: float) -> bool:
    """A locked snapshot's one step: its layers made (creating) or merged away (removing)."""
    if s["phase"] == "creating":
        _create(e, s)
    else:
        _remove(e, s)
    return True


def _step_failed(e: Engine, s: dict[str, Any], err: Exception, now: float) -> None:
    log.exception("Snapshot step failed snapshot=%s", s["id"])
    _fail(e, s, str(err))


def _fail(e: Engine, s: dict[str, Any], why: str) -> None:
    v = e.state.coll("vms").get(s["vm"], {"name": "?"})
    for did in s["disks"]:
        if did in e.state.coll("disks"):
            e.state.coll("disks")[did]["status"] = "ok"
    e.end_job(s.get("job"), ok=False)
    if s["phase"] == "creating":
        e.state.coll("snapshots").pop(s["id"], None)
        e.state.add_event(f"Failed to complete snapshot '{s['description']}' creation for VM '{v['name']}': {why}",
                          "error", 69, vm=s["vm"])
    else:
        s.update(status="ok", phase=None)
        e.state.add_event(f"Failed to delete snapshot '{s['description']}' for VM '{v['name']}': {why}",
                          "error", 357, vm=s["vm"])


def _create(e: Engine, s: dict[str, Any]) -> None:
    v = e.state.coll("vms")[s["vm"]]
    if e.take_fault("snapshot_fail"):
        _fail(e, s, "VDSM command SnapshotVDS failed (lab fault)")
        return
    live = v["status"] == "up"
    if live and v.get("guest_agent"):
        # The engine freezes the guest's filesystems around a live snapshot when the agent answers.
        e.state.data["freeze_log"].append({"vm": v["id"], "op": "freeze", "time": time.time(), "by": "engine"})
    s["ovf"] = vm_ovf(e, v)
    for did in s["disks"]:
        d = e.state.coll("disks")[did]
        dom = e.backend.domains[d["sd"]]
        old, new = d["image"], new_id()
        dom.add_layer(did, old, new)
        d["vols"][old] = s["id"]
        d["vols"][new] = v["active_snapshot"]
        d["image"] = new
        s["disks"][did] = old
        d["status"] = "ok"
    if live and v.get("guest_agent"):
        e.state.data["freeze_log"].append({"vm": v["id"], "op": "thaw", "time": time.time(), "by": "engine"})
    s.update(status="ok", phase=None)
    e.end_job(s.pop("job", None))
    e.state.add_event(f"Snapshot '{s['description']}' creation for VM '{v['name']}' has been completed.",
                      code=68, vm=v["id"])


def _remove(e: Engine, s: dict[str, Any]) -> None:
    v = e.state.coll("vms")[s["vm"]]
    for d, vol in _volumes(e, s):
        did = d["id"]
        dom = e.backend.domains[d["sd"]]
        child = dom.merge(did, vol)
        # The snapshot's volume takes its child's place (and id role): as vdsm's merge leaves it.
        d["vols"][vol] = d["vols"].pop(child, None)
        if d["image"] == child:
            d["image"] = vol
        for other in e.state.coll("snapshots").values():
            if other["disks"].get(did) == child:
                other["disks"][did] = vol
        d["status"] = "ok"
    e.end_job(s.get("job"))
    e.state.coll("snapshots").pop(s["id"], None)
    e.state.add_event(f"Snapshot '{s['description']}' deletion for VM '{v['name']}' has been completed.",
                      code=356, vm=v["id"])


def _volumes(e: Engine, s: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(disk, volume) of each disk of the snapshot that still exists and has its layer made."""
    disks = e.state.coll("disks")
    return [(disks[did], vol) for did, vol in s["disks"].items() if did in disks and vol]
