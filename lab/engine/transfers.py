"""Image transfers: download and upload of a disk, a disk snapshot or a backup's disk, raw or cow, shallow.

As on a real engine: ``add`` answers at once in phase ``initializing``; the worker then has the host start
``qemu-nbd`` (read-only for downloads, ``-B`` for incremental backups, writable for uploads), installs a ticket
on the host's imageio daemon and one on the proxy daemon, and moves to ``transferring`` with ``transfer_url``
and ``proxy_url``. ``finalize`` -> ``finalizing_success`` -> ``finished_success``; the transfer then
disappears (404) after :data:`KEEP_FINISHED` seconds. ``cancel`` -> ``cancelled_user`` -> ``finalizing_failure``
-> ``finished_failure``; a ticket idle longer than ``inactivity_timeout`` ends the same way through
``cancelled_system``.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from ovirtsdk4 import types

from lab.engine.http import HttpError, Reply, Request
from lab.engine.state import new_id
from lab.engine.xml import action_reply, href, list_reply, new, obj_reply, read, ref

if TYPE_CHECKING:
    from lab.engine.app import Engine

log = logging.getLogger("lab.engine.transfers")

STEP_DELAY = 0.2  # initializing -> transferring, finalizing -> finished
KEEP_FINISHED = 5.0  # seconds a finished transfer stays visible before it is gone (404)
INACTIVITY_TIMEOUT = 60  # the engine's default, seconds
TICKET_TIMEOUT = 300


def transfer_obj(t: dict[str, Any]) -> types.ImageTransfer:
    return new(
        types.ImageTransfer, href("imagetransfers", t["id"]), id=t["id"],
        direction=types.ImageTransferDirection(t["direction"]), format=types.DiskFormat(t["format"]),
        phase=types.ImageTransferPhase(t["phase"]), shallow=t["shallow"],
        transfer_url=t.get("transfer_url") if t["phase"] in ("transferring", "paused_user", "resuming") else None,
        proxy_url=t.get("proxy_url") if t["phase"] in ("transferring", "paused_user", "resuming") else None,
        inactivity_timeout=t["inactivity_timeout"], transferred=t.get("transferred", 0),
        disk=ref(types.Disk, t["disk"], "disks"), image=types.Image(id=t["disk"]),
        host=ref(types.Host, t.get("host"), "hosts"),
        snapshot=types.DiskSnapshot(id=t["snapshot"]) if t.get("snapshot") else None,
        backup=types.Backup(id=t["backup"]) if t.get("backup") else None,
        active=t["phase"] == "transferring",
        timeout_policy=types.ImageTransferTimeoutPolicy.LEGACY,
    )


def _disk_of_volume(e: Engine, vol: str) -> dict[str, Any]:
    for d in e.state.coll("disks").values():
        if vol in d["vols"]:
            return d
    raise HttpError(404, f"Entity not found: disk snapshot: id={vol}")


def register(e: Engine) -> None:
    r = e.router

    def get_t(id: str) -> dict[str, Any]:
        return e.state.get("transfers", id, "ImageTransfer")

    def add(req: Request) -> Reply:
        from lab.engine.vms import vm_of_disk

        spec: types.ImageTransfer = read(req, types.ImageTransfer)
        direction = spec.direction.value if spec.direction else "upload"
        fmt = spec.format.value if spec.format else "cow"
        snapshot = spec.snapshot.id if spec.snapshot else None
        backup = spec.backup.id if spec.backup else None
        if snapshot:
            d = _disk_of_volume(e, snapshot)
            if snapshot == d["image"]:
                raise HttpError(404, f"Entity not found: disk snapshot: id={snapshot}")
        else:
            did = spec.disk.id if spec.disk else spec.image.id if spec.image else None
            if not did:
                raise HttpError(400, "ImageTransfer [disk.id|image.id|snapshot.id] required for add",
                                "Incomplete parameters")
            d = e.state.get("disks", did, "Disk")
        if backup:
            b = e.state.get("backups", backup, "Backup")
            if b["phase"] != "ready":
                raise HttpError(409, f"Cannot transfer Virtual Disk: backup {backup} is not ready (phase {b['phase']}).")
            if d["id"] not in b["disks"]:
                raise HttpError(409, f"Cannot transfer Virtual Disk: disk {d['id']} is not part of backup {backup}.")
            if direction != "download":
                raise HttpError(409, "Cannot transfer Virtual Disk: a backup can only be downloaded.")
        else:
            if d["status"] != "ok":
                raise HttpError(409, f"Cannot transfer Virtual Disk: Disk {d['name']} is locked. Please try again in a few minutes.")
            v = vm_of_disk(e, d["id"])
            if v is not None and v["status"] != "down" and not snapshot:
                raise HttpError(409, f"Cannot transfer Virtual Disk: Disk {d['name']} is attached to a running VM {v['name']}. Use a snapshot or a backup.")
        if direction == "upload" and fmt == "cow" and d["format"] == "raw":
            raise HttpError(409, "Cannot transfer Virtual Disk: cannot upload qcow2 data to a raw disk.")
        host = spec.host.id if spec.host and spec.host.id else None
        if spec.host and spec.host.name and not host:
            host = next((h["id"] for h in e.state.coll("hosts").values() if h["name"] == spec.host.name), None)
        if host is not None:
            rt = e.backend.hosts.get(host)
            if rt is None:
                raise HttpError(404, f"Entity not found: Host: {host}")
            if not rt.reachable:
                raise HttpError(409, f"Cannot transfer Virtual Disk: host {rt.name} is not responding.")
        else:
            up = [rt.id for rt in e.backend.hosts.values() if rt.reachable]
            if not up:
                raise HttpError(409, "Cannot transfer Virtual Disk: no host in status Up in the data center.")
            # As the engine: a backup's disks are served by the host running the VM.
            vm_host = e.state.coll("backups")[backup].get("host") if backup else None
            host = vm_host if vm_host in up else up[0]
        tid = new_id()
        t = {
            "id": tid, "direction": direction, "format": fmt, "disk": d["id"], "snapshot": snapshot,
            "backup": backup, "shallow": bool(spec.shallow), "phase": "initializing", "host": host,
            "inactivity_timeout": spec.inactivity_timeout or INACTIVITY_TIMEOUT, "created": time.time(),
            "due": time.time() + STEP_DELAY, "job": e.job(f"{direction.title()}ing image {d['name']}", req),
            "transferred": 0,
        }
        e.state.coll("transfers")[tid] = t
        if not backup:
            d["status"] = "locked"
            d["busy"] = True
        e.state.add_event(f"Image {direction.title()} with disk {d['name']} was initiated by {req.user}.",
                          code=1031, disk=d["id"])
        return obj_reply(transfer_obj(t), 201)

    def action(name: str, allowed: tuple[str, ...], to: str) -> Any:
        def handler(req: Request, id: str) -> Reply:
            t = get_t(id)
            if t["phase"] not in allowed:
                raise HttpError(409, f"Cannot {name} image transfer: the transfer is in phase {t['phase']}.")
            t["phase"] = to
            t["due"] = time.time() + STEP_DELAY
            return action_reply()
        return handler

    r.add("GET", "imagetransfers", lambda req: list_reply(
        [transfer_obj(t) for t in e.state.coll("transfers").values()], "image_transfers"))
    r.add("POST", "imagetransfers", add)
    r.add("GET", "imagetransfers/{id}", lambda req, id: obj_reply(transfer_obj(get_t(id))))
    r.add("POST", "imagetransfers/{id}/finalize",
          action("finalize", ("transferring", "paused_user", "paused_system", "resuming"), "finalizing_success"))
    r.add("POST", "imagetransfers/{id}/cancel",
          action("cancel", ("initializing", "transferring", "paused_user", "paused_system", "resuming"),
                 "cancelled_user"))
    r.add("POST", "imagetransfers/{id}/pause", action("pause", ("transferring",), "paused_user"))
    r.add("POST", "imagetransfers/{id}/resume", action("resume", ("paused_user", "paused_system"), "resuming"))
    r.add("POST", "imagetransfers/{id}/extend", lambda req, id: (get_t(id), action_reply())[1])
    e.ticks.append(tick)


def tick(e: Engine) -> None:
    now = time.time()
    hang = e.fault("transfer_hang")
    for t in list(e.state.coll("transfers").values()):
        phase = t["phase"]
        if phase == hang:
            continue
        if phase.startswith("finished"):
            if t.get("gone_at", now + 1) <= now:
                del e.state.coll("transfers")[t["id"]]
                e.dirty()
            continue
        if phase == "transferring":
            _watch(e, t, now)
            continue
        if t.get("due", 0) > now:
            continue
        try:
            if phase == "initializing":
                _setup(e, t)
                t["phase"] = "transferring"
                t["last_active"] = now
            elif phase in ("cancelled_user", "cancelled_system"):
                # As the engine: cancelled_* -> finalizing_failure -> finished_failure.
                t["phase"] = "finalizing_failure"
                t["due"] = now + STEP_DELAY
            elif phase == "resuming":
                t["phase"] = "transferring"
                t["last_active"] = now
            elif phase in ("finalizing_success", "finalizing_failure"):
                _teardown(e, t)
                ok = phase == "finalizing_success"
                _finish(e, t, ok, t.get("why", ""))
        except Exception as err:
            log.warning("Transfer step failed transfer=%s phase=%s error=%s", t["id"][:8], phase, err)
            _teardown(e, t)
            _finish(e, t, False, str(err))
        e.dirty()


def _finish(e: Engine, t: dict[str, Any], ok: bool, why: str = "") -> None:
    t["phase"] = "finished_success" if ok else "finished_failure"
    t["gone_at"] = time.time() + KEEP_FINISHED
    e.end_job(t.get("job"), ok)
    d = e.state.coll("disks").get(t["disk"])
    name = d["name"] if d else t["disk"]
    if d is not None and not t.get("backup"):
        d["status"] = "ok"
        d.pop("busy", None)
    if ok:
        e.state.add_event(f"Image {t['direction'].title()} with disk {name} succeeded.", code=1032, disk=t["disk"])
    else:
        e.state.add_event(f"Image {t['direction'].title()} with disk {name} was cancelled. {why}".strip(),
                          "error", 1033, disk=t["disk"])


def _image(e: Engine, t: dict[str, Any]) -> tuple[Any, str, bool, str | None, bool]:
    """(path, qemu format, read_only, bitmap, backing) of what the host exports for ``t``."""
    d = e.state.coll("disks")[t["disk"]]
    dom = e.backend.domains[d["sd"]]
    if t.get("backup"):
        b = e.state.coll("backups")[t["backup"]]
        x = b["exports"][d["id"]]
        from pathlib import Path

        return Path(x["path"]), x["fmt"], True, x.get("bitmap"), True
    vol = t["snapshot"] or d["image"]
    path = dom.volume_path(d["id"], vol)
    dom.activate(vol)
    if t["format"] == "cow" and (t["snapshot"] or t["direction"] == "download") and t["shallow"]:
        # qcow2 bytes of one layer, as vdsm serves a cow transfer of a volume.
        return path, "raw", t["direction"] == "download", None, True
    return path, dom.qemu_format(d["id"], vol), t["direction"] == "download", None, not t["shallow"]


def _setup(e: Engine, t: dict[str, Any]) -> None:
    d = e.state.coll("disks")[t["disk"]]
    rt = e.backend.hosts[t["host"]]
    path, fmt, ro, bitmap, backing = _image(e, t)
    url = e.backend.export(t["id"], path, fmt, read_only=ro, bitmap=bitmap, backing=backing)
    size = path.stat().st_size if fmt == "raw" and d["format"] == "cow" and t["format"] == "cow" else d["size"]
    ticket = secrets.token_hex(16)
    ticket = f"{ticket[:8]}-{ticket[8:12]}-{ticket[12:16]}-{ticket[16:20]}-{ticket[20:32]}"
    ops = ["read"] if ro else ["read", "write"]
    dirty = bitmap is not None
    rt.imageio.add_ticket(ticket, size, url, ops, dirty=dirty, timeout=TICKET_TIMEOUT, transfer_id=t["id"],
                          inactivity_timeout=t["inactivity_timeout"])
    e.backend.proxy.add_ticket(ticket, size, rt.imageio.transfer_url(ticket), ops, dirty=dirty,
                               timeout=TICKET_TIMEOUT, transfer_id=t["id"], inactivity_timeout=t["inactivity_timeout"])
    t["ticket"] = ticket
    t["transfer_url"] = rt.imageio.transfer_url(ticket)
    t["proxy_url"] = e.backend.proxy.transfer_url(ticket)
    log.info("Transfer ready transfer=%s ticket=%s... direction=%s", t["id"][:8], ticket[:8], t["direction"])


def _watch(e: Engine, t: dict[str, Any], now: float) -> None:
    """Progress and the inactivity timeout, from the host daemon's ticket status."""
    rt = e.backend.hosts.get(t["host"])
    if rt is None or not t.get("ticket"):
        return
    if now - t.get("polled", 0) < 1.0:
        return
    t["polled"] = now
    try:
        st = rt.imageio.ticket(t["ticket"])
    except Exception:
        return
    t["transferred"] = int(st.get("transferred") or 0)
    # imageio's idle_time counts from the end of the last request, with or without open connections.
    idle = float(st.get("idle_time") or 0)
    if st.get("active"):
        t["last_active"] = now
    elif idle > t["inactivity_timeout"] and now - t.get("last_active", 0) > t["inactivity_timeout"]:
        log.info("Transfer inactive transfer=%s timeout=%s", t["id"][:8], t["inactivity_timeout"])
        t["phase"] = "cancelled_system"
        t["due"] = now
        t["why"] = "exceeded the inactivity timeout"
    e.dirty()


def _teardown(e: Engine, t: dict[str, Any]) -> None:
    ticket = t.get("ticket")
    if ticket:
        for daemon in (e.backend.proxy, getattr(e.backend.hosts.get(t["host"]), "imageio", None)):
            if daemon is None:
                continue
            try:
                daemon.remove_ticket(ticket)
            except Exception as err:
                log.warning("Remove ticket failed daemon=%s error=%s", getattr(daemon, "name", "?"), err)
    e.backend.unexport(t["id"])
