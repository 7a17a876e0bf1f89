"""The lab engine: request dispatch (SSO, CA, API, lab-only endpoints), the background worker that moves
objects through their asynchronous states, jobs, and restart with state kept on disk."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.engine import backups, disks, labapi, snapshots, system, transfers, vms
from lab.engine.backend import Backend
from lab.engine.http import API_PREFIX, HttpError, Reply, Request, Router, Server, tls_context
from lab.engine.sso import Sso
from lab.engine.state import State, new_id
from lab.engine.xml import fault_reply
from lab.errors import LabError

log = logging.getLogger("lab.engine")

TICK = 0.05  # worker period: short, so locked->ok transitions take tens of milliseconds as on a small engine
MODULES = (system, vms, disks, snapshots, backups, transfers)


class Engine:
    """One engine: state, routes, HTTPS server, worker."""

    def __init__(self, dir: Path, backend: Backend, cert: Path, key: Path, ca: Path,
                 users: dict[str, str], port: int = 0) -> None:
        self.dir = dir
        self.backend = backend
        self.cert, self.key, self.ca = cert, key, ca
        self.port = port
        self.sso = Sso(users)
        self.state = State.load(dir / "engine.json")
        self.router = Router()
        self.ticks: list[Callable[[Engine], None]] = []
        for m in MODULES:
            m.register(self)
        self.lab_router = Router()
        labapi.register(self)
        self.server: Server | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.restarting = False

    # -- lifecycle --

    def start(self) -> None:
        self.server = Server(self.port, tls_context(str(self.cert), str(self.key)), self.dispatch, fault_reply)
        self.port = self.server.port
        self.server.start()
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        log.info("Engine started port=%s", self.port)

    def stop(self) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(5)
        if self.server:
            self.server.stop()
            self.server = None
        with self.state.lock:
            self.state.save()

    def restart(self, downtime: float = 1.0) -> None:
        """Stop serving, forget everything in memory (tokens too), reload state from disk, serve again."""
        self.restarting = True
        self.stop()
        time.sleep(downtime)
        self.sso = Sso(self.sso.users)
        self.state = State.load(self.dir / "engine.json")
        self.start()
        self.restarting = False
        log.info("Engine restarted port=%s", self.port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{API_PREFIX}"

    # -- worker --

    def _work(self) -> None:
        while not self._stop.wait(TICK):
            for tick in self.ticks:
                try:
                    with self.state.lock:
                        tick(self)
                except Exception:
                    log.exception("Worker step failed step=%s", getattr(tick, "__qualname__", tick))
            with self.state.lock:
                if self.state.data.pop("_dirty", False):
                    self.state.save()

    def dirty(self) -> None:
        self.state.data["_dirty"] = True

    # -- jobs --

    def job(self, description: str, req: Request | None = None) -> str:
        jid = new_id()
        self.state.coll("jobs")[jid] = {
            "id": jid, "description": description, "status": "started", "start": time.time(),
            "end": None, "correlation_id": req.query.get("correlation_id") if req else None,
        }
        return jid

    def end_job(self, jid: str | None, ok: bool = True) -> None:
        job = self.state.coll("jobs").get(jid or "")
        if job and job["status"] == "started":
            job["status"] = "finished" if ok else "failed"
            job["end"] = time.time()

    # -- faults --

    def fault(self, name: str) -> Any:
        return self.state.data["faults"].get(name)

    def take_fault(self, name: str) -> bool:
        """Consume one occurrence of a counted fault; True when it fires."""
        n = self.state.data["faults"].get(name)
        if not n:
            return False
        if isinstance(n, int) and n > 0:
            n -= 1
            if n:
                self.state.data["faults"][name] = n
            else:
                self.state.data["faults"].pop(name)
        return True

    # -- dispatch --

    def dispatch(self, req: Request) -> Reply:
        path = req.path
        if path.startswith("/ovirt-engine/sso/oauth/token"):
            return self.sso.token(req)
        if path.startswith("/ovirt-engine/services/sso-logout"):
            return self.sso.logout(req)
        if path.startswith("/ovirt-engine/services/pki-resource"):
            return Reply(200, self.ca.read_bytes(), "application/x-x509-ca-cert")
        if path.startswith("/ovirt-engine/lab/"):
            return self._route(self.lab_router, req, path[len("/ovirt-engine/lab/"):])
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            req.user = self.sso.user(req)
            return self._route(self.router, req, path[len(API_PREFIX):])
        raise HttpError(404, f"Not found: {path}", "Not Found")

    def _route(self, router: Router, req: Request, path: str) -> Reply:
        found = router.resolve(req.method, path)
        if found is None:
            raise HttpError(404, f"Not found: {path}", "Not Found")
        handler, params = found
        if getattr(handler, "unlocked", False):
            # Long lab-only work (building images) takes the lock itself, in short steps.
            try:
                return handler(req, **params)
            except LabError as err:
                raise HttpError(409, f"Operation failed on the host: {err}") from None
        with self.state.lock:
            try:
                reply = handler(req, **params)
            except LabError as err:
                # A failure on the "hypervisor" (qemu, imageio, loop devices): the engine's 409 with vdsm's words.
                log.warning("Operation failed method=%s path=%s error=%s", req.method, path, err)
                raise HttpError(409, f"Operation failed on the host: {err}") from None
            finally:
                if req.method != "GET":
                    self.state.save()
        return reply
