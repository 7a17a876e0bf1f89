"""The API root and the inventory collections: data centers, clusters, hosts, storage domains, events, jobs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine.http import HttpError, Reply, Request
from lab.engine.search import matches
from lab.engine.xml import href, list_reply, new, obj_reply, read, ref, ts

if TYPE_CHECKING:
    from lab.engine.app import Engine

VERSION = types.Version(major=4, minor=5, build=5, revision=0, full_version="4.5.5-1.el8")
GIB = 1024**3


def datacenter(d: dict[str, Any]) -> types.DataCenter:
    return new(types.DataCenter,
        id=d["id"], href=href("datacenters", d["id"]), name=d["name"], local=False,
        status=types.DataCenterStatus.UP, storage_format=types.StorageFormat.V5,
        version=types.Version(major=4, minor=7),
    )


def cluster(c: dict[str, Any]) -> types.Cluster:
    return new(types.Cluster,
        id=c["id"], href=href("clusters", c["id"]), name=c["name"],
        data_center=ref(types.DataCenter, c["dc"], "datacenters"),
        version=types.Version(major=4, minor=7),
        cpu=types.Cpu(architecture=types.Architecture.X86_64, type="Intel Nehalem Family"),
    )


def host(e: Engine, h: dict[str, Any]) -> types.Host:
    rt = e.backend.hosts.get(h["id"])
    up = rt is None or rt.reachable
    return new(types.Host,
        id=h["id"], href=href("hosts", h["id"]), name=h["name"], address=h["address"],
        status=types.HostStatus.UP if up else types.HostStatus.NON_RESPONSIVE,
        cluster=ref(types.Cluster, h["cluster"], "clusters"),
        port=54321, type=types.HostType.RHEL,
        ssh=types.Ssh(port=h["ssh_port"], fingerprint=h.get("ssh_fingerprint"),
                      public_key=h.get("ssh_public_key"), user=types.User(user_name=h["ssh_user"]),
                      authentication_method=types.SshAuthenticationMethod.PUBLICKEY),
        spm=types.Spm(status=types.SpmStatus.SPM if h.get("spm") else types.SpmStatus.NONE),
        version=types.Version(major=4, minor=50, full_version="vdsm-4.50.5"),
    )


def storage_domain(e: Engine, s: dict[str, Any]) -> types.StorageDomain:
    dom = e.backend.domains.get(s["id"])
    used, available = dom.usage() if dom is not None else (0, 0)
    committed = sum(int(d["size"]) for d in e.state.coll("disks").values() if d["sd"] == s["id"])
    block = s["kind"] == "block"
    storage = types.HostStorage(
        type=types.StorageType.ISCSI if block else types.StorageType(s.get("type", "nfs")),
        # vdsm mounts <address>:<path> on /rhev/data-center/mnt/<address>:<path with / as _>.
        address=None if block else "lab-nfs.localdomain",
        path=None if block else s["path"],
        volume_group=types.VolumeGroup(id=s["id"], name=s["id"]) if block else None,
    )
    return new(types.StorageDomain,
        id=s["id"], href=href("storagedomains", s["id"]), name=s["name"],
        type=types.StorageDomainType.DATA, storage=storage,
        available=available, used=used, committed=committed,
        master=bool(s.get("master")), status=types.StorageDomainStatus.ACTIVE,
        external_status=types.ExternalStatus.OK, storage_format=types.StorageFormat.V5, block_size=512,
        data_centers=[ref(types.DataCenter, s["dc"], "datacenters")],
        backup=False, wipe_after_delete=False, discard_after_delete=False,
    )


def _listing(req: Request, objs: list[Any]) -> list[Any]:
    search = req.query.get("search")
    if search:
        objs = [o for o in objs if matches(o, search)]
    mx = req.query.get("max")
    if mx and int(mx) >= 0:
        objs = objs[: int(mx)]
    return objs


def event(ev: dict[str, Any]) -> types.Event:
    return new(types.Event,
        id=ev["id"], href=href("events", ev["id"]), description=ev["description"],
        severity=types.LogSeverity(ev["severity"]), code=ev["code"], time=ts(ev["time"]),
        origin=ev.get("origin"), custom_id=ev.get("custom_id"), correlation_id=ev.get("correlation_id"),
        vm=ref(types.Vm, ev.get("vm"), "vms"), host=ref(types.Host, ev.get("host"), "hosts"),
        index=int(ev["id"]),
    )


def job(j: dict[str, Any]) -> types.Job:
    return new(types.Job,
        id=j["id"], href=href("jobs", j["id"]), description=j["description"],
        status=types.JobStatus(j["status"]), start_time=ts(j["start"]), end_time=ts(j["end"]),
        last_updated=ts(j["end"] or j["start"]), auto_cleared=True, external=False,
    )


def register(e: Engine) -> None:
    r = e.router

    def root(req: Request) -> Reply:
        return obj_reply(types.Api(
            product_info=types.ProductInfo(name="oVirt Engine", vendor="ovirt.org", version=VERSION,
                                           instance_id=e.state.data.get("instance_id")),
            time=ts(time.time()),
            authenticated_user=types.User(user_name=req.user.split("@")[0]),
            summary=types.ApiSummary(
                vms=types.ApiSummaryItem(total=len(e.state.coll("vms")),
                                         active=sum(v["status"] == "up" for v in e.state.coll("vms").values())),
                hosts=types.ApiSummaryItem(total=len(e.state.coll("hosts")), active=len(e.state.coll("hosts"))),
                storage_domains=types.ApiSummaryItem(total=len(e.state.coll("storagedomains")),
                                                     active=len(e.state.coll("storagedomains"))),
            ),
        ))

    r.add("GET", "", root)

    def simple(name: str, kind: str, conv: Any, tag: str) -> None:
        r.add("GET", name, lambda req: list_reply(
            _listing(req, [conv(o) for o in e.state.coll(name).values()]), tag + "s"))
        r.add("GET", name + "/{id}", lambda req, id: obj_reply(conv(e.state.get(name, id, kind))))

    simple("datacenters", "DataCenter", datacenter, "data_center")
    simple("clusters", "Cluster", cluster, "cluster")
    simple("hosts", "Host", lambda h: host(e, h), "host")
    simple("storagedomains", "StorageDomain", lambda s: storage_domain(e, s), "storage_domain")
    r.add("GET", "datacenters/{id}/storagedomains", lambda req, id: list_reply(
        [storage_domain(e, s) for s in e.state.coll("storagedomains").values() if s["dc"] == id],
        "storage_domains"))
    r.add("GET", "clusters/{id}/hosts", lambda req, id: list_reply(
        [host(e, h) for h in e.state.coll("hosts").values() if h["cluster"] == id], "hosts"))

    def events(req: Request) -> Reply:
        evs = list(e.state.data["events"])
        frm = req.query.get("from")
        if frm:
            evs = [ev for ev in evs if int(ev["id"]) > int(frm)]
        evs.reverse()  # newest first, as the engine lists them
        return list_reply(_listing(req, [event(ev) for ev in evs]), "events")

    def add_event(req: Request) -> Reply:
        ev: types.Event = read(req, types.Event)
        if not ev.description or not ev.origin or ev.severity is None or ev.custom_id is None:
            raise HttpError(400, "Event [description, origin, severity, customId] required for add",
                            "Incomplete parameters")
        stored = e.state.add_event(
            ev.description, ev.severity.value, ev.code or 0, origin=ev.origin, custom_id=ev.custom_id,
            vm=ev.vm.id if ev.vm else None,
        )
        return obj_reply(event(stored), 201)

    def get_event(req: Request, id: str) -> Reply:
        for ev in e.state.data["events"]:
            if ev["id"] == id:
                return obj_reply(event(ev))
        raise HttpError(404, f"Entity not found: event: id={id}")

    r.add("GET", "events", events)
    r.add("POST", "events", add_event)
    r.add("GET", "events/{id}", get_event)

    def jobs(req: Request) -> Reply:
        objs = list(e.state.coll("jobs").values())
        search = req.query.get("search", "")
        if search.startswith("correlation_id="):
            cid = search.split("=", 1)[1]
            objs = [j for j in objs if j.get("correlation_id") == cid]
        return list_reply([job(j) for j in objs], "jobs")

    r.add("GET", "jobs", jobs)
    r.add("GET", "jobs/{id}", lambda req, id: obj_reply(job(e.state.get("jobs", id, "Job"))))
    r.add("GET", "jobs/{id}/steps", lambda req, id: list_reply([], "steps"))
