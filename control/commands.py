"""The VM-level commands: ``ferry up``, ``control``, ``engine``, ``vms``, ``backup``, ``backups``, ``restore``.

``backup`` and ``restore`` are clients of the control plane's triggers over NATS (so they work the same
against ``ferry up`` on this machine or a control plane elsewhere); ``engine``, ``vms`` and ``backups`` read
the catalog and the engine directly. Every command takes ``--data-dir``; data output takes ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from control import config as configmod
from control.catalog import Catalog
from control.config import Config
from control.errors import UsageError
from control.procs import stop as stop_processes
from mover import jobs

URL_FILE = "url"  # in <data_dir>/nats: the URL of the embedded server, for the CLI commands that follow


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="Ferry's data directory (default: ~/.local/share/ferry)")
    common.add_argument("--config", help="config file (default: ~/.config/ferry/config.json)")
    common.add_argument("--nats", help="NATS URL (default: the embedded server of the data directory)")
    common.add_argument("--store", help="store directory or file:// URL (default: <data-dir>/store)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="machine-readable output")

    p = subparsers.add_parser("up", parents=[common], help="run embedded NATS, the control plane and movers")
    p.add_argument("--movers", type=int, default=2, help="mover processes to start (default 2)")
    p.add_argument("--workers", type=int, default=0, help="worker threads per mover (default: the mover's)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("control", parents=[common], help="run the control plane (embedded NATS if none)")
    p.set_defaults(func=cmd_control)

    p = subparsers.add_parser("engine", help="manage engines (oVirt/OLVM/RHV managers)")
    esub = p.add_subparsers(dest="engine_cmd", metavar="ACTION")
    e = esub.add_parser("add", parents=[common, js], help="add an engine (checks the login)")
    e.add_argument("url", help="https://ENGINE/ovirt-engine/api (or the engine's host name)")
    e.add_argument("--user", required=True, help="user@domain, e.g. admin@internal")
    e.add_argument("--password-file", required=True, help="file holding the password (copied, mode 0600)")
    e.add_argument("--ca-file", required=True, help="the engine's CA certificate (PEM)")
    e.add_argument("--no-check", action="store_true", help="do not log in to check")
    e.set_defaults(func=cmd_engine_add)
    e = esub.add_parser("remove", parents=[common], help="forget an engine (its backups stay)")
    e.add_argument("engine", help="engine URL or id")
    e.set_defaults(func=cmd_engine_remove)
    e = esub.add_parser("list", parents=[common, js], help="list engines")
    e.set_defaults(func=cmd_engine_list)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = subparsers.add_parser("vms", parents=[common, js], help="list the VMs of the engines")
    p.add_argument("--engine", help="engine URL or id (default: all)")
    p.set_defaults(func=cmd_vms)

    p = subparsers.add_parser("backup", parents=[common, js], help="back up VMs")
    p.add_argument("vms", nargs="+", metavar="VM", help="VM names or ids")
    p.add_argument("--mode", default="imageio", choices=["imageio", "ssh", "attach"],
                   help="export mode (default imageio; ssh and attach are not built yet)")
    p.add_argument("--type", default="incremental", choices=["full", "incremental"],
                   help="incremental falls back to full when there is no usable earlier backup")
    p.add_argument("--method", choices=["checkpoint", "snapshot"], help="default: checkpoint when possible")
    p.add_argument("--exclude", action="append", default=[], metavar="DISK", help="disk alias or id to skip")
    p.add_argument("--no-freeze", action="store_true", help="do not freeze guest filesystems")
    p.add_argument("--engine", help="engine URL or id (default: the VM's engine, or the only one)")
    p.add_argument("--no-wait", action="store_true", help="print the backup ids and return at once")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")
    p.set_defaults(func=cmd_backup)

    p = subparsers.add_parser("backups", parents=[common, js], help="list backups")
    p.add_argument("vm", nargs="?", help="VM name or id")
    p.set_defaults(func=cmd_backups)

    p = subparsers.add_parser("restore", parents=[common, js], help="restore a VM backup")
    p.add_argument("backup", help="backup id (or a unique prefix)")
    p.add_argument("--name", help="name of the new VM (default: the original, or with a suffix if taken)")
    p.add_argument("--cluster", help="target cluster name or id (default: the original)")
    p.add_argument("--storage-domain", help="target storage domain name or id (default: the original)")
    p.add_argument("--disk", action="append", default=[], metavar="DISK",
                   help="restore only this disk (alias or id); without --name, as a floating disk")
    p.add_argument("--start", action="store_true", help="start the VM once restored")
    p.add_argument("--no-wait", action="store_true", help="print the restore id and return at once")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")
    p.set_defaults(func=cmd_restore)

    p = subparsers.add_parser("catalog", help="the catalog of engines, VMs and backups")
    csub = p.add_subparsers(dest="catalog_cmd", metavar="ACTION")
    c = csub.add_parser("rebuild", parents=[common, js],
                        help="add the backups the store describes (after losing the catalog, or for a new one)")
    c.set_defaults(func=cmd_catalog_rebuild)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    from control import demo_vm

    p = subparsers.add_parser("demo", help="the whole product on the lab: NATS, control plane, two movers, "
                              "full and incremental backup, restore, verify")
    demo_vm.register_args(p)
    p.set_defaults(func=demo_vm.cmd)


def load_config(args: argparse.Namespace) -> Config:
    return configmod.load(args.data_dir, getattr(args, "config", None), getattr(args, "nats", None),
                          getattr(args, "store", None))


def open_catalog(cfg: Config) -> Catalog:
    cfg.ensure()
    return Catalog(cfg.catalog_path)


# --- engines and inventory ------------------------------------------------------------------------------


def cmd_engine_add(args: argparse.Namespace) -> int:
    from control.engine import EngineClient, api_url, validate_user

    cfg = load_config(args)
    url = api_url(args.url)
    user = validate_user(args.user)
    for f, what in ((args.password_file, "password file"), (args.ca_file, "CA file")):
        if not os.path.isfile(f):
            raise UsageError(f"{what} {f} does not exist")
    cat = open_catalog(cfg)
    ca = str(Path(args.ca_file).absolute())
    with open(args.password_file) as f:
        password = f.read().rstrip("\n")
    if not args.no_check:
        with EngineClient(url, user, password, ca) as c:
            version = c.version()
    # The password is copied into the data directory, readable only by its owner, and never logged.
    secret = cfg.secrets_dir / f"engine-{hashlib.sha256(url.encode()).hexdigest()[:16]}.password"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    os.chmod(secret, 0o600)
    eng = cat.add_engine(url, user, str(secret), ca)
    out = {"id": eng.id, "url": eng.url, "user": eng.user, "ca_file": eng.ca_file}
    if not args.no_check:
        out["version"] = ".".join(map(str, version))
    _print(args, out, f"engine {eng.url} added (id {eng.id[:8]}, user {eng.user}"
           + (f", version {out['version']})" if "version" in out else ")"))
    return 0


def cmd_engine_remove(args: argparse.Namespace) -> int:
    cat = open_catalog(load_config(args))
    e = cat.remove_engine(args.engine)
    with contextlib.suppress(OSError):
        if Path(e.password_file).parent == load_config(args).secrets_dir:
            os.unlink(e.password_file)  # our copy of the password goes with the engine
    print(f"engine {e.url} removed")
    return 0


def cmd_engine_list(args: argparse.Namespace) -> int:
    cat = open_catalog(load_config(args))
    rows = [{"id": e.id, "url": e.url, "user": e.user, "ca_file": e.ca_file} for e in cat.engines()]
    _print_rows(args, rows, ["id", "url", "user"])
    return 0


def cmd_vms(args: argparse.Namespace) -> int:
    from control.engine import EngineClient

    cat = open_catalog(load_config(args))
    engines = [cat.engine(args.engine)] if args.engine else cat.engines()
    if not engines:
        raise UsageError("no engine configured: run `ferry engine add`")
    rows = []
    for eng in engines:
        with EngineClient(eng.url, eng.user, eng.password(), eng.ca_file) as c:
            for vm in c.vms():
                disks = c.vm_disks(vm.id)
                cat.record_vm(eng.id, vm.id, vm.name)
                rows.append({"id": vm.id, "name": vm.name, "status": vm.status.value if vm.status else "",
                             "engine": eng.url, "disks": [d.to_dict() for d in disks],
                             "size": sum(d.size for d in disks)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_rows(args, [{**r, "disks": len(r["disks"]), "size": _gib(r["size"])} for r in rows],
                    ["name", "id", "status", "disks", "size"])
    return 0


def cmd_backups(args: argparse.Namespace) -> int:
    cat = open_catalog(load_config(args))
    backups = cat.backups(args.vm)
    if args.json:
        print(json.dumps([b.to_dict() for b in backups], indent=1))
        return 0
    rows = []
    for b in backups:
        kinds = sorted({d.kind for d in b.disks})
        rows.append({"id": b.id[:8], "vm": b.vm_name, "mode": b.mode, "method": b.method,
                     "type": "+".join(kinds) or b.type, "state": b.state,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.started)),
                     "disks": len(b.disks), "stored": _mib(b.stats.get("stored", 0)),
                     "error": (b.error or "")[:60]})
    _print_rows(args, rows, ["id", "vm", "mode", "method", "type", "state", "started", "disks", "stored", "error"])
    return 0


def cmd_catalog_rebuild(args: argparse.Namespace) -> int:
    """Backups are self-described in the store: re-index them (engines must be added to restore them)."""
    from control import vmmeta

    cfg = load_config(args)
    cat = open_catalog(cfg)
    engines = {e.url: e.id for e in cat.engines()}
    added, known, orphans = [], 0, set()
    for bid in vmmeta.list_ids(cfg.store_url):
        meta = vmmeta.load(cfg.store_url, bid)
        eid = engines.get(meta.get("engine", ""), "")
        if not eid:
            orphans.add(meta.get("engine", "?"))
        if cat.import_backup(meta, eid, cfg.store_url):
            added.append(bid)
        else:
            known += 1
    out = {"added": added, "known": known, "engines_missing": sorted(orphans)}
    text = f"{len(added)} backup(s) added, {known} already known"
    if orphans:
        text += f"; add these engines to restore their backups: {', '.join(sorted(orphans))}"
    _print(args, out, text)
    return 0


# --- triggers ---------------------------------------------------------------------------------------------


def nats_url(cfg: Config) -> str:
    """The configured NATS URL, or the embedded server's (written by `ferry up` / `ferry control`)."""
    if cfg.nats.url:
        return cfg.nats.url
    f = cfg.nats_dir / URL_FILE
    if f.exists():
        return f.read_text().strip()
    raise UsageError("no NATS to talk to: start `ferry up` (or `ferry control`), or give --nats URL")


