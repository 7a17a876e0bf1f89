"""The lab process: CA, hosts (imageio daemon + sshd each), the engine's proxy imageio daemon, the proxy VM,
storage domains and the engine, kept running until SIGTERM; state persisted in the lab directory.

Run by ``ferry lab up`` as ``python -m lab.daemon --dir DIR`` in a session of its own. It holds an exclusive
lock on ``DIR/lab.lock`` for its lifetime (a second lab in the same directory fails at once), and writes
``DIR/lab.json`` (what ``ferry lab status`` prints) once everything answers.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from lab.engine.app import Engine
from lab.engine.backend import Backend, HostRuntime
from lab.engine.state import State, new_id
from lab.engine.vms import create_vm
from lab.errors import LabError

log = logging.getLogger("lab.daemon")

ADMIN = "admin@internal"
HOSTS = ("host1", "host2")


def lock(dir: Path) -> IO[str]:
    """Take DIR/lab.lock; LabError naming the running lab's pid when another process holds it."""
    dir.mkdir(parents=True, exist_ok=True)
    f = open(dir / "lab.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise LabError(f"a lab is already running in {dir} (pid {pid}); run 'ferry lab down --dir {dir}' first") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line, as the engine shows a host's."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def seed(st: State, dir: Path) -> None:
    """The default inventory: 1 data center, 1 cluster, 2 hosts, an NFS and an emulated iSCSI domain."""
    dc, cl = new_id(), new_id()
    st.data["instance_id"] = new_id()
    st.coll("datacenters")[dc] = {"id": dc, "name": "Default"}
    st.coll("clusters")[cl] = {"id": cl, "name": "Default", "dc": dc}
    for i, name in enumerate(HOSTS):
        hid = new_id()
        st.coll("hosts")[hid] = {"id": hid, "name": name, "cluster": cl, "address": "127.0.0.1",
                                 "ssh_port": 0, "ssh_user": "root", "spm": i == 0}
    nfs, iscsi = new_id(), new_id()
    st.coll("storagedomains")[nfs] = {"id": nfs, "name": "nfs-data", "kind": "file", "type": "nfs", "dc": dc,
                                      "path": "/exports/nfs-data", "master": True}
    st.coll("storagedomains")[iscsi] = {"id": iscsi, "name": "iscsi-data", "kind": "block", "type": "iscsi",
                                        "dc": dc, "path": ""}


class Lab:
    """Everything the lab runs, started and stopped together."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir.absolute()
        self.backend = Backend(self.dir)
        self.engine: Engine | None = None
        self.started: list[Any] = []

    def start(self) -> None:
        from lab.imageio import ImageioDaemon
        from lab.pki import CA
        from lab.sshd import Sshd
        from lab.storage import Domain

        t0 = time.monotonic()
        d = self.dir
        pki = d / "pki"
        ca = CA.load(pki) if (pki / "ca.pem").exists() else CA.create(pki)
        cert, key = ca.issue("engine", pki)
        pw_file = d / "admin-password"
        if not pw_file.exists():
            pw_file.write_text(secrets.token_urlsafe(12) + "\n")
            pw_file.chmod(0o600)
        password = pw_file.read_text().strip()

        state_path = d / "engine.json"
        st = State.load(state_path)
        if not st.coll("hosts"):
            seed(st, d)
        st.save()

        rhev = d / "rhev" / "data-center"
        for sd in st.coll("storagedomains").values():
            dom = Domain(d / "storage", sd["id"], sd["name"], sd["kind"])
            # As a host mounts it: <rhev>/mnt/<server>:_<export>/<sd> (or blockSD/<sd>), and <rhev>/<pool>/<sd>.
            dom.link_rhev(rhev, sd["dc"])
            self.backend.domains[sd["id"]] = dom
        self.backend.rhev_root = rhev

        # Daemons start in parallel: each waits for its process to listen.
        pool = concurrent.futures.ThreadPoolExecutor(8)
        proxy = ImageioDaemon(d / "proxy", "proxy", ca)
        jobs = [pool.submit(proxy.start)]
        runtimes = []
        for h in st.coll("hosts").values():
            imageio = ImageioDaemon(d / "hosts", h["name"], ca)
            sshd = Sshd(d / "hosts", h["name"] + "-ssh")
            runtimes.append(HostRuntime(h["id"], h["name"], imageio, sshd))
            jobs += [pool.submit(imageio.start), pool.submit(sshd.start)]
        self.started += [proxy] + [x for rt in runtimes for x in (rt.imageio, rt.sshd)]
        for j in jobs:
            j.result()
        pool.shutdown()
        self.backend.proxy = proxy
        for rt in runtimes:
            self.backend.hosts[rt.id] = rt
            for sd in self.backend.domains.values():
                rt.sshd.add_lvm_root(sd.root)
            h = st.coll("hosts")[rt.id]
            h.update(ssh_port=rt.sshd.port, ssh_user=rt.sshd.user, ssh_public_key=rt.sshd.host_key,
                     ssh_fingerprint=fingerprint(rt.sshd.host_key),
                     ssh_key=str(rt.sshd.client_key), imageio_port=rt.imageio.port)

        proxy_vm = [v for v in st.coll("vms").values() if v.get("proxy")]
        if proxy_vm:
            pv = proxy_vm[0]
            pv["attachments"] = {k: a for k, a in pv["attachments"].items() if not a.get("logical_name")}
        else:
            cl = next(iter(st.coll("clusters")))
            pv = create_vm(st_engine_shim(st), "ferry-proxy", cl, memory=4 * 2**30, cpus=2, proxy=True,
                           description="Ferry proxy VM (VirtIO-SCSI)")
            pv.update(status="up", host=next(iter(st.coll("hosts"))), started=time.time())
        try:
            from lab.proxyvm import ProxyVM

            self.backend.proxyvm = ProxyVM(d / "proxyvm", pv["id"])
        except ImportError:
            log.warning("lab.proxyvm not available: attachments to the proxy VM will fail")
        _recover(st)
        st.save()

        prev = _read_json(d / "lab.json")
        port = int(prev.get("engine_port", 0)) if prev else 0
        self.engine = Engine(d, self.backend, cert, key, ca.cert_path, {ADMIN: password}, port=port)
        # Backups caught by the last shutdown: their temporary layers are merged back, as vdsm cleans up.
        from lab.engine import backups

        for b in self.engine.state.coll("backups").values():
            if b["phase"] not in ("succeeded", "failed"):
                backups.fail(self.engine, b)
        self.engine.state.save()
        try:
            self.engine.start()
        except OSError:
            self.engine.port = 0
            self.engine.start()
        status = {
            "pid": os.getpid(),
            "dir": str(d),
            "engine_url": self.engine.url,
            "engine_port": self.engine.port,
            "user": ADMIN,
            "password_file": str(pw_file),
            "ca_file": str(ca.cert_path),
            "proxy_url": proxy.url,
            "proxy_vm": pv["id"],
            "proxy_vm_by_id": str(self.backend.proxyvm.by_id) if self.backend.proxyvm else None,
            "storage_root": str(d / "storage"),
            # Stands for /rhev/data-center on the hosts (the lab never writes to /).
            "rhev_root": str(rhev),
            "storage_domains": [
                {"id": s["id"], "name": s["name"], "kind": s["kind"], "path": str(self.backend.domains[s["id"]].path),
                 "host_path": str(rhev / "mnt" / self.backend.domains[s["id"]].mount_name / s["id"])}
                for s in st.coll("storagedomains").values()
            ],
            "hosts": [
                {"id": h["id"], "name": h["name"], "address": "127.0.0.1", "ssh_port": h["ssh_port"],
                 "ssh_user": h["ssh_user"], "ssh_key": h["ssh_key"], "host_key": h["ssh_public_key"],
                 "imageio_url": f"https://127.0.0.1:{h['imageio_port']}"}
                for h in st.coll("hosts").values()
            ],
            "started": time.time(),
            "startup_seconds": round(time.monotonic() - t0, 2),
        }
        tmp = d / "lab.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        os.replace(tmp, d / "lab.json")
        log.info("Lab ready dir=%s engine=%s seconds=%.2f", d, self.engine.url, time.monotonic() - t0)

    def stop(self) -> None:
        if self.engine:
            with contextlib.suppress(Exception):
                self.engine.stop()
        if self.backend.proxyvm is not None:
            with contextlib.suppress(Exception):
                self.backend.proxyvm.detach_all()
        self.backend.close()
        def stop(p: Any) -> None:
            try:
                p.stop()
            except Exception as e:
                log.warning("Stop failed what=%s error=%s", getattr(p, "name", p), e)

        # In parallel: each daemon takes a moment to exit cleanly.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(stop, self.started))
        (self.dir / "lab.json").unlink(missing_ok=True)


def st_engine_shim(st: State) -> Any:
    """create_vm takes an engine; at seed time only its state is needed."""

    class _Shim:
        state = st

    return _Shim()


def _recover(st: State) -> None:
    """After a lab restart, nothing in flight survives: end transfers and backups, unlock what they held."""
    for t in st.coll("transfers").values():
        if not t["phase"].startswith("finished"):
            t["phase"] = "finished_failure"
    for dk in st.coll("disks").values():
        dk.pop("busy", None)
        if dk["status"] == "locked" and not dk.get("job"):
            dk["status"] = "ok"


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.daemon")
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        held = lock(args.dir)
    except LabError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return e.exit_code
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    lab = Lab(args.dir)
    try:
        lab.start()
    except Exception as e:
        log.exception("Lab start failed")
        print(f"ferry: error: lab start failed: {e}", file=sys.stderr)
        lab.stop()
        return 7
    while not done.wait(1):
        pass
    log.info("Stopping lab dir=%s", args.dir)
    lab.stop()
    held.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
