"""The control plane process, and the client side of its triggers.

``ControlPlane`` connects to NATS (``mover.bus``), serves ``ferry.trigger.backup`` and ``ferry.trigger.restore``
(request-reply: the reply carries the backup or restore id at once; the flow then runs in a thread),
publishes jobs for the movers and control events, and collects results and progress. It is the
``Dispatcher`` of the flows: they are synchronous and call in from their threads.

Results are read from a subscription and, every few seconds, from the events stream (``last_result``), so a
result published while this process was reconnecting (NATS restarted) is not lost.

The client side of the triggers (``request``, ``watch``), what ``ferry backup`` and ``ferry restore`` use, is
``control.client``: the CLI is itself a client of the triggers, and does not import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from control.catalog import Catalog, Engine
from control.config import Config
from control.engine import EngineClient, api_url
from control.engine.session import EngineSessions
from control.errors import FerryError, NotFound, UsageError
from control.flows.backup import VM_DETAILS, BackupFlow, BackupRequest, default_client
from control.flows.base import Flow
from control.flows.restore import RestoreFlow, RestoreRequest
from mover import bus as mbus
from mover import jobs
from mover.jobs import ExportJob, JobProgress, JobResult, RestoreJob

log = logging.getLogger(__name__)

# How often pending results are also looked up in the stream (covers a reconnect gap); cheap, one request.
RESULT_POLL = 3.0
# Flows running at once in one control plane (each a thread blocked on the engine most of the time).
MAX_FLOWS = 32
QUEUE_GROUP = "ferry-control"  # several control planes may run: each trigger is served once
# Extra fields the control plane accepts on ferry.trigger.backup beyond mover.jobs.BackupTrigger.
BACKUP_EXTRAS = ("exclude", "method", "freeze", "engine")


class ControlPlane:
    """Serves triggers, runs flows, and dispatches their jobs over NATS."""

    def __init__(self, cfg: Config, catalog: Catalog, options: mbus.BusOptions) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.options = options
        self.bus: mbus.Bus | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._results: dict[str, asyncio.Future[JobResult]] = {}
        self._progress: dict[str, Callable[[JobProgress], None]] = {}
        self._flows: dict[str, asyncio.Task[None]] = {}
        self._subs: list[Any] = []
        self.stopped = asyncio.Event()
        # Flows block in the SDK for their whole run: their own pool, so many run at once and never starve
        # the loop's default executor. Progress callbacks run in order on one thread of their own.
        self._flow_pool = ThreadPoolExecutor(max_workers=MAX_FLOWS, thread_name_prefix="flow")
        self._progress_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        # One logged-in engine connection per engine, shared by the VM look-ups and the flows (no SSO
        # login and logout per backup); logged out at shutdown.
        self.sessions = EngineSessions()
        self._warming: asyncio.Future[None] | None = None

    # lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.bus = await mbus.connect(self.options)
        await self.bus.ensure_streams()
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(f"{jobs.EVENTS_PREFIX}.result.*", cb=self._on_result),
            await nc.subscribe(f"{jobs.EVENTS_PREFIX}.progress.*", cb=self._on_progress),
            await nc.subscribe(jobs.TRIGGER_BACKUP, queue=QUEUE_GROUP, cb=self._on_trigger_backup),
            await nc.subscribe(jobs.TRIGGER_RESTORE, queue=QUEUE_GROUP, cb=self._on_trigger_restore),
        ]
        await nc.flush()
        await asyncio.to_thread(self.recover)
        # In the background: triggers are served meanwhile (one arriving now shares the login under way).
        self._warming = self.loop.run_in_executor(self._flow_pool, self.warm_sessions)
        log.info("control plane ready nats=%s store=%s", self.bus.url, self.cfg.store_url)

    def warm_sessions(self) -> None:
        """Log in to every engine of the catalog now, so that the first backup after a start does not pay the
        SSO login (~0.2 s on the lab, more on a busy engine) in its trigger. Best effort: an engine that does
        not answer now is logged in to on its first use, as before."""
        for eng in self.catalog.engines():
            try:
                with self._client(eng):
                    pass
            except Exception as e:  # never fatal: the first flow on this engine reports a real problem
                log.info("engine not logged in at start url=%s error=%s", eng.url, e)

    def recover(self) -> None:
        """Finish what a control plane that died left: flows in a running state with no live owner are
        marked failed, and their engine objects cleaned up (open transfers of their disks cancelled, the
        VM backup finalized, a snapshot that never became a kept point removed), then the VM is unlocked."""
        for b in self.catalog.backups():
            if b.state in ("succeeded", "failed") or b.id in self._flows:
                continue
            if self.catalog.lock_held_elsewhere(b.vm_id, b.id):
                continue  # a live control plane elsewhere still runs it
            done: list[str] = []
            try:
                with self._client(self.catalog.engine(b.engine_id)) as c:
                    disk_ids = {d.disk_id for d in b.disks}
                    for t in c.transfers():
                        tdisk = t.disk.id if t.disk else None
                        if tdisk in disk_ids and not t.phase.value.startswith(("finished", "cancelled")):
                            c.cancel_transfer(t.id)
                            done.append(f"transfer {t.id[:8]} cancelled")
                    if b.engine_ref and b.method == "checkpoint":
                        c.finalize_backup(b.vm_id, b.engine_ref)
                        done.append(f"VM backup {b.engine_ref[:8]} finalized")
                    elif b.engine_ref and b.method == "snapshot" and c.remove_snapshot(b.vm_id, b.engine_ref):
                        done.append(f"snapshot {b.engine_ref[:8]} removed")
            except FerryError as e:
                done.append(f"clean-up incomplete: {e}")
            self.catalog.update_backup(b.id, state="failed", finished=time.time(),
                                       error="interrupted: the control plane stopped during the backup"
                                       + (f" ({'; '.join(done)})" if done else ""))
            self.catalog.unlock_vm(b.vm_id, b.id)
            log.warning("recovered backup id=%s vm=%s actions=%s", b.id, b.vm_name, done)
        for r in self.catalog.restores_running():
            if r.id not in self._flows:
                self.catalog.update_restore(r.id, state="failed", finished=time.time(),
                                            error="interrupted: the control plane stopped during the restore")

    async def stop(self) -> None:
        """Stop taking triggers; let running flows finish their clean-up (bounded), then disconnect."""
        for s in self._subs:
            with contextlib.suppress(Exception):
                await s.unsubscribe()
        if self._flows:
            await asyncio.wait(list(self._flows.values()), timeout=60)
        if self.bus is not None:
            await self.bus.close()
        if self._warming is not None:
            # A login under way at shutdown ends first (bounded: the SDK connection's own 60 s timeout), so
            # that its session is among those logged out below.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._warming), timeout=60)
        await asyncio.to_thread(self.sessions.close)
        self._flow_pool.shutdown(wait=False)
        self._progress_pool.shutdown(wait=False)
        self.stopped.set()

    async def serve(self) -> None:
        await self.start()
        try:
            await self.stopped.wait()
        finally:
            if not self.stopped.is_set():
                await self.stop()

    # triggers

    async def _reply(self, msg: Any, data: dict[str, Any]) -> None:
        if msg.reply:
            await self.bus.nc.publish(msg.reply, json.dumps(data).encode())  # type: ignore[union-attr]

    async def _on_trigger_backup(self, msg: Any) -> None:
        try:
            raw = json.loads(msg.data)
            if not isinstance(raw, dict):
                raise jobs.MalformedMessage("expected a JSON object", what="backup trigger")
            extras = {k: raw.pop(k) for k in BACKUP_EXTRAS if k in raw}
            trig = jobs.BackupTrigger.from_dict(raw)
            req = BackupRequest(vm=trig.vm, mode=trig.mode, type=trig.type, method=extras.get("method"),
                                exclude=list(extras.get("exclude") or []), freeze=bool(extras.get("freeze", True)))
            # Expected failures (wrong password, unreachable engine, missing VM) answer the trigger itself,
            # so `ferry backup` prints them as one line with the right exit code.
            engine, vm = await asyncio.to_thread(self._locate_vm, trig.vm, extras.get("engine"))
            req.vm = str(vm.id)
            flow = BackupFlow(req, self.catalog, engine, self, self.cfg.store_url, self.cfg.job_timeout,
                              client_factory=self._client, hooks=self.cfg.hooks_for(vm.name), vm=vm)
        except FerryError as e:
            await self._reply(msg, {"error": str(e), "exit_code": e.exit_code})
            return
        except ValueError as e:
            await self._reply(msg, {"error": f"bad trigger: {e}", "exit_code": 2})
            return
        self._spawn(flow)
        await self._reply(msg, {"backup_id": flow.id})

    async def _on_trigger_restore(self, msg: Any) -> None:
        try:
            trig = jobs.RestoreTrigger.from_json(msg.data)
            backup = self.catalog.backup(trig.backup_id)
            if not backup.engine_id:
                raise UsageError(f"the engine of backup {backup.id} is not in the catalog: `ferry engine add` it, "
                                 "then `ferry catalog rebuild`")
            engine = self.catalog.engine(backup.engine_id)
            req = RestoreRequest(backup_id=backup.id, name=trig.name, cluster=trig.cluster,
                                 storage_domain=trig.storage_domain, disks=trig.disks, start=trig.start)
            flow = RestoreFlow(req, self.catalog, engine, self, self.cfg.job_timeout, client_factory=self._client)
        except FerryError as e:
            await self._reply(msg, {"error": str(e), "exit_code": e.exit_code})
            return
        except ValueError as e:
            await self._reply(msg, {"error": f"bad trigger: {e}", "exit_code": 2})
            return
        self._spawn(flow)
        await self._reply(msg, {"restore_id": flow.id})

    def _resolve_vm(self, engine: Engine, vm: str) -> Any:
        """VM ``vm`` (name or id) on ``engine``, with what the backup flow needs of it (``VM_DETAILS``: the
        flow does not ask again); NotFound, AuthError, EngineUnreachable otherwise."""
        with self._client(engine) as c:
            found = c.find_vm(vm, **VM_DETAILS)
        self.catalog.record_vm(engine.id, found.id, found.name)
        return found

    def _client(self, engine: Engine) -> EngineClient:
        """A client of ``engine`` on the control plane's shared session of that engine."""
        password = engine.password()
        session = self.sessions.get(engine.id, api_url(engine.url), engine.user, password, engine.ca_file)
        return default_client(engine, timeout=self.cfg.engine_timeout, session=session, password=password)

    def _locate_vm(self, vm: str, engine: str | None = None) -> tuple[Engine, Any]:
        """The engine holding VM ``vm`` and the VM (``_resolve_vm``): the named engine, else the engine the catalog knows
        the VM from, else every engine in turn. One engine's failure is raised when no engine has the VM."""
        # Engines removed from the catalog (by `ferry engine remove`, another process) lose their session.
        self.sessions.retain({e.id for e in self.catalog.engines()})
        if engine:
            candidates = [self.catalog.engine(engine)]
        else:
            candidates = self.catalog.engines()
            if not candidates:
                raise UsageError("no engine configured: run `ferry engine add URL --user U --password-file F "
                                 "--ca-file F`")
            known = self.catalog.engine_of_vm(vm)
            if known is not None:
                candidates.sort(key=lambda e: e.id != known)
        failures: list[FerryError] = []
        for eng in candidates:
            try:
                return eng, self._resolve_vm(eng, vm)
            except NotFound:
                continue
            except FerryError as e:
                failures.append(e)
        if failures and len(failures) == len(candidates):
            raise failures[0]
        raise NotFound(kind="VM", name=vm)

    def _spawn(self, flow: Flow) -> None:
        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._flow_pool, flow.run)
            except FerryError as e:
                log.info("%s ended id=%s error=%s", flow.kind, flow.id, e)
            except Exception:
                log.exception("%s crashed id=%s", flow.kind, flow.id)
            finally:
                self._flows.pop(flow.id, None)

        self._flows[flow.id] = asyncio.get_running_loop().create_task(run())

    # Dispatcher (called from flow threads)

    def run_jobs(self, job_list: list[ExportJob | RestoreJob], on_progress: Callable[[JobProgress], None],
                 timeout: float) -> dict[str, JobResult]:
        return self._call(self._run_jobs(job_list, on_progress, timeout))

    def event(self, subject: str, data: dict[str, Any]) -> None:
        if self.loop is None or self.bus is None:
            return
        payload = json.dumps({**data, "time": time.time()}, default=str).encode()
        fut = asyncio.run_coroutine_threadsafe(self.bus.publish_event(subject, payload), self.loop)
        fut.add_done_callback(_log_event_error(subject))

    def _call(self, coro: Awaitable[Any]) -> Any:
        assert self.loop is not None
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result()

    async def _run_jobs(self, job_list: list[ExportJob | RestoreJob], on_progress: Callable[[JobProgress], None],
                        timeout: float) -> dict[str, JobResult]:
        assert self.bus is not None
        loop = asyncio.get_running_loop()
        for j in job_list:
            self._results[j.job_id] = loop.create_future()
            self._progress[j.job_id] = on_progress
        try:
            for j in job_list:
                await self._publish_retrying(j)
            deadline = time.monotonic() + timeout
            pending = {j.job_id for j in job_list}
            out: dict[str, JobResult] = {}
            while pending and time.monotonic() < deadline:
                futs = [self._results[i] for i in pending]
                await asyncio.wait(futs, timeout=RESULT_POLL)
                for i in list(pending):
                    f = self._results[i]
                    r = f.result() if f.done() else await self._last_result(i)
                    if r is not None:
                        out[i] = r
                        pending.discard(i)
            return out
        finally:
            for j in job_list:
                self._results.pop(j.job_id, None)
                self._progress.pop(j.job_id, None)

    async def _publish_retrying(self, job: ExportJob | RestoreJob) -> None:
        """Publish a job; NATS may be restarting, and the Msg-Id makes a repeat harmless."""
        assert self.bus is not None
        delay = 0.5
        for attempt in range(20):
            try:
                await self.bus.publish_job(job, jobs.job_subject(job.capability))
                log.info("job published job=%s kind=%s", job.job_id, job.KIND)
                return
            except Exception as e:
                if attempt == 19:
                    raise mbus.BusError(f"cannot publish job {job.job_id}: {e}", url=self.bus.url) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _last_result(self, job_id: str) -> JobResult | None:
        assert self.bus is not None
        try:
            return await self.bus.last_result(job_id)
        except Exception as e:  # NATS down for a moment: the next poll tries again
            log.debug("result lookup failed job=%s error=%s", job_id, e)
            return None

    async def _on_result(self, msg: Any) -> None:
        try:
            r = JobResult.from_json(msg.data)
        except jobs.MalformedMessage as e:
            log.warning("malformed result subject=%s error=%s", msg.subject, e)
            return
        f = self._results.get(r.job_id)
        if f is not None and not f.done():
            f.set_result(r)

    async def _on_progress(self, msg: Any) -> None:
        try:
            p = JobProgress.from_json(msg.data)
        except jobs.MalformedMessage:
            return
        cb = self._progress.get(p.job_id)
        if cb is not None:
            # The callback takes a flow lock and publishes: keep it off the event loop thread.
            self.loop.run_in_executor(self._progress_pool, cb, p)  # type: ignore[union-attr]


def _log_event_error(subject: str) -> Callable[[Future[Any]], None]:
    def done(f: Future[Any]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("event not published subject=%s error=%s", subject, f.exception())
    return done
