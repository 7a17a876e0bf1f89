"""Disks and disk snapshots: create (volume made on the storage domain, locked -> ok), delete, update,
sizes from the real files, and the volumes of a disk's chain as disk snapshots."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine.http import HttpError, Reply, Request
from lab.engine.search import matches
from lab.engine.state import new_id
from lab.engine.xml import href, list_reply, new, obj_reply, read, ref, ts

if TYPE_CHECKING:
    from lab.engine.app import Engine

CREATE_DELAY = 0.2  # locked -> ok after creation, as the engine's async task completes


def sizes(e: Engine, d: dict[str, Any]) -> tuple[int, int]:
    """(actual size of the active volume's chain, total) from the files on the domain."""
    dom = e.backend.domains.get(d["sd"])
    if dom is None:
        return 0, 0
    try:
        chain = dom.chain(d["id"], d["image"])
        actual = sum(dom.actual_size(d["id"], v) for v in chain)
    except Exception:
        return int(d.get("actual", 0)), int(d.get("actual", 0))
    d["actual"] = actual
    return actual, actual


def disk_obj(e: Engine, d: dict[str, Any]) -> types.Disk:
    actual, total = sizes(e, d)
    return new(types.Disk,
        id=d["id"], href=href("disks", d["id"]), name=d["name"], alias=d["name"],
        description=d.get("description", ""),
        format=types.DiskFormat(d["format"]), sparse=d["sparse"],
        backup=types.DiskBackup(d.get("backup", "none")),
        provisioned_size=d["size"], actual_size=actual, total_size=total,
        status=types.DiskStatus(d["status"]), image_id=d["image"],
        storage_type=types.DiskStorageType.IMAGE, content_type=types.DiskContentType.DATA,
        storage_domains=[ref(types.StorageDomain, d["sd"], "storagedomains")],
        shareable=False, wipe_after_delete=False, propagate_errors=False, qcow_version=(
            types.QcowVersion.QCOW2_V3 if d["format"] == "cow" else None),
    )


def snapshot_volume(e: Engine, d: dict[str, Any], snapshot_id: str) -> str:
    """The volume of disk ``d`` that belongs to VM snapshot ``snapshot_id``; 404 when it has none."""
    for vol, sid in d["vols"].items():
        if sid == snapshot_id and vol != d["image"]:
            return str(vol)
    raise HttpError(404, f"Entity not found: disk {d['id']} has no volume in snapshot {snapshot_id}")


def disk_snapshot_obj(e: Engine, d: dict[str, Any], vol: str) -> types.DiskSnapshot:
    dom = e.backend.domains[d["sd"]]
    chain = dom.chain(d["id"], d["image"])
    i = chain.index(vol)
    parent = types.DiskSnapshot(id=chain[i - 1]) if i > 0 else None
    fmt = "cow" if dom.qemu_format(d["id"], vol) == "qcow2" else "raw"
    return new(types.DiskSnapshot,
        id=vol, href=href("storagedomains", d["sd"], "disksnapshots", vol), image_id=vol,
        disk=ref(types.Disk, d["id"], "disks"), name=d["name"], alias=d["name"],
        description=d.get("description", ""),
        snapshot=types.Snapshot(id=d["vols"].get(vol)) if d["vols"].get(vol) else None,
        format=types.DiskFormat(fmt), sparse=d["sparse"], provisioned_size=d["size"],
        actual_size=dom.actual_size(d["id"], vol), status=types.DiskStatus.OK,
        storage_domains=[ref(types.StorageDomain, d["sd"], "storagedomains")],
        storage_type=types.DiskStorageType.IMAGE, content_type=types.DiskContentType.DATA,
        parent=parent, active=vol == d["image"],
    )


def disk_snapshots(e: Engine, d: dict[str, Any], include_active: bool = False) -> list[types.DiskSnapshot]:
    dom = e.backend.domains[d["sd"]]
    out = []
    for vol in dom.chain(d["id"], d["image"]):
        if vol == d["image"] and not include_active:
            continue
        if vol in d.get("hidden", ()):
            continue
        out.append(disk_snapshot_obj(e, d, vol))
    return out


def add_disk(e: Engine, spec: types.Disk, req: Request | None = None, status: str = "locked") -> dict[str, Any]:
    """Create a disk from an SDK ``Disk``: validate, make its volume on the domain, locked -> ok."""
    if not spec.provisioned_size:
        raise HttpError(400, "Disk [provisionedSize] required for add", "Incomplete parameters")
    if spec.format is None:
        raise HttpError(400, "Disk [format] required for add", "Incomplete parameters")
    if not spec.storage_domains:
        raise HttpError(400, "Disk [storageDomains] required for add", "Incomplete parameters")
    sd_spec = spec.storage_domains[0]
    sds = e.state.coll("storagedomains")
    sd = sd_spec.id if sd_spec.id else next((s["id"] for s in sds.values() if s["name"] == sd_spec.name), None)
    if sd is None or sd not in sds:
        raise HttpError(404, f"Entity not found: Storage Domain: {sd_spec.id or sd_spec.name}")
    fmt = spec.format.value
    sparse = True if spec.sparse is None else bool(spec.sparse)
    if sds[sd]["kind"] == "block" and fmt == "raw" and sparse:
        raise HttpError(409, "Cannot add Virtual Disk. Disk configuration (RAW Sparse) is incompatible with the storage domain type.")
    backup = spec.backup.value if spec.backup else "none"
    if backup == "incremental" and fmt != "cow":
        raise HttpError(409, "Cannot add Virtual Disk. Incremental backup is supported only for QCOW2 disks.")
    did = spec.id or new_id()
    if did in e.state.coll("disks"):
        raise HttpError(409, f"Cannot add Virtual Disk. Disk {did} already exists.")
    vol = new_id()
    dom = e.backend.domains[sd]
    dom.create_volume(did, vol, int(spec.provisioned_size), fmt, sparse=sparse, description=spec.description or "")
    name = spec.alias or spec.name or f"disk-{did[:8]}"
    d = {
        "id": did, "name": name, "description": spec.description or "", "format": fmt, "sparse": sparse,
        "backup": backup, "size": int(spec.provisioned_size), "sd": sd, "status": status,
        "image": vol, "vols": {vol: None}, "created": time.time(), "due": time.time() + CREATE_DELAY,
    }
    if status == "locked":
        d["job"] = e.job(f"Adding Disk {name}", req)
    e.state.coll("disks")[did] = d
    e.state.add_event(f"Add-Disk operation of '{name}' was initiated by the system.", code=2020)
    return d


def extend(e: Engine, d: dict[str, Any], size: int) -> None:
    """Grow a disk (its leaf volume), as the engine's extend; shrinking is refused with its 409."""
    if size == d["size"]:
        return
    if size < d["size"]:
        raise HttpError(409, "Cannot edit Virtual Disk. New disk size must be larger than the current disk size.")
    if d["status"] != "ok":
        raise HttpError(409, f"Cannot edit Virtual Disk. Disk {d['name']} is locked.")
    e.backend.domains[d["sd"]].resize(d["id"], d["image"], size)
    d["size"] = size


def delete_disk(e: Engine, did: str) -> None:
    d = e.state.coll("disks").pop(did, None)
    if d is None:
        return
    e.backend.domains[d["sd"]].delete_disk(did)
    e.state.add_event(f"Disk {d['name']} was successfully removed from domain.", code=2014)


def register(e: Engine) -> None:
    r = e.router

    def get_disk(id: str) -> dict[str, Any]:
        return e.state.get("disks", id, "Disk")

    def list_disks(req: Request) -> Reply:
        objs = [disk_obj(e, d) for d in e.state.coll("disks").values()]
        if req.query.get("search"):
            objs = [o for o in objs if matches(o, req.query["search"])]
        if req.query.get("max"):
            objs = objs[: int(req.query["max"])]
        return list_reply(objs, "disks")

    def add(req: Request) -> Reply:
        d = add_disk(e, read(req, types.Disk), req)
        return obj_reply(disk_obj(e, d), 201)

    def remove(req: Request, id: str) -> Reply:
        from lab.engine.vms import vm_of_disk

        d = get_disk(id)
        if d["status"] == "locked":
            raise HttpError(409, f"Cannot remove Virtual Disk. Disk {d['name']} is locked. Please try again in a few minutes.")
        if any(t["disk"] == id and not t["phase"].startswith("finished") for t in e.state.coll("transfers").values()):
            raise HttpError(409, f"Cannot remove Virtual Disk. Disk {d['name']} is being transferred.")
        v = vm_of_disk(e, id)
        if v is not None:
            if v["status"] != "down":
                raise HttpError(409, "Cannot remove Virtual Disk. VM is running.")
            del v["attachments"][id]
        for other in e.state.coll("vms").values():
            if id in other["attachments"]:
                from lab.engine.vms import detach

                detach(e, other, id)
        delete_disk(e, id)
        return Reply(200)

    def update(req: Request, id: str) -> Reply:
        d = get_disk(id)
        spec: types.Disk = read(req, types.Disk)
        if spec.alias or spec.name:
            d["name"] = spec.alias or spec.name
        if spec.description is not None:
            d["description"] = spec.description
        if spec.backup is not None:
            if spec.backup.value == "incremental" and d["format"] != "cow":
                raise HttpError(409, "Cannot edit Virtual Disk. Incremental backup is supported only for QCOW2 disks.")
            d["backup"] = spec.backup.value
        if spec.provisioned_size:
            extend(e, d, int(spec.provisioned_size))
        return obj_reply(disk_obj(e, d))

    r.add("GET", "disks", list_disks)
    r.add("POST", "disks", add)
    r.add("GET", "disks/{id}", lambda req, id: obj_reply(disk_obj(e, get_disk(id))))
    r.add("PUT", "disks/{id}", update)
    r.add("DELETE", "disks/{id}", remove)
    r.add("GET", "disks/{id}/disksnapshots", lambda req, id: list_reply(
        disk_snapshots(e, get_disk(id), req.flag("include_active")), "disk_snapshots"))

    def sd_disks(req: Request, id: str) -> Reply:
        e.state.get("storagedomains", id, "Storage Domain")
        return list_reply([disk_obj(e, d) for d in e.state.coll("disks").values() if d["sd"] == id], "disks")

    def sd_snaps(req: Request, id: str) -> Reply:
        e.state.get("storagedomains", id, "Storage Domain")
        out: list[types.DiskSnapshot] = []
        for d in e.state.coll("disks").values():
            if d["sd"] == id:
                out += disk_snapshots(e, d, req.flag("include_active"))
        return list_reply(out, "disk_snapshots")

    def sd_snap(req: Request, id: str, sid: str) -> Reply:
        for d in e.state.coll("disks").values():
            if d["sd"] == id and sid in d["vols"] and sid != d["image"]:
                return obj_reply(disk_snapshot_obj(e, d, sid))
        raise HttpError(404, f"Entity not found: disk snapshot: id={sid}")

    r.add("GET", "storagedomains/{id}/disks", sd_disks)
    r.add("GET", "storagedomains/{id}/disksnapshots", sd_snaps)
    r.add("GET", "storagedomains/{id}/disksnapshots/{sid}", sd_snap)

    def tick(e: Engine) -> None:
        now = time.time()
        for d in e.state.coll("disks").values():
            if d["status"] == "locked" and d.get("job") and d.get("due", 0) <= now and not d.get("busy"):
                d["status"] = "ok"
                e.end_job(d.pop("job"))
                e.state.add_event(f"The disk '{d['name']}' was successfully added.", code=2021)
                e.dirty()

    e.ticks.append(tick)
    _ = ts
