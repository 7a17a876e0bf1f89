"""Lab-only endpoints under ``/ovirt-engine/lab/`` (no real engine has them): VMs with realistic disks,
guest writes, faults on demand, freeze/thaw records, volume chains. JSON in and out; no auth, loopback only."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab import qemu
from lab.engine import backups as backups_mod
from lab.engine import disks as disks_mod
from lab.engine import vms as vms_mod
from lab.engine.http import HttpError, Reply, Request, json_reply

if TYPE_CHECKING:
    from lab.engine.app import Engine

log = logging.getLogger("lab.engine.labapi")
FAULTS = ("snapshot_fail", "snapshot_remove_conflict", "transfer_hang", "host_down", "checkpoint_broken",
          "engine_restart")


def _body(req: Request) -> dict[str, Any]:
    try:
        return dict(json.loads(req.body or b"{}"))
    except ValueError as e:
        raise HttpError(400, f"bad JSON: {e}") from None


def find_vm(e: Engine, key: str) -> dict[str, Any]:
    vms = e.state.coll("vms")
    if key in vms:
        return vms[key]
    for v in vms.values():
        if v["name"] == key:
            return v
    raise HttpError(404, f"Entity not found: VM: {key}")


def find_disk(e: Engine, v: dict[str, Any], key: int | str) -> dict[str, Any]:
    ids = [did for did, a in v["attachments"].items() if not a.get("snapshot")]
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        i = int(key)
        if i >= len(ids):
            raise HttpError(404, f"VM {v['name']} has {len(ids)} disks, no disk {i}")
        return e.state.coll("disks")[ids[i]]
    for did in ids:
        d = e.state.coll("disks")[did]
        if key in (did, d["name"]):
            return d
    raise HttpError(404, f"Entity not found: disk {key} of VM {v['name']}")


def register(e: Engine) -> None:
    r = e.lab_router

    def create_vm(req: Request) -> Reply:
        """Build the images first and copy them in without the engine lock: big disks take a while, and the
        engine keeps answering meanwhile (the disks show as locked, as during a real copy)."""
        from lab.images import build_image

        body = _body(req)
        specs = list(body.get("disks", []))
        images = []
        for i, spec in enumerate(specs):
            fill = float(spec.get("fill", 0.5))
            size = int(spec.get("size", 64 * 2**20))
            images.append(build_image(None, size, fill=fill, seed=int(spec.get("seed", i)), fmt="raw")
                          if fill > 0 else None)
        with e.state.lock:
            cl = body.get("cluster") or next(iter(e.state.coll("clusters")))
            v = vms_mod.create_vm(e, body["name"], cl, memory=int(body.get("memory", 2**30)),
                                  cpus=int(body.get("cpus", 1)), guest_agent=bool(body.get("guest_agent", True)))
            made = []
            for i, spec in enumerate(specs):
                fmt = spec.get("format", "cow")
                disk = types.Disk(
                    alias=spec.get("name", f"{body['name']}_Disk{i + 1}"),
                    provisioned_size=int(spec.get("size", 64 * 2**20)), format=types.DiskFormat(fmt),
                    sparse=bool(spec.get("sparse", True)),
                    storage_domains=[types.StorageDomain(name=spec.get("storage_domain", "nfs-data"))],
                    backup=types.DiskBackup(spec.get("backup", "incremental" if fmt == "cow" else "none")),
                )
                d = disks_mod.add_disk(e, disk, None, status="locked")
                d["busy"] = True
                made.append(d)
            e.state.save()
        try:
            for d, img in zip(made, images, strict=True):
                if img is not None:
                    dom = e.backend.domains[d["sd"]]
                    qemu.run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O",
                              dom.qemu_format(d["id"], d["image"]), str(img.path),
                              str(dom.volume_path(d["id"], d["image"]))], timeout=3600)
        finally:
            with e.state.lock:
                for d in made:
                    d.pop("busy", None)
        with e.state.lock:
            for d in made:
                if d["status"] == "locked":
                    d["status"] = "ok"
                    e.end_job(d.pop("job", None))
            for i, (d, spec) in enumerate(zip(made, specs, strict=True)):
                vms_mod.attach(e, v, d["id"], spec.get("interface", "virtio_scsi"), bootable=i == 0, created=True)
            if body.get("start", True):
                v.update(status="up", host=next(iter(e.state.coll("hosts"))), started=time.time())
            e.state.add_event(f"VM {v['name']} was created by the lab.", code=34, vm=v["id"])
            e.state.save()
        return json_reply({"id": v["id"], "name": v["name"], "disks": [d["id"] for d in made]}, 201)

    create_vm.unlocked = True  # type: ignore[attr-defined]

    def write(req: Request, vm: str) -> Reply:
        from lab import guest

        body = _body(req)
        v = find_vm(e, vm)
        d = find_disk(e, v, body.get("disk", 0))
        dom = e.backend.domains[d["sd"]]
        try:
            extents = guest.write(dom.volume_path(d["id"], d["image"]), dom.qemu_format(d["id"], d["image"]),
                                  float(body.get("percent", 1.0)), int(body.get("seed", 0)))
        except Exception as err:
            raise HttpError(409, f"guest write failed: {err}") from None
        return json_reply(extents)

    def get_faults(req: Request) -> Reply:
        return json_reply(e.state.data["faults"])

    def set_fault(req: Request) -> Reply:
        body = _body(req)
        name, value = body.get("name"), body.get("value", True)
        if name not in FAULTS:
            raise HttpError(400, f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
        if name == "engine_restart":
            downtime = float(value) if not isinstance(value, bool) else 1.0
            # Answer first, then restart: the caller sees the engine go away and come back.
            threading.Timer(0.1, e.restart, (downtime,)).start()
            return json_reply({"restarting": downtime})
        if name == "host_down":
            _host_down(e, str(value), True)
        if name == "checkpoint_broken":
            _break_checkpoint(e, str(value))
        e.state.data["faults"][name] = value
        return json_reply(e.state.data["faults"])

    def clear_faults(req: Request) -> Reply:
        down = e.state.data["faults"].get("host_down")
        if down:
            _host_down(e, str(down), False)
        e.state.data["faults"] = {}
        return json_reply({})

    def chain(req: Request, id: str) -> Reply:
        d = e.state.get("disks", id, "Disk")
        dom = e.backend.domains[d["sd"]]
        if req.query.get("host") == "true" and e.backend.rhev_root is not None:
            # The paths a host sees, under the lab's stand-in for /rhev/data-center.
            return json_reply([str(dom.host_path(e.backend.rhev_root, id, v)) for v in dom.chain(id, d["image"])])
        return json_reply([str(dom.volume_path(id, v)) for v in dom.chain(id, d["image"])])

    def update_vm(req: Request, vm: str) -> Reply:
        body = _body(req)
        v = find_vm(e, vm)
        if "guest_agent" in body:
            v["guest_agent"] = bool(body["guest_agent"])
        return json_reply({"id": v["id"], "name": v["name"], "guest_agent": v["guest_agent"], "status": v["status"]})

    r.add("POST", "vms", create_vm)
    r.add("PUT", "vms/{vm}", update_vm)
    r.add("POST", "vms/{vm}/write", write)
    r.add("GET", "faults", get_faults)
    r.add("POST", "faults", set_fault)
    r.add("DELETE", "faults", clear_faults)
    r.add("GET", "freezelog", lambda req: json_reply(e.state.data["freeze_log"]))
    r.add("GET", "disks/{id}/chain", chain)


def _host_down(e: Engine, key: str, down: bool) -> None:
    """A host stops answering: its sshd and imageio daemon go away (and come back when cleared)."""
    for rt in e.backend.hosts.values():
        if key in (rt.id, rt.name):
            if down and rt.reachable:
                rt.reachable = False
                rt.imageio.stop()
                rt.sshd.stop()
            elif not down and not rt.reachable:
                rt.imageio.start()
                rt.sshd.start()
                rt.reachable = True
            e.state.add_event(f"Host {rt.name} is {'non responsive' if down else 'up'}.",
                              "error" if down else "normal", 9 if down else 10, host=rt.id)
            return
    raise HttpError(404, f"Entity not found: Host: {key}")


def _break_checkpoint(e: Engine, cid: str) -> None:
    """The checkpoint stays listed but its bitmap is gone from every disk (as after an unclean shutdown)."""
    backups_mod.drop_bitmaps(e, e.state.get("checkpoints", cid, "Checkpoint"))
