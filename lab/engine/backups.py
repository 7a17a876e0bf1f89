"""VM backups (incremental backup API of oVirt 4.4+) and checkpoints.

A backup freezes a point-in-time view of each disk: the disk's top volume gets a temporary qcow2 layer on top
(the guest writes there from now on) and the old top is what the backup exports, read-only. With a
``from_checkpoint_id`` the export is a transient overlay whose bitmap merges that checkpoint's bitmap of every
layer (lab.storage ``backup_overlay``), served by ``qemu-nbd -B`` for imageio's dirty extents. The new
checkpoint is a persistent bitmap named by its id, added to the temporary layer, so it records exactly the
writes after the point in time. ``finalize`` merges the temporary layer back (vdsm's merge, bitmaps included).
Phases: initializing -> starting -> ready -> finalizing -> succeeded (or failed).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine.http import HttpError, Reply, Request
from lab.engine.phases import refuse_if_busy, step_due, unlocked_disk, vm_child
from lab.engine.state import new_id
from lab.engine.xml import href, list_reply, new, obj_reply, read, ref, ts

if TYPE_CHECKING:
    from lab.engine.app import Engine

log = logging.getLogger("lab.engine.backups")

STEP_DELAY = 0.2


def backup_obj(b: dict[str, Any]) -> types.Backup:
    return new(
        types.Backup, href("vms", b["vm"], "backups", b["id"]), id=b["id"],
        phase=types.BackupPhase(b["phase"]), from_checkpoint_id=b.get("from_checkpoint"),
        to_checkpoint_id=b.get("to_checkpoint") if b["phase"] not in ("initializing", "starting") else None,
        creation_date=ts(b["created"]), modification_date=ts(b.get("modified", b["created"])),
        vm=ref(types.Vm, b["vm"], "vms"), host=ref(types.Host, b.get("host"), "hosts"),
        description=b.get("description"),
        disks=[types.Disk(id=did, backup_mode=types.DiskBackupMode(b["modes"][did]) if did in b["modes"] else None)
               for did in b["disks"]],
    )


def checkpoint_obj(c: dict[str, Any]) -> types.Checkpoint:
    return new(
        types.Checkpoint, href("vms", c["vm"], "checkpoints", c["id"]), id=c["id"],
        parent_id=c.get("parent"), creation_date=ts(c["created"]), state=types.CheckpointState.CREATED,
        vm=ref(types.Vm, c["vm"], "vms"), disks=[types.Disk(id=did) for did in c["disks"]],
    )


def _leaf_checkpoint(e: Engine, vm: str) -> str | None:
    cps = [c for c in e.state.coll("checkpoints").values() if c["vm"] == vm]
    parents = {c.get("parent") for c in cps}
    leaves = [c for c in cps if c["id"] not in parents]
    leaves.sort(key=lambda c: c["created"])
    return leaves[-1]["id"] if leaves else None


def register(e: Engine) -> None:
    r = e.router

    def get_b(vm: str, bid: str) -> dict[str, Any]:
        return vm_child(e, "backups", vm, bid, "Backup")

    def add(req: Request, id: str) -> Reply:
        v = e.state.get("vms", id, "VM")
        spec: types.Backup = read(req, types.Backup)
        refuse_if_busy(e, id, "backup VM")
        wanted = [d.id for d in spec.disks] if spec.disks else [
            did for did, a in v["attachments"].items() if not a.get("snapshot")]
        if not wanted:
            raise HttpError(400, "Backup [disks] required for add", "Incomplete parameters")
        for did in wanted:
            if did not in v["attachments"]:
                raise HttpError(409, f"Cannot backup VM. Disk {did} is not attached to VM {v['name']}.")
            unlocked_disk(e, did, "backup VM")
        frm = spec.from_checkpoint_id
        if frm:
            c = e.state.coll("checkpoints").get(frm)
            if c is None or c["vm"] != id:
                raise HttpError(409, f"Cannot backup VM. Checkpoint {frm} does not exist.")
        bid = new_id()
        b = {
            "id": bid, "vm": id, "phase": "initializing", "from_checkpoint": frm, "to_checkpoint": new_id(),
            "disks": wanted, "modes": {}, "created": time.time(), "due": time.time() + STEP_DELAY,
            "description": spec.description, "exports": {}, "temp": {}, "host": v.get("host"),
            "job": e.job(f"Backing up VM {v['name']}", req),
        }
        e.state.coll("backups")[bid] = b
        e.state.add_event(f"Backup {bid} for VM {v['name']} was initiated by {req.user}.", code=10790, vm=id)
        return obj_reply(backup_obj(b), 201)

    def finalize(req: Request, id: str, bid: str) -> Reply:
        b = get_b(id, bid)
        if b["phase"] != "ready":
            raise HttpError(409, f"Cannot stop VM backup. The backup is in phase {b['phase']}, not ready.")
        b["phase"] = "finalizing"
        b["due"] = time.time() + STEP_DELAY
        from lab.engine.xml import action_reply

        return action_reply()

    def backup_disks(req: Request, id: str, bid: str) -> Reply:
        from lab.engine.disks import disk_obj

        b = get_b(id, bid)
        out = []
        for did in b["disks"]:
            d = e.state.coll("disks").get(did)
            if d:
                o = disk_obj(e, d)
                o.backup_mode = types.DiskBackupMode(b["modes"][did]) if did in b["modes"] else None
                out.append(o)
        return list_reply(out, "disks")

    r.add("GET", "vms/{id}/backups", lambda req, id: (e.state.get("vms", id, "VM"), list_reply(
        [backup_obj(b) for b in e.state.coll("backups").values() if b["vm"] == id], "backups"))[1])
    r.add("POST", "vms/{id}/backups", add)
    r.add("GET", "vms/{id}/backups/{bid}", lambda req, id, bid: obj_reply(backup_obj(get_b(id, bid))))
    r.add("POST", "vms/{id}/backups/{bid}/finalize", finalize)
    r.add("GET", "vms/{id}/backups/{bid}/disks", backup_disks)

    def get_c(vm: str, cid: str) -> dict[str, Any]:
        return vm_child(e, "checkpoints", vm, cid, "Checkpoint")

    def remove_c(req: Request, id: str, cid: str) -> Reply:
        c = get_c(id, cid)
        if c.get("parent") in e.state.coll("checkpoints"):
            raise HttpError(409, "Cannot remove checkpoint. Only the root checkpoint can be removed.")
        if any(b["vm"] == id and b["phase"] not in ("succeeded", "failed") for b in e.state.coll("backups").values()):
            raise HttpError(409, "Cannot remove checkpoint. VM backup is in progress.")
        drop_bitmaps(e, c)
        for other in e.state.coll("checkpoints").values():
            if other.get("parent") == cid:
                other["parent"] = None
        del e.state.coll("checkpoints")[cid]
        return Reply(200)

    r.add("GET", "vms/{id}/checkpoints", lambda req, id: (e.state.get("vms", id, "VM"), list_reply(
        sorted((checkpoint_obj(c) for c in e.state.coll("checkpoints").values() if c["vm"] == id),
               key=lambda o: o.creation_date), "checkpoints"))[1])
    r.add("GET", "vms/{id}/checkpoints/{cid}", lambda req, id, cid: obj_reply(checkpoint_obj(get_c(id, cid))))
    r.add("DELETE", "vms/{id}/checkpoints/{cid}", remove_c)
    r.add("GET", "vms/{id}/checkpoints/{cid}/disks", lambda req, id, cid: list_reply(
        [types.Disk(id=did) for did in get_c(id, cid)["disks"]], "disks"))
    e.ticks.append(tick)


def tick(e: Engine) -> None:
    step_due(e, "backups", lambda b: b["phase"] not in ("ready", "succeeded", "failed"), _step, _step_failed)


def _step(e: Engine, b: dict[str, Any], now: float) -> bool:
    """initializing -> starting (after STEP_DELAY) -> ready; finalizing -> succeeded once its transfers ended."""
    if b["phase"] == "initializing":
        b["phase"] = "starting"
        b["due"] = now + STEP_DELAY
    elif b["phase"] == "starting":
        _start(e, b)
        b["phase"] = "ready"
    elif b["phase"] == "finalizing":
        if any(t.get("backup") == b["id"] and not t["phase"].startswith("finished")
               for t in e.state.coll("transfers").values()):
            return False  # the engine waits for the backup's transfers to end
        _stop(e, b)
        b["phase"] = "succeeded"
        e.end_job(b.get("job"))
        v = e.state.coll("vms").get(b["vm"], {"name": "?"})
        e.state.add_event(f"Backup {b['id']} for VM {v['name']} finalized.", code=10792, vm=b["vm"])
    b["modified"] = now
    return True


def _step_failed(e: Engine, b: dict[str, Any], err: Exception, now: float) -> None:
    log.warning("Backup step failed backup=%s phase=%s error=%s", b["id"][:8], b["phase"], err)
    fail(e, b)
    e.end_job(b.get("job"), ok=False)
    v = e.state.coll("vms").get(b["vm"], {"name": "?"})
    e.state.add_event(f"Backup {b['id']} for VM {v['name']} failed: {err}", "error", 10791, vm=b["vm"])
    b["modified"] = now


def fail(e: Engine, b: dict[str, Any]) -> None:
    """End a backup as failed: temporary layers merged back, its new checkpoint (bitmap and object) dropped."""
    try:
        _stop(e, b)
    except Exception as err:
        log.warning("Backup clean-up failed backup=%s error=%s", b["id"][:8], err)
    cp = b.get("to_checkpoint")
    if cp and b["phase"] in ("initializing", "starting"):
        e.state.coll("checkpoints").pop(cp, None)
        for did in b["disks"]:
            d = e.state.coll("disks").get(did)
            if d is not None:
                try:
                    e.backend.domains[d["sd"]].remove_bitmap_chain(did, d["image"], cp)
                except Exception as err:
                    log.warning("Dropping bitmap failed disk=%s error=%s", did[:8], err)
    b["phase"] = "failed"


def _start(e: Engine, b: dict[str, Any]) -> None:
    v = e.state.coll("vms")[b["vm"]]
    frm = b.get("from_checkpoint")
    cp = e.state.coll("checkpoints").get(frm) if frm else None
    work = e.dir / "backups" / b["id"]
    work.mkdir(parents=True, exist_ok=True)
    live = v["status"] == "up" and v.get("guest_agent")
    if live:
        e.state.data["freeze_log"].append({"vm": v["id"], "op": "freeze", "time": time.time(), "by": "backup"})
    try:
        for did in b["disks"]:
            d = e.state.coll("disks")[did]
            dom = e.backend.domains[d["sd"]]
            top, layer = d["image"], new_id()
            tracked = d["format"] == "cow" and d.get("backup") == "incremental"
            if tracked:
                # The new checkpoint's bitmap goes on the top first; add_layer carries it to the new layer,
                # which records every write after this point in time (lab/README.md, storage section).
                dom.add_bitmap(did, top, b["to_checkpoint"])
            dom.add_layer(did, top, layer)
            d["image"] = layer
            d["vols"][layer] = d["vols"].get(top)
            d.setdefault("hidden", []).append(top)
            b["temp"][did] = {"frozen": top, "layer": layer}
            if cp is not None and tracked and did in cp["disks"]:
                overlay = dom.backup_overlay(did, top, frm, work / f"{did}.qcow2")
                b["exports"][did] = {"path": str(overlay), "fmt": "qcow2", "bitmap": frm}
                b["modes"][did] = "incremental"
            else:
                b["exports"][did] = {"path": str(dom.volume_path(did, top)), "fmt": dom.qemu_format(did, top)}
                b["modes"][did] = "full"
    finally:
        if live:
            e.state.data["freeze_log"].append({"vm": v["id"], "op": "thaw", "time": time.time(), "by": "backup"})
    tracked_disks = [did for did in b["disks"] if e.state.coll("disks")[did].get("backup") == "incremental"
                     and e.state.coll("disks")[did]["format"] == "cow"]
    if tracked_disks:
        e.state.coll("checkpoints")[b["to_checkpoint"]] = {
            "id": b["to_checkpoint"], "vm": b["vm"], "parent": _leaf_checkpoint(e, b["vm"]),
            "created": time.time(), "disks": tracked_disks,
        }
    else:
        b["to_checkpoint"] = None


def _stop(e: Engine, b: dict[str, Any]) -> None:
    """Merge each temporary layer back into the frozen volume; remove the overlays."""
    for t in e.state.coll("transfers").values():
        if t.get("backup") == b["id"]:
            e.backend.unexport(t["id"])
    for did, tmp in list(b["temp"].items()):
        d = e.state.coll("disks").get(did)
        if d is None:
            continue
        dom = e.backend.domains[d["sd"]]
        dom.merge(did, tmp["frozen"])
        d["vols"].pop(tmp["layer"], None)
        d["image"] = tmp["frozen"]
        if tmp["frozen"] in d.get("hidden", []):
            d["hidden"].remove(tmp["frozen"])
        del b["temp"][did]
    shutil.rmtree(e.dir / "backups" / b["id"], ignore_errors=True)
    b["exports"] = {}
    _ = Path


def drop_bitmaps(e: Engine, c: dict[str, Any]) -> None:
    """Remove checkpoint ``c``'s bitmap from every volume of each of its disks that still exists."""
    for did in c["disks"]:
        d = e.state.coll("disks").get(did)
        if d is not None:
            e.backend.domains[d["sd"]].remove_bitmap_chain(did, d["image"], c["id"])
