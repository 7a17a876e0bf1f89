"""VMs: list, get (OVF with ``all_content``), add (also from an OVF configuration), remove, start/stop,
freeze/thaw filesystems; disk attachments (the proxy VM's become real block devices); nics (none)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine import disks as disks_mod
from lab.engine import ovf
from lab.engine.http import HttpError, Reply, Request
from lab.engine.search import matches
from lab.engine.state import new_id
from lab.engine.xml import action_reply, href, list_reply, new, obj_reply, read, ref, ts

if TYPE_CHECKING:
    from lab.engine.app import Engine

START_DELAY = 0.3  # powering_up -> up


def vm_ovf(e: Engine, v: dict[str, Any]) -> str:
    triples = []
    for did, a in v["attachments"].items():
        d = e.state.coll("disks").get(did)
        if d and not a.get("snapshot"):
            triples.append((d, a, d["image"]))
    cl = e.state.coll("clusters").get(v["cluster"], {})
    return ovf.build({**v, "cluster_name": cl.get("name", "Default")}, triples, cl.get("dc", ""))


def vm_obj(e: Engine, v: dict[str, Any], all_content: bool = False) -> types.Vm:
    up = v["status"] in ("up", "powering_up")
    agent = v.get("guest_agent") and v["status"] == "up"
    init = None
    if all_content:
        init = types.Initialization(configuration=types.Configuration(
            type=types.ConfigurationType.OVF, data=vm_ovf(e, v)))
    return new(types.Vm,
        id=v["id"], href=href("vms", v["id"]), name=v["name"], description=v.get("description", ""),
        status=types.VmStatus(v["status"]), cluster=ref(types.Cluster, v["cluster"], "clusters"),
        host=ref(types.Host, v.get("host"), "hosts") if up else None,
        memory=v["memory"], cpu=types.Cpu(topology=types.CpuTopology(sockets=v["cpus"], cores=1, threads=1)),
        os=types.OperatingSystem(type=v.get("os", "other_linux")),
        type=types.VmType.SERVER, creation_time=ts(v.get("created")),
        start_time=ts(v.get("started")) if up else None, stop_time=ts(v.get("stopped")) if not up else None,
        template=types.Template(id=ovf.BLANK), origin="ovirt", stateless=False, delete_protected=False,
        initialization=init,
        fqdn=f"{v['name']}.lab" if agent else None,
        guest_operating_system=types.GuestOperatingSystem(family="Linux", distribution="Debian") if agent else None,
        virtio_scsi=types.VirtioScsi(enabled=True),
    )


def followed(e: Engine, v: dict[str, Any], vm: types.Vm, follow: str | None) -> types.Vm:
    """Inline what ``follow=`` asks for, as the engine does: disk_attachments (and their disks), snapshots."""
    if not follow:
        return vm
    wanted = {f.strip() for f in follow.split(",")}
    if wanted & {"disk_attachments", "disk_attachments.disk"}:
        atts = []
        for did, a in v["attachments"].items():
            att = attachment_obj(v["id"], did, a, v)
            d = e.state.coll("disks").get(did)
            if "disk_attachments.disk" in wanted and d is not None:
                att.disk = disks_mod.disk_obj(e, d)
            atts.append(att)
        vm.disk_attachments = atts
    return vm


def attachment_obj(vm_id: str, did: str, a: dict[str, Any], v: dict[str, Any] | None = None) -> types.DiskAttachment:
    logical = a.get("logical_name")
    if logical is None and v is not None and v["status"] == "up" and v.get("guest_agent") and not v.get("proxy"):
        # The guest agent of a running VM reports device names: disks appear as sdX in attachment order.
        logical = "/dev/sd" + "abcdefghijklmnopqrstuvwxyz"[list(v["attachments"]).index(did) % 26]
    return new(types.DiskAttachment,
        id=did, href=href("vms", vm_id, "diskattachments", did),
        disk=ref(types.Disk, did, "disks"), vm=ref(types.Vm, vm_id, "vms"),
        interface=types.DiskInterface(a.get("interface", "virtio_scsi")),
        bootable=bool(a.get("bootable")), active=bool(a.get("active", True)),
        read_only=bool(a.get("read_only")), pass_discard=False, uses_scsi_reservation=False,
        logical_name=logical,
    )


def vm_of_disk(e: Engine, did: str) -> dict[str, Any] | None:
    for v in e.state.coll("vms").values():
        a = v["attachments"].get(did)
        if a and not a.get("snapshot"):
            return v
    return None


def create_vm(e: Engine, name: str, cluster: str, memory: int = 2**30, cpus: int = 1, guest_agent: bool = True,
              description: str = "", os: str = "other_linux", proxy: bool = False) -> dict[str, Any]:
    """A new VM (down) with its "Active VM" snapshot."""
    if any(v["name"] == name for v in e.state.coll("vms").values()):
        raise HttpError(409, "Cannot add VM. The VM name is already in use, please choose a unique name and try again.")
    vid = new_id()
    sid = new_id()
    v = {
        "id": vid, "name": name, "description": description, "status": "down", "cluster": cluster,
        "memory": memory, "cpus": cpus, "os": os, "created": time.time(), "guest_agent": guest_agent,
        "proxy": proxy, "attachments": {}, "active_snapshot": sid, "host": None,
    }
    e.state.coll("vms")[vid] = v
    e.state.coll("snapshots")[sid] = {
        "id": sid, "vm": vid, "type": "active", "description": "Active VM", "status": "ok",
        "date": time.time(), "disks": {}, "ovf": None,
    }
    return v


def attach(e: Engine, v: dict[str, Any], did: str, interface: str = "virtio_scsi", bootable: bool = False,
           active: bool = True, read_only: bool = False, snapshot: str | None = None,
           created: bool = False) -> dict[str, Any]:
    """Attach a disk (or one of its snapshots) to a VM; on the proxy VM this makes a real block device."""
    d = e.state.get("disks", did, "Disk")
    if did in v["attachments"]:
        raise HttpError(409, f"Cannot attach Virtual Disk. The disk is already attached to VM {v['name']}.")
    owner = vm_of_disk(e, did)
    if snapshot is None and owner is not None:
        raise HttpError(409, f"Cannot attach Virtual Disk. The disk is already attached to VM {owner['name']}.")
    if d["status"] != "ok" and snapshot is None and not created:
        raise HttpError(409, f"Cannot attach Virtual Disk. Disk {d['name']} is locked. Please try again in a few minutes.")
    a: dict[str, Any] = {"interface": interface, "bootable": bootable, "active": active,
                         "read_only": read_only or snapshot is not None, "snapshot": snapshot}
    if v.get("proxy") and active:
        dom = e.backend.domains[d["sd"]]
        if snapshot is not None:
            vol = disks_mod.snapshot_volume(e, d, snapshot)
        else:
            vol = d["image"]
        image = dom.volume_path(did, vol)
        a["logical_name"] = e.backend.proxyvm.attach(did, image, dom.qemu_format(did, vol), read_only=a["read_only"])
    v["attachments"][did] = a
    if snapshot is None:
        d["vm_snapshot"] = v["active_snapshot"]
    return a


def detach(e: Engine, v: dict[str, Any], did: str) -> None:
    a = v["attachments"].get(did)
    if a is None:
        raise HttpError(404, f"Entity not found: disk attachment: id={did}")
    if v.get("proxy") and a.get("logical_name"):
        e.backend.proxyvm.detach(did)
    del v["attachments"][did]


def register(e: Engine) -> None:
    r = e.router

    def vms(name: str) -> dict[str, dict[str, Any]]:
        # Looked up per call: a restarted engine has a new state object.
        return e.state.coll(name)

    def get_vm(id: str) -> dict[str, Any]:
        return e.state.get("vms", id, "VM")

    def list_vms(req: Request) -> Reply:
        objs = [followed(e, v, vm_obj(e, v, req.flag("all_content")), req.query.get("follow"))
                for v in vms("vms").values()]
        if req.query.get("search"):
            objs = [o for o in objs if matches(o, req.query["search"])]
        if req.query.get("max"):
            objs = objs[: int(req.query["max"])]
        return list_reply(objs, "vms")

    def add_vm(req: Request) -> Reply:
        spec: types.Vm = read(req, types.Vm)
        fields: dict[str, Any] = {}
        cfg = spec.initialization.configuration if spec.initialization else None
        if cfg is not None and cfg.data:
            try:
                fields = ovf.parse(cfg.data)
            except (ValueError, SyntaxError) as err:
                raise HttpError(400, f"Cannot add VM. Failed to parse the OVF configuration: {err}") from None
        name = spec.name or fields.get("name")
        if not name:
            raise HttpError(400, "Vm [name] required for add", "Incomplete parameters")
        cl = _cluster(e, spec.cluster)
        mem = spec.memory or fields.get("memory") or 2**30
        cpus = (spec.cpu.topology.sockets if spec.cpu and spec.cpu.topology and spec.cpu.topology.sockets
                else fields.get("cpus", 1))
        v = create_vm(e, name, cl, memory=mem, cpus=cpus, description=spec.description or fields.get("description", ""),
                      os=(spec.os.type if spec.os and spec.os.type else fields.get("os", "other_linux")))
        e.state.add_event(f"VM {name} was created by {req.user}.", code=34, vm=v["id"])
        return obj_reply(vm_obj(e, v), 201)

    def remove_vm(req: Request, id: str) -> Reply:
        v = get_vm(id)
        if v["status"] != "down":
            raise HttpError(409, "Cannot remove VM. VM is running.")
        if any(b["vm"] == id and b["phase"] not in ("succeeded", "failed") for b in vms("backups").values()):
            raise HttpError(409, "Cannot remove VM: VM backup is in progress.")
        detach_only = req.flag("detach_only")
        for did in list(v["attachments"]):
            a = v["attachments"][did]
            detach(e, v, did)
            if not detach_only and not a.get("snapshot"):
                disks_mod.delete_disk(e, did)
        for sid in [s["id"] for s in vms("snapshots").values() if s["vm"] == id]:
            del vms("snapshots")[sid]
        for cid in [c["id"] for c in vms("checkpoints").values() if c["vm"] == id]:
            del vms("checkpoints")[cid]
        del vms("vms")[id]
        e.state.add_event(f"VM {v['name']} was successfully removed.", code=113)
        return Reply(200)

    def start(req: Request, id: str) -> Reply:
        v = get_vm(id)
        if v["status"] != "down":
            raise HttpError(409, "Cannot run VM. VM is running.")
        hosts = [h for h in vms("hosts").values() if h["cluster"] == v["cluster"]
                 and getattr(e.backend.hosts.get(h["id"]), "reachable", True)]
        v["host"] = hosts[0]["id"] if hosts else None
        v["status"] = "powering_up"
        v["due"] = time.time() + START_DELAY
        v["started"] = time.time()
        e.state.add_event(f"VM {v['name']} was started by {req.user} (Host: {hosts[0]['name'] if hosts else '-'}).",
                          code=153, vm=id)
        return action_reply()

    def stop(req: Request, id: str) -> Reply:
        v = get_vm(id)
        if v["status"] == "down":
            raise HttpError(409, "Cannot stop VM. VM is not running.")
        v.update(status="down", host=None, stopped=time.time())
        v.pop("due", None)
        e.state.add_event(f"VM {v['name']} powered off by {req.user}.", code=33, vm=id)
        return action_reply()

    def _fs(op: str) -> Any:
        def handler(req: Request, id: str) -> Reply:
            v = get_vm(id)
            if v["status"] != "up":
                raise HttpError(409, f"Cannot {op} filesystems of VM {v['name']}. VM is not running.")
            if not v.get("guest_agent"):
                raise HttpError(409, f"Cannot {op} filesystems of VM {v['name']}: Guest agent is not responding.")
            e.state.data["freeze_log"].append({"vm": id, "op": op, "time": time.time()})
            return action_reply()
        return handler

    r.add("GET", "vms", list_vms)
    r.add("POST", "vms", add_vm)
    r.add("GET", "vms/{id}", lambda req, id: obj_reply(followed(
        e, get_vm(id), vm_obj(e, get_vm(id), req.flag("all_content")), req.query.get("follow"))))
    r.add("DELETE", "vms/{id}", remove_vm)
    r.add("POST", "vms/{id}/start", start)
    r.add("POST", "vms/{id}/stop", stop)
    r.add("POST", "vms/{id}/shutdown", stop)
    r.add("POST", "vms/{id}/freezefilesystems", _fs("freeze"))
    r.add("POST", "vms/{id}/thawfilesystems", _fs("thaw"))
    r.add("GET", "vms/{id}/nics", lambda req, id: (get_vm(id), list_reply([], "nics"))[1])

    def list_att(req: Request, id: str) -> Reply:
        v = get_vm(id)
        return list_reply([attachment_obj(id, did, a, v) for did, a in v["attachments"].items()], "disk_attachments")

    def get_att(req: Request, id: str, did: str) -> Reply:
        v = get_vm(id)
        if did not in v["attachments"]:
            raise HttpError(404, f"Entity not found: disk attachment: id={did}")
        return obj_reply(attachment_obj(id, did, v["attachments"][did], v))

    def add_att(req: Request, id: str) -> Reply:
        v = get_vm(id)
        spec: types.DiskAttachment = read(req, types.DiskAttachment)
        if spec.disk is None:
            raise HttpError(400, "DiskAttachment [disk] required for add", "Incomplete parameters")
        if spec.interface is None:
            raise HttpError(400, "DiskAttachment [interface] required for add", "Incomplete parameters")
        created = spec.disk.id is None
        if created:
            # A new disk in the same request, as the engine allows.
            did = disks_mod.add_disk(e, spec.disk, req)["id"]
        else:
            did = spec.disk.id
        snap = spec.disk.snapshot.id if spec.disk.snapshot else None
        a = attach(e, v, did, spec.interface.value, bool(spec.bootable),
                   True if spec.active is None else bool(spec.active), bool(spec.read_only), snap, created)
        return obj_reply(attachment_obj(id, did, a, v), 201)

    def update_att(req: Request, id: str, did: str) -> Reply:
        v = get_vm(id)
        a = v["attachments"].get(did)
        if a is None:
            raise HttpError(404, f"Entity not found: disk attachment: id={did}")
        spec: types.DiskAttachment = read(req, types.DiskAttachment)
        if spec.bootable is not None:
            a["bootable"] = spec.bootable
        if spec.interface is not None:
            a["interface"] = spec.interface.value
        if spec.read_only is not None:
            a["read_only"] = spec.read_only
        if spec.active is not None:
            a["active"] = spec.active
        if spec.disk is not None and spec.disk.provisioned_size:
            # Extending a VM's disk goes through its attachment, as in the engine's UI and examples.
            disks_mod.extend(e, e.state.get("disks", did, "Disk"), int(spec.disk.provisioned_size))
        return obj_reply(attachment_obj(id, did, a, v))

    def remove_att(req: Request, id: str, did: str) -> Reply:
        v = get_vm(id)
        a = v["attachments"].get(did)
        detach(e, v, did)
        if a and not a.get("snapshot") and req.query.get("detach_only", "true").lower() == "false":
            disks_mod.delete_disk(e, did)
        return Reply(200)

    r.add("GET", "vms/{id}/diskattachments", list_att)
    r.add("POST", "vms/{id}/diskattachments", add_att)
    r.add("GET", "vms/{id}/diskattachments/{did}", get_att)
    r.add("PUT", "vms/{id}/diskattachments/{did}", update_att)
    r.add("DELETE", "vms/{id}/diskattachments/{did}", remove_att)

    def tick(e: Engine) -> None:
        now = time.time()
        for v in e.state.coll("vms").values():
            if v["status"] == "powering_up" and v.get("due", 0) <= now:
                v["status"] = "up"
                v.pop("due", None)
                e.dirty()

    e.ticks.append(tick)


def _cluster(e: Engine, spec: types.Cluster | None) -> str:
    clusters = e.state.coll("clusters")
    if spec is None:
        raise HttpError(400, "Vm [cluster.id|name] required for add", "Incomplete parameters")
    if spec.id:
        e.state.get("clusters", spec.id, "Cluster")
        return spec.id
    for c in clusters.values():
        if c["name"] == spec.name:
            return str(c["id"])
    raise HttpError(404, f"Entity not found: Cluster: name={spec.name}")
