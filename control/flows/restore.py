"""The restore flow: VM recreated from its OVF, empty disks created, data written back by movers.

States: preparing -> creating -> uploading -> attaching -> committing -> succeeded | (cleanup) failed.

The OVF and disk details come from the store (``control.vmmeta``), so any backup the store holds can be
restored. Options: a new name (default: the original name with a suffix if the original still exists), a
target cluster and storage domain, a subset of disks, start the VM at the end. With a subset of disks and no
new name, only the disks are restored (floating disks, to attach where the administrator wants). On failure
everything created so far (VM, disks, transfers) is removed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control import vmmeta
from control.catalog import Catalog, Engine, Restore, new_id
from control.engine import Transfer
from control.errors import FlowError, NotFound, UsageError
from control.flows.backup import ClientFactory, default_client
from control.flows.base import Dispatcher, Flow, bound, run_all
from control.flows.modes import get_mode
from mover.jobs import JobProgress, RestoreJob

log = logging.getLogger(__name__)


@dataclass
class RestoreRequest:
    backup_id: str  # a VM backup id (full or a unique prefix)
    name: str | None = None
    cluster: str | None = None  # name or id
    storage_domain: str | None = None  # name or id
    disks: list[str] = field(default_factory=list)  # ids or aliases; empty: all
    start: bool = False
    restore_id: str = field(default_factory=new_id)


class RestoreFlow(Flow):
    kind = "restore"

    def __init__(self, req: RestoreRequest, catalog: Catalog, engine: Engine, dispatcher: Dispatcher,
                 job_timeout: float = 6 * 3600, client_factory: ClientFactory = default_client) -> None:
        super().__init__(req.restore_id)
        self.req = req
        self.catalog = catalog
        self.engine = engine
        self.dispatcher = dispatcher
        self.job_timeout = job_timeout
        self.client = client_factory(engine)
        self.backup = catalog.backup(req.backup_id)
        self.mode = get_mode(self.backup.mode)
        self.meta: dict[str, Any] = {}
        self.disks: list[dict[str, Any]] = []
        self.new_disks: dict[str, str] = {}  # original disk id -> new disk id
        self.transfers: dict[str, Transfer] = {}
        self.vm_id: str | None = None
        self.vm_name = ""
        self.progress: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self._plock = threading.Lock()
        self._recorded = False
        self.only_disks = False  # some disks, no new VM: they come back as floating disks
        self.cluster_id = ""
        self.sd_id: str | None = None

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("preparing", self.prepare), ("creating", self.create), ("uploading", self.upload),
                ("attaching", self.attach), ("committing", self.commit)]

    def record_state(self, state: str) -> None:
        if self._recorded:
            self.catalog.update_restore(self.id, vm_id=self.vm_id, **self.state_fields(state))
        self.emit(force=True)

    def publish_event(self) -> None:
        """The restore's state, per-disk progress and the disks created so far."""
        self.dispatcher.event(f"ferry.events.restore.{self.id}", {
            "restore_id": self.id, "backup_id": self.backup.id, "vm": self.vm_name, "vm_id": self.vm_id,
            "state": self.state, "error": self.error, "disks": self.progress, "new_disks": self.new_disks})

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {"written": 0, "zero": 0}
        for r in self.results.values():
            for k in ("written", "zero"):
                v = r.stats.get(f"bytes_{k}", r.stats.get(k, 0))
                total[k] += int(v) if isinstance(v, (int, float)) else 0
        start = self.history[0][1] if self.history else time.time()
        total["seconds"] = round(time.time() - start, 3)
        total["disks"] = dict(self.new_disks)  # original disk id -> restored disk id
        return total

    def prepare(self) -> None:
        b = self.backup
        if b.state != "succeeded":
            raise UsageError(f"backup {b.id} is {b.state}: only succeeded backups can be restored")
        self.meta = vmmeta.load(b.store, b.id)
        disks = self.meta["disks"]
        if self.req.disks:
            wanted = set(self.req.disks)
            disks = [d for d in disks if d["disk_id"] in wanted or d["alias"] in wanted]
            missing = wanted - {d["disk_id"] for d in disks} - {d["alias"] for d in disks}
            if missing:
                raise NotFound(kind="disk", name=f"{', '.join(sorted(missing))} in backup {b.id}")
        self.disks = disks
        c = self.client.connect()
        self.only_disks = bool(self.req.disks) and not self.req.name
        if not self.only_disks:
            name = self.req.name or self.meta["vm"]["name"]
            if c.find_vm_by_name(name) is not None:
                if self.req.name:
                    raise UsageError(f"a VM named {name} exists already: choose another --name")
                name = f"{name}-restored-{time.strftime('%Y%m%d-%H%M%S')}"
            self.vm_name = name
            cluster = self.req.cluster or self.meta["vm"].get("cluster_id")
            if not cluster:
                raise UsageError("the backup does not name a cluster: give --cluster")
            self.cluster_id = c.find_cluster(cluster).id
        self.sd_id = c.find_storage_domain(self.req.storage_domain).id if self.req.storage_domain else None
        self.catalog.add_restore(Restore(id=self.id, backup_id=b.id, vm_name=self.vm_name or "(disks only)",
                                         state=self.state, started=time.time()))
        self._recorded = True
        for d in self.disks:
            self.progress[d["disk_id"]] = {"alias": d["alias"], "state": "pending", "done": 0, "total": d["size"]}

    def create(self) -> None:
        c = self.client
        if not self.only_disks:
            vm_id = c.create_vm_from_ovf(self.meta["ovf"], self.vm_name, self.cluster_id)
            self.vm_id = vm_id
            self.on_failure("remove restored VM", lambda: c.remove_vm(vm_id))
        for d in self.disks:
            if not (self.sd_id or d.get("storage_domain")):
                raise UsageError(f"disk {d['alias']}: no storage domain recorded: give --storage-domain")

        def create(flow: RestoreFlow, d: dict[str, Any]) -> None:
            alias = d["alias"] if not flow.only_disks else f"{d['alias']}-restored"
            new_id_ = c.create_disk(alias, int(d["size"]), d["format"], bool(d.get("sparse", True)),
                                    flow.sd_id or d["storage_domain"], incremental=bool(d.get("incremental")))
            flow.new_disks[d["disk_id"]] = new_id_
            flow.on_failure(f"remove restored disk {alias}", _remover(c.remove_disk, new_id_))

        # The disks are created at once (each a create and a wait until ok on the engine), as the transfers
        # below are started and ended: the time is the slowest disk's, not the sum. Every creation runs to its
        # end; the first failure then fails the step, and clean-up removes the disks that were made.
        failures = run_all([(f"create disk {d['alias']}", bound(create, self, d)) for d in self.disks])
        if failures:
            raise failures[0][1]

    def upload(self) -> None:
        jobs: list[RestoreJob] = []
        by_job: dict[str, str] = {}
        sinks: dict[str, dict[str, Any]] = {}

        def start(flow: RestoreFlow, d: dict[str, Any]) -> None:
            sinks[d["disk_id"]] = self.mode.prepare_restore(flow, flow.new_disks[d["disk_id"]], int(d["size"]))

        # The uploads start at once (see BackupFlow.export); clean-up cancels those that started.
        not_started = run_all([(f"start upload {d['alias']}", bound(start, self, d)) for d in self.disks])
        if not_started:
            raise not_started[0][1]
        for d in self.disks:
            new = self.new_disks[d["disk_id"]]
            sink = sinks[d["disk_id"]]
            job = RestoreJob(job_id=f"rst-{self.id}-{d['disk_id']}", restore_id=self.id, disk_id=new,
                             store=self.backup.store, store_backup_id=d["store_backup_id"], sink=sink)
            jobs.append(job)
            by_job[job.job_id] = d["disk_id"]
            self.progress[d["disk_id"]]["state"] = "queued"

        def on_progress(p: JobProgress) -> None:
            did = by_job.get(p.job_id)
            if did is not None:
                with self._plock:
                    self.progress[did].update(state="running", done=p.done, total=p.total)
                    self.emit()

        results = self.dispatcher.run_jobs(list(jobs), on_progress, self.job_timeout)
        failures = []
        for job in jobs:
            did = by_job[job.job_id]
            r = results.get(job.job_id)
            if r is None or not r.ok:
                failures.append(f"disk {self.progress[did]['alias']}: {r.error if r else 'no result'}")
                self.progress[did]["state"] = "failed"
            else:
                self.results[did] = r
                self.progress[did].update(state="written", done=self.progress[did]["total"])
        if failures:
            raise FlowError("; ".join(failures), kind="restore", name=self.id)
        # Uploads end at once (see BackupFlow.finalize); the first failure fails the step.
        ended = run_all([(f"finalize upload {d['alias']}", bound(self.mode.finish_restore, self,
                                                                  self.new_disks[d["disk_id"]]))
                         for d in self.disks])
        if ended:
            raise ended[0][1]

    def attach(self) -> None:
        if self.vm_id is None:
            return
        for d in self.disks:
            self.client.attach_disk(self.vm_id, self.new_disks[d["disk_id"]], d.get("interface") or "virtio_scsi",
                                    bool(d.get("bootable")))

    def commit(self) -> None:
        if self.req.start and self.vm_id is not None:
            self.client.start_vm(self.vm_id)
        self.catalog.update_restore(self.id, vm_id=self.vm_id, stats=self.stats())

    def finished(self, ok: bool) -> None:
        self.client.close()


def _remover(fn: Callable[[str], Any], obj_id: str) -> Callable[[], Any]:
    """A clean-up bound to one id now (a lambda in a loop would see the last one)."""
    return lambda: fn(obj_id)
