"""The frame of every flow: named steps, a recorded state, and clean-up that always runs.

A flow runs its steps in order; each step records the flow's state (catalog + an event) and may register
clean-up actions. Clean-up runs in reverse order whatever happens: ``always`` actions after success and
failure (release the VM lock, thaw, finalize a VM backup), ``on_failure`` actions only when a step failed
(cancel transfers, remove the snapshot or the half-restored VM). Every action is idempotent and a failing
action is logged and recorded without hiding the error that started the clean-up, so nothing is left on the
engine that a later run could not also remove.

Flows are synchronous (the SDK is) and run in a thread of the control plane; they reach NATS only through
a ``Dispatcher``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from control.errors import FerryError, FlowError
from mover.jobs import ExportJob, JobProgress, JobResult, RestoreJob

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """What a flow needs from the message bus (the control plane service implements it over NATS)."""

    def run_jobs(self, jobs: list[ExportJob | RestoreJob], on_progress: Callable[[JobProgress], None],
                 timeout: float) -> dict[str, JobResult]:
        """Publish ``jobs``, wait for one result each (job id -> result); progress comes to ``on_progress``."""
        ...

    def event(self, subject: str, data: dict[str, Any]) -> None:
        """Publish a control-plane event (best effort: an event lost never fails a flow)."""
        ...


@dataclass
class Cleanup:
    name: str
    fn: Callable[[], Any]
    always: bool  # False: only after a failure
    done: bool = False


@dataclass
class CleanupReport:
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Flow:
    """Base of the backup and restore state machines."""

    kind = "flow"
    # Seconds between two progress events of one flow; state changes are always published at once.
    EVENT_INTERVAL = 0.5

    def __init__(self, flow_id: str) -> None:
        self.id = flow_id
        self._last_event = 0.0
        self.state = "new"
        self.history: list[tuple[str, float]] = []
        self.error: str | None = None
        self.cleanup_report = CleanupReport()
        self._cleanups: list[Cleanup] = []

    # to override

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """(state name, step) pairs, run in order."""
        raise NotImplementedError

    def record_state(self, state: str) -> None:
        """Persist/publish the new state (catalog, event)."""

    def finished(self, ok: bool) -> None:
        """Called once at the very end (after clean-up) with the outcome."""

    def publish_event(self) -> None:
        """Publish the flow's state and progress (called by ``emit``)."""

    def stats(self) -> dict[str, Any]:
        """Figures kept with the flow's record when it ends."""
        return {}

    # shared by the flows

    def emit(self, force: bool = False) -> None:
        """Publish state and progress, at most once per ``EVENT_INTERVAL`` unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_event < self.EVENT_INTERVAL:
            return
        self._last_event = now
        self.publish_event()

    def state_fields(self, state: str) -> dict[str, Any]:
        """Catalog fields for entering ``state``; the end time, error and stats when it is final."""
        fields: dict[str, Any] = {"state": state}
        if state in ("succeeded", "failed"):
            fields.update(finished=time.time(), error=self.error, stats=self.stats())
        return fields

    # machinery

    def always(self, name: str, fn: Callable[[], Any]) -> Cleanup:
        """Register a clean-up that runs after success and failure."""
        c = Cleanup(name, fn, always=True)
        self._cleanups.append(c)
        return c

    def on_failure(self, name: str, fn: Callable[[], Any]) -> Cleanup:
        """Register a clean-up that runs only if the flow fails."""
        c = Cleanup(name, fn, always=False)
        self._cleanups.append(c)
        return c

    def discharge(self, c: Cleanup) -> None:
        """Mark a clean-up as no longer needed (its object was handled on the normal path)."""
        c.done = True

    def set_state(self, state: str) -> None:
        self.state = state
        self.history.append((state, time.time()))
        log.info("%s state id=%s state=%s", self.kind, self.id, state)
        try:
            self.record_state(state)
        except Exception as e:  # recording is secondary: a catalog hiccup must not abort the clean-up path
            log.warning("%s could not record state id=%s state=%s error=%s", self.kind, self.id, state, e)

    def run(self) -> None:
        """Run every step; on failure run clean-up and raise ``FlowError`` (one line, with the step)."""
        failed: BaseException | None = None
        failed_step = "start"
        try:
            for state, step in self.steps():
                self.set_state(state)
                step()
        except BaseException as e:
            failed = e
            failed_step = self.state
            self.error = _one_line(e)
            log.error("%s failed id=%s state=%s error=%s", self.kind, self.id, self.state, self.error)
        self._run_cleanups(failed is not None)
        ok = failed is None
        self.set_state("succeeded" if ok else "failed")
        self.finished(ok)
        if failed is not None:
            if isinstance(failed, (KeyboardInterrupt, SystemExit)):
                raise failed
            raise FlowError(f"{self.error} (in step {failed_step})", kind=self.kind, name=self.id) \
                from failed

    def _run_cleanups(self, failed: bool) -> None:
        todo = [c for c in reversed(self._cleanups) if not c.done and (c.always or failed)]
        if not todo:
            return
        if failed:
            self.set_state("cleanup")
        for c in todo:
            try:
                c.fn()
                c.done = True
                self.cleanup_report.ran.append(c.name)
                log.info("%s cleanup id=%s action=%s", self.kind, self.id, c.name)
            except Exception as e:
                self.cleanup_report.failed[c.name] = _one_line(e)
                log.error("%s cleanup failed id=%s action=%s error=%s", self.kind, self.id, c.name, _one_line(e))


def bound(fn: Callable[[Any, Any], Any], flow: Any, item: Any) -> Callable[[], Any]:
    """``fn(flow, item)`` bound now (a lambda in a loop would see the last item)."""
    return lambda: fn(flow, item)


def run_all(actions: list[tuple[str, Callable[[], Any]]]) -> list[tuple[str, BaseException]]:
    """Run ``(name, action)`` pairs at once, one thread each, every one to its end whatever the others do;
    return the failures (name, error) in the order given. For engine waits that overlap (finalizing the
    transfers of a backup): the time is the slowest one's, not the sum. One action runs in the caller."""
    failures: dict[int, BaseException] = {}

    def run(i: int, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller, which decides; never lost in a thread
            failures[i] = e

    if len(actions) == 1:
        run(0, actions[0][1])
    else:
        threads = [threading.Thread(target=run, args=(i, fn), name=f"flow-{name}"[:40], daemon=True)
                   for i, (name, fn) in enumerate(actions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, e in sorted(failures.items()):
        if len(actions) > 1:
            log.error("concurrent action failed action=%s error=%s", actions[i][0], _one_line(e))
    return [(actions[i][0], failures[i]) for i in sorted(failures)]


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, FerryError) else f"{type(e).__name__}: {e}"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