def cmd_backup(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return asyncio.run(_backup(args, cfg))


async def _backup(args: argparse.Namespace, cfg: Config) -> int:
    from control import client
    from control import progress as progressmod

    b = await client.client_bus(cfg, nats_url(cfg))
    try:
        ids = []
        for vm in args.vms:
            req: dict[str, Any] = {"vm": vm, "mode": args.mode, "type": args.type, "exclude": args.exclude,
                                   "freeze": not args.no_freeze}
            if args.method:
                req["method"] = args.method
            if args.engine:
                req["engine"] = args.engine
            reply = await client.request(b, jobs.TRIGGER_BACKUP, req)
            ids.append((vm, reply["backup_id"]))
        if args.no_wait:
            _print(args, [{"vm": vm, "backup_id": i} for vm, i in ids], "\n".join(i for _, i in ids))
            return 0
        rc, finals = 0, []
        for vm, bid in ids:
            view = progressmod.FlowView(f"backup of {vm} ({bid[:8]})", quiet=args.json)
            with view:
                last = await client.watch(b, jobs.backup_subject(bid), view.update, timeout=args.timeout)
            finals.append(last)
            if last.get("state") != "succeeded":
                rc = 7
        if args.json:
            cat = open_catalog(cfg)
            print(json.dumps([_backup_json(cat, f) for f in finals], indent=1))
        else:
            for f in finals:
                progressmod.print_backup_summary(f, open_catalog(cfg))
        return rc
    finally:
        await b.close()


def _backup_json(cat: Catalog, ev: dict[str, Any]) -> dict[str, Any]:
    try:
        return cat.backup(ev["backup_id"]).to_dict()
    except Exception:  # a control plane elsewhere, with its own catalog: the event is all we have
        return ev


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return asyncio.run(_restore(args, cfg))


async def _restore(args: argparse.Namespace, cfg: Config) -> int:
    from control import client
    from control import progress as progressmod

    b = await client.client_bus(cfg, nats_url(cfg))
    try:
        req = {"backup_id": args.backup, "name": args.name, "cluster": args.cluster,
               "storage_domain": args.storage_domain, "disks": args.disk, "start": args.start}
        reply = await client.request(b, jobs.TRIGGER_RESTORE, req)
        rid = reply["restore_id"]
        if args.no_wait:
            _print(args, {"restore_id": rid}, rid)
            return 0
        view = progressmod.FlowView(f"restore {rid[:8]}", quiet=args.json)
        with view:
            last = await client.watch(b, f"{jobs.EVENTS_PREFIX}.restore.{rid}", view.update, timeout=args.timeout)
        ok = last.get("state") == "succeeded"
        if args.json:
            print(json.dumps(last, indent=1))
        elif ok:
            print(f"restored backup {args.backup} as VM {last.get('vm') or '(disks only)'} "
                  f"(id {last.get('vm_id') or '-'}) restore {rid}")
        else:
            print(f"ferry: error: restore {rid} failed: {last.get('error')}", file=sys.stderr)
        return 0 if ok else 7
    finally:
        await b.close()


# --- processes --------------------------------------------------------------------------------------------


def cmd_control(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return _run_plane(cfg, movers=0, workers=0)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return _run_plane(cfg, movers=args.movers, workers=args.workers)


def _run_plane(cfg: Config, movers: int, workers: int) -> int:
    """Run (embedded NATS), the control plane and ``movers`` mover processes until SIGINT/SIGTERM."""
    from control import client, service
    from control.natsd import NatsServer

    cat = open_catalog(cfg)
    server = None
    url_file = cfg.nats_dir / URL_FILE
    running = _running_embedded(url_file)
    if cfg.nats.url:
        url = cfg.nats.url
    elif running:
        url = running  # another `ferry up`/`control` of this data dir serves NATS: share it
    else:
        server = NatsServer(cfg.nats_dir, port=_previous_port(url_file))
        server.start()
        url = server.url
        url_file.write_text(url + "\n")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        Path(cfg.store_url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        for _ in range(movers):
            cmd = [sys.executable, "-m", "control.cli", "mover", "--nats", url, "--store", cfg.store_url,
                   "--capability", "imageio", "--capability", "store", *_mover_nats_args(cfg)]
            if workers:
                cmd += ["--workers", str(workers)]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        print(f"ferry: control plane on {url} with {movers} mover(s); data in {cfg.data_dir}", flush=True)
        plane = service.ControlPlane(cfg, cat, client.bus_options(cfg, url, "ferry-control"))
        asyncio.run(_serve_until_signal(plane))
    finally:
        stop_processes(procs, 20)
        if server is not None:
            server.stop()
            url_file.unlink(missing_ok=True)
        cat.close()
    return 0


def _mover_nats_args(cfg: Config) -> list[str]:
    """The NATS credentials of the configuration, as ``ferry mover`` options (paths, never secrets)."""
    n, out = cfg.nats, []
    for opt, val in (("--nats-user", n.user), ("--nats-password-file", n.password_file),
                     ("--nats-token-file", n.token_file), ("--nats-creds", n.creds_file), ("--nats-ca", n.tls_ca),
                     ("--nats-cert", n.tls_cert), ("--nats-key", n.tls_key)):
        if val:
            out += [opt, val]
    return out


async def _serve_until_signal(plane: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await plane.start()
    await stop.wait()
    await plane.stop()


def _running_embedded(url_file: Path) -> str | None:
    """The URL of an embedded NATS of this data dir that answers now, if any."""
    import socket

    try:
        url = url_file.read_text().strip()
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return url
    except (OSError, ValueError):
        return None


def _previous_port(url_file: Path) -> int | None:
    """Reuse the port of the last run when free, so movers elsewhere keep their URL."""
    from control.natsd import free_port

    try:
        port = int(url_file.read_text().strip().rsplit(":", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


# --- output -----------------------------------------------------------------------------------------------


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if getattr(args, "json", False) else text)


def _print_rows(args: argparse.Namespace, rows: list[dict[str, Any]], cols: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    width = shutil.get_terminal_size((200, 20)).columns
    print("  ".join(c.upper().ljust(widths[c]) for c in cols)[:width])
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols)[:width])


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"
