"""The VM backup flow (imageio mode; the ssh and attach modes plug in through ``control.flows.modes``).

States: preparing -> snapshotting -> exporting -> finalizing -> committing -> succeeded | (cleanup) failed.

Two methods of taking the point in time:
- ``checkpoint`` (oVirt 4.4+, every disk with ``backup=incremental``): the VM backups API. Incremental from
  the last checkpoint kept in the catalog; the engine says per disk whether it can give dirty extents
  (``backup_mode``), a disk that comes back ``full`` is backed up full. The new checkpoint is kept, older
  ones removed (root first, as the engine requires).
- ``snapshot`` (4.2/4.3, or disks without incremental backup): an engine snapshot of the selected disks,
  guest filesystems frozen around it when a guest agent runs, and an image transfer of each disk snapshot.
  The snapshot is kept for the next incremental; the previous one is removed.
A broken chain (a checkpoint or snapshot that is no longer on the engine, or no earlier backup of a disk)
falls back to a full backup of the disks concerned, and the disk backup's note says so.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control import vmmeta
from control.catalog import Backup, Catalog, DiskBackup, Engine, new_id
from control.engine import DiskInfo, EngineClient
from control.engine.base import ovf_in
from control.engine.session import EngineSession
from control.errors import Busy, EngineError, FlowError, NotFound, UsageError
from control.flows.base import Cleanup, Dispatcher, Flow, bound, run_all
from control.flows.modes import DiskPlan, get_mode
from mover.jobs import ExportJob, JobProgress, backup_subject, export_subject, snapshot_subject

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "ferry backup"  # description of the snapshots Ferry takes: only those are ever removed
# Snapshot-method incrementals read only the clusters of the one layer added since the last backup (a
# shallow transfer). A store block (256 KiB) spans four 64 KiB qcow2 clusters; the mover's pipeline takes the
# clusters of a block the layer does not hold from the base block (tests/mover/pipeline_shallow_test.py).
# Off: the new snapshot is read in full and only changed blocks are stored.
SHALLOW_LAYER_READS = True
HOOK_TIMEOUT = 300  # seconds for a pre/post-snapshot command: quiescing an application, not a backup of it
# What the flow asks with the VM (``EngineBase.find_vm``): its OVF and its disks inlined, so the VM, its
# configuration and its disks come in one engine round trip instead of 3 + one per disk.
VM_DETAILS: dict[str, Any] = {"all_content": True, "follow": "disk_attachments.disk"}


@dataclass
class BackupRequest:
    vm: str  # name or id
    mode: str = "imageio"
    type: str = "incremental"  # full | incremental
    method: str | None = None  # checkpoint | snapshot | None: checkpoint when the engine and disks allow
    exclude: list[str] = field(default_factory=list)  # disk ids or aliases
    freeze: bool = True  # freeze guest filesystems around the snapshot when a guest agent runs
    backup_id: str = field(default_factory=new_id)


ClientFactory = Callable[[Engine], EngineClient]


def default_client(engine: Engine, timeout: float = 600.0, session: EngineSession | None = None,
                   password: str | None = None) -> EngineClient:
    """A client of ``engine``: its own login, or borrowing ``session``'s connection (the control plane's)."""
    return EngineClient(engine.url, engine.user, engine.password() if password is None else password,
                        engine.ca_file, timeout=timeout, session=session)


class BackupFlow(Flow):
    kind = "backup"

    def __init__(self, req: BackupRequest, catalog: Catalog, engine: Engine, dispatcher: Dispatcher,
                 store: str, job_timeout: float = 6 * 3600, client_factory: ClientFactory = default_client,
                 hooks: dict[str, str] | None = None, vm: Any = None) -> None:
        """``vm``: the VM as the caller just got it with ``VM_DETAILS`` (the control plane's trigger, which
        looks it up to answer a missing VM at once), so that the flow does not ask for it again."""
        super().__init__(req.backup_id)
        if req.type not in ("full", "incremental"):
            raise UsageError(f"backup type {req.type!r} is not full or incremental")
        if req.method not in (None, "checkpoint", "snapshot"):
            raise UsageError(f"method {req.method!r} is not checkpoint or snapshot")
        self.req = req
        self.catalog = catalog
        self.engine = engine
        self.dispatcher = dispatcher
        self.store = store
        self.job_timeout = job_timeout
        self.mode = get_mode(req.mode)
        self.client = client_factory(engine)
        self.vm: Any = None
        self._found_vm = vm
        self.disks: list[DiskInfo] = []
        self.plans: dict[str, DiskPlan] = {}
        self.method = req.method or "checkpoint"
        self.prev_point: str | None = None  # checkpoint or snapshot of the chain we build on
        self.prev_backup: str | None = None
        self.point_id: str | None = None  # the new checkpoint or snapshot
        self.engine_backup_id: str | None = None
        self.results: dict[str, Any] = {}
        self.progress: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self._plock = threading.Lock()
        self.record: Backup | None = None
        self.hooks = dict(hooks or {})
        self.ovf = ""
        self._finalize_cleanup: Cleanup | None = None

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("preparing", self.prepare), ("snapshotting", self.snapshot), ("exporting", self.export),
                ("finalizing", self.finalize), ("committing", self.commit)]

    # state recording

    def record_state(self, state: str) -> None:
        if self.record is not None:
            self.catalog.update_backup(self.id, **self.state_fields(state))
        self.emit(force=True)

    def publish_event(self) -> None:
        """The backup's state and per-disk progress."""
        self.dispatcher.event(backup_subject(self.id), {
            "backup_id": self.id, "vm": self.vm.name if self.vm is not None else self.req.vm,
            "state": self.state, "error": self.error, "mode": self.req.mode, "method": self.method,
            "disks": self.progress, "warnings": self.warnings})

    def stats(self) -> dict[str, Any]:
        keys = ("read", "stored", "zero", "duplicate", "sent")
        total: dict[str, Any] = {k: 0 for k in keys}
        for r in self.results.values():
            for k in keys:
                v = r.stats.get(f"bytes_{k}", r.stats.get(k, 0))
                total[k] += int(v) if isinstance(v, (int, float)) else 0
        if self.req.mode == "imageio" and not total["sent"]:
            total["sent"] = total["read"]  # what the mover read came over HTTPS from imageio, once
        start = self.history[0][1] if self.history else time.time()
        total["seconds"] = round(time.time() - start, 3)
        total["warnings"] = self.warnings
        return total

    # steps

    def prepare(self) -> None:
        c = self.client.connect()
        self.vm = self._found_vm if self._found_vm is not None else c.find_vm(self.req.vm, **VM_DETAILS)
        vm_id = self.vm.id
        self.catalog.record_vm(self.engine.id, vm_id, self.vm.name)
        # In the catalog from the start: a backup that fails early is listed with its error too.
        self.record = Backup(id=self.id, engine_id=self.engine.id, vm_id=vm_id, vm_name=self.vm.name,
                             mode=self.req.mode, method=self.req.method or "auto", type=self.req.type,
                             state=self.state, started=time.time(), store=self.store)
        self.catalog.add_backup(self.record)
        if not self.catalog.lock_vm(vm_id, self.id):
            raise Busy(f"another backup or restore ({self.catalog.lock_owner(vm_id)}) is running", name=self.vm.name)
        self.always("unlock VM", lambda: self.catalog.unlock_vm(vm_id, self.id))
        all_disks = c.vm_disks(vm_id, vm=self.vm)
        excluded = set(self.req.exclude)
        self.disks = [d for d in all_disks if d.id not in excluded and d.alias not in excluded]
        unknown = excluded - {d.id for d in all_disks} - {d.alias for d in all_disks}
        if unknown:
            raise NotFound(kind="disk", name=f"{', '.join(sorted(unknown))} of VM {self.vm.name}")
        if not self.disks:
            raise UsageError(f"VM {self.vm.name} has no disk left to back up")
        if self.req.method is None:
            # The VM backups API needs 4.4+ and incremental backup enabled on every disk.
            ok = c.version() >= (4, 4) and all(d.incremental for d in self.disks)
            self.method = "checkpoint" if ok else "snapshot"
        self.catalog.update_backup(self.id, method=self.method)
        self.ovf = ovf_in(self.vm) or c.vm_ovf(vm_id)  # asked again only when the VM came without it
        chain = self.catalog.chain(vm_id, self.method) if self.req.type == "incremental" else None
        if chain:
            self.prev_point, self.prev_backup = chain
            present = ({cp.id for cp in c.checkpoints(vm_id)} if self.method == "checkpoint"
                       else {s.id for s in c.snapshots(vm_id)})
            if self.prev_point not in present:
                self.warnings.append(f"the {self.method} {self.prev_point} of the last backup is gone from the "
                                     "engine: full backup")
                log.warning("broken chain vm=%s %s=%s: full backup", vm_id, self.method, self.prev_point)
                self.prev_point = None
        for d in self.disks:
            plan = DiskPlan(disk=d, kind="full")
            if self.req.type == "incremental" and self.prev_point and self.prev_backup:
                prev = self.catalog.last_disk_backup(self.prev_backup, d.id)
                if prev is None:
                    plan.note = "no earlier backup of this disk in the chain: full"
                else:
                    plan.kind, plan.base = "incremental", prev.store_backup_id
            elif self.req.type == "incremental":
                plan.note = "no usable earlier backup: full"
            self.plans[d.id] = plan
            self.progress[d.id] = {"alias": d.alias, "state": "pending", "kind": plan.kind, "done": 0,
                                   "total": d.size, "stored": 0, "rate": 0.0}

    def snapshot(self) -> None:
        post = None
        if self.hooks.get("post"):
            post = self.always("post-snapshot command", lambda: self._hook("post"))
        if self.hooks.get("pre"):
            self._hook("pre")
        self._take_point()
        if post is not None:
            # Right after the point in time: the application resumes before the long export starts.
            self.discharge(post)  # discharged first: a failing post command is not run a second time
            self._hook("post")

    def _hook(self, which: str) -> None:
        """Run the configured pre/post command (application consistency); a failure fails the backup."""
        cmd = self.hooks[which]
        env = {**os.environ, "FERRY_VM": self.vm.name, "FERRY_VM_ID": self.vm.id, "FERRY_BACKUP_ID": self.id,
               "FERRY_HOOK": which}
        try:
            r = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=HOOK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FlowError(f"{which}-snapshot command timed out after {HOOK_TIMEOUT}s", kind="hook",
                            name=self.vm.name) from None
        log.info("hook ran vm=%s hook=%s rc=%d", self.vm.name, which, r.returncode)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise FlowError(f"{which}-snapshot command exited {r.returncode}: {tail[0][:200]}", kind="hook",
                            name=self.vm.name)

    def _take_point(self) -> None:
        c, vm_id = self.client, self.vm.id
        if self.method == "checkpoint":
            try:
                eb = self._start_vm_backup(self.prev_point)
            except EngineError as e:
                if self.prev_point is None:
                    raise
                # The engine could not back up from the checkpoint (a bitmap lost after an unclean
                # shutdown, say): the chain is broken, so every disk is backed up full.
                why = f"incremental backup from checkpoint {self.prev_point} failed on the engine ({e.reason})"
                log.warning("broken chain vm=%s: %s: full backup", vm_id, why)
                self.prev_point = None
                for plan in self.plans.values():
                    plan.kind, plan.base = "full", None
                    plan.note = f"{why}: full"
                    self.progress[plan.disk.id]["kind"] = "full"
                eb = self._start_vm_backup(None)
            # The disks' backup modes matter only to incremental plans: a full backup does not ask.
            if any(plan.kind == "incremental" for plan in self.plans.values()):
                modes = c.backup_disk_modes(vm_id, eb.id)
                for plan in self.plans.values():
                    if plan.kind == "incremental" and modes.get(plan.disk.id, "full") != "incremental":
                        plan.kind, plan.base = "full", None
                        plan.note = "the engine has no dirty extents for this disk (backup_mode full): full"
                        self.progress[plan.disk.id]["kind"] = "full"
            # The ready backup names its checkpoint already; asked again only if it does not.
            self.point_id = str(eb.to_checkpoint_id) if eb.to_checkpoint_id else c.backup_checkpoint(vm_id, eb.id)
        else:
            frozen = False
            if self.req.freeze and c.has_guest_agent(self.vm):
                c.freeze(vm_id)
                frozen = True
                thaw = self.always("thaw filesystems", lambda: c.thaw(vm_id))
            try:
                sid = c.create_snapshot(vm_id, [d.id for d in self.disks], f"{SNAPSHOT_PREFIX} {self.id}")
                self.catalog.update_backup(self.id, engine_ref=sid)
                self.on_failure("remove new snapshot", lambda: c.remove_snapshot(vm_id, sid))
                self.point_id = sid
                c.wait_snapshot(vm_id, sid)
            finally:
                if frozen:
                    # Thaw as soon as the snapshot exists: the guest must not stay frozen during the export.
                    c.thaw(vm_id)
                    self.discharge(thaw)
            vols = c.snapshot_disks(vm_id, sid)
            between = self._snapshots_between(self.prev_point, sid) if self.prev_point else []
            for plan in self.plans.values():
                if plan.disk.id not in vols:
                    raise EngineError(f"snapshot {sid} holds no volume of disk {plan.disk.alias}", url=c.url)
                plan.snapshot_volume = vols[plan.disk.id]
                if plan.kind != "incremental":
                    continue
                others = [s for s in between if plan.disk.id in c.snapshot_disks(vm_id, s)]
                if others:
                    # More than one layer since the last backup: one shallow read would miss the others.
                    # Everything is read and compared with the base instead (still only changes are stored).
                    plan.note = (f"{len(others)} other snapshot(s) since the last backup: read in full, "
                                 "only changed blocks stored")
                elif SHALLOW_LAYER_READS:
                    plan.shallow = True
        for plan in self.plans.values():
            if plan.note:
                self.warnings.append(f"disk {plan.disk.alias}: {plan.note}")
        self.dispatcher.event(snapshot_subject(vm_id), {
            "backup_id": self.id, "vm": self.vm.name, "method": self.method, "point_id": self.point_id,
            "state": "created"})

    def _snapshots_between(self, older: str, newer: str) -> list[str]:
        """Ids of the VM's snapshots taken after ``older`` and before ``newer`` (engine order by date)."""
        ids = [s.id for s in self.client.snapshots(self.vm.id)]
        if older not in ids or newer not in ids:
            return []
        i, j = ids.index(older), ids.index(newer)
        return ids[i + 1 : j]

    def _start_vm_backup(self, from_checkpoint: str | None) -> Any:
        c, vm_id = self.client, self.vm.id
        eb = c.start_backup(vm_id, [d.id for d in self.disks], from_checkpoint)
        self.engine_backup_id = eb.id
        self.catalog.update_backup(self.id, engine_ref=eb.id)
        self._finalize_cleanup = self.always("finalize VM backup", lambda: c.finalize_backup(vm_id, eb.id))
        return c.wait_backup_ready(vm_id, eb.id)  # the backup as it is once ready

    def export(self) -> None:
        jobs: list[ExportJob] = []
        by_job: dict[str, DiskPlan] = {}
        sources: dict[str, dict[str, Any]] = {}

        def start(flow: BackupFlow, plan: DiskPlan) -> None:
            sources[plan.disk.id] = self.mode.prepare_export(flow, plan)

        # The disks' transfers start at once (each a create and a wait until transferring on the engine): one
        # disk's wait no longer adds to the next one's. Every start runs to its end; the first failure then
        # fails the step, and clean-up cancels the transfers that did start.
        not_started = run_all([(f"start transfer {plan.disk.alias}", bound(start, self, plan))
                               for plan in self.plans.values()])
        if not_started:
            raise not_started[0][1]
        for plan in self.plans.values():
            source = sources[plan.disk.id]
            job = ExportJob(
                job_id=f"exp-{self.id}-{plan.disk.id}", backup_id=self.id, disk_id=plan.disk.id, store=self.store,
                source=source, base=plan.base,
                changed=plan.kind == "incremental" and bool(source.get("dirty") or source.get("shallow")),
                labels={"vm_id": self.vm.id, "vm_name": self.vm.name, "disk_alias": plan.disk.alias,
                        "mode": self.req.mode, "method": self.method, "type": plan.kind, "vm_backup": self.id})
            jobs.append(job)
            by_job[job.job_id] = plan
            self.progress[plan.disk.id]["state"] = "queued"
            self.catalog.put_disk_backup(self._disk_row(plan, "running"))
            self.dispatcher.event(export_subject(self.vm.id), {
                "backup_id": self.id, "disk_id": plan.disk.id, "job_id": job.job_id, "state": "queued"})
        self.emit(force=True)

        def on_progress(p: JobProgress) -> None:
            plan = by_job.get(p.job_id)
            if plan is None:
                return
            with self._plock:
                self.progress[plan.disk.id].update(state="running", done=p.done, total=p.total, stored=p.stored,
                                                   rate=p.rate)
                self.emit()

        results = self.dispatcher.run_jobs(list(jobs), on_progress, self.job_timeout)
        failures = []
        for job in jobs:
            plan = by_job[job.job_id]
            r = results.get(job.job_id)
            if r is None or not r.ok:
                why = r.error if r is not None else "no result"
                failures.append(f"disk {plan.disk.alias}: {why}")
                self.progress[plan.disk.id]["state"] = "failed"
                self.catalog.put_disk_backup(self._disk_row(plan, "failed", note=why))
                continue
            self.results[plan.disk.id] = r
            plan.store_backup_id = r.store_backup_id
            self.progress[plan.disk.id].update(state="exported", done=self.progress[plan.disk.id]["total"])
            self.dispatcher.event(export_subject(self.vm.id), {
                "backup_id": self.id, "disk_id": plan.disk.id, "job_id": job.job_id, "state": "done",
                "store_backup_id": r.store_backup_id, "stats": r.stats})
        self.emit(force=True)
        if failures:
            raise FlowError("; ".join(failures), kind="export", name=self.vm.name)

    def finalize(self) -> None:
        # The transfers end at once (each a finalize and a wait on the engine): one disk's wait no longer
        # adds to the next one's. Every transfer is finalized whatever another does; the first failure
        # then fails the step, and clean-up cancels what did not end and finalizes the VM backup.
        failures = run_all([(f"finalize {plan.disk.alias}", bound(self.mode.finish_export, self, plan))
                            for plan in self.plans.values()])
        if failures:
            raise failures[0][1]
        if self.method == "checkpoint" and self.engine_backup_id:
            # Ready, as the normal path left it: finalize without looking first (one round trip less).
            phase = self.client.finalize_backup(self.vm.id, self.engine_backup_id, look_first=False)
            if self._finalize_cleanup is not None:
                self.discharge(self._finalize_cleanup)
            if phase == "failed":
                raise EngineError(f"VM backup {self.engine_backup_id} ended failed", url=self.client.url)

    def commit(self) -> None:
        c, vm_id = self.client, self.vm.id
        disks = []
        for plan in self.plans.values():
            self.catalog.put_disk_backup(self._disk_row(plan, "succeeded", note=plan.note))
            disks.append({**plan.disk.to_dict(), "disk_id": plan.disk.id, "store_backup_id": plan.store_backup_id,
                          "kind": plan.kind, "note": plan.note})
        cluster = self.vm.cluster.id if self.vm.cluster else None
        vmmeta.save(self.store, {
            "backup_id": self.id, "created": time.time(), "engine": self.engine.url,
            "started": self.record.started if self.record else time.time(),
            "vm": {"id": vm_id, "name": self.vm.name, "cluster_id": cluster}, "ovf": self.ovf,
            "mode": self.req.mode, "method": self.method, "type": self.req.type, "point_id": self.point_id,
            "disks": disks, "stats": self.stats()})
        assert self.point_id is not None
        self.catalog.update_backup(self.id, point_id=self.point_id)
        self.catalog.set_chain(vm_id, self.method, self.point_id, self.id)
        # The new point is safe in the catalog: older points are no longer needed on the engine.
        try:
            if self.method == "checkpoint":
                for cp in c.checkpoints(vm_id):
                    if cp.id == self.point_id:
                        break
                    c.remove_checkpoint(vm_id, cp.id)
            else:
                for s in c.snapshots(vm_id):
                    if s.id != self.point_id and (s.description or "").startswith(SNAPSHOT_PREFIX):
                        c.remove_snapshot(vm_id, s.id)
        except Exception as e:  # the backup itself is good; an old point left behind is a warning
            self.warnings.append(f"could not remove an older {self.method}: {e}")
            log.warning("old point removal failed vm=%s error=%s", vm_id, e)
        self.dispatcher.event(snapshot_subject(vm_id), {
            "backup_id": self.id, "vm": self.vm.name, "method": self.method, "point_id": self.point_id,
            "state": "kept"})

    def finished(self, ok: bool) -> None:
        self.client.close()

    def _disk_row(self, plan: DiskPlan, state: str, note: str | None = None) -> DiskBackup:
        r = self.results.get(plan.disk.id)
        return DiskBackup(backup_id=self.id, disk_id=plan.disk.id, alias=plan.disk.alias, format=plan.disk.format,
                          size=plan.disk.size, kind=plan.kind, store_backup_id=plan.store_backup_id, state=state,
                          note=note or plan.note,
                          stats=dict(r.stats) | {"mover": r.mover, "attempt": r.attempt} if r is not None else {})


def ca_pem(engine: Engine) -> str:
    """The engine CA (PEM) handed to movers so they verify the imageio daemons' TLS."""
    if not engine.ca_file:
        raise UsageError(f"engine {engine.url} has no CA file: movers cannot verify imageio without one")
    return Path(engine.ca_file).read_text()
