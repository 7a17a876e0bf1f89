"""The Ferry processes of the imageio benchmark: ``lab.plane.Plane`` with production timeouts.

NATS, ``ferry control`` and ``ferry mover`` as separate processes, as in production (and as the end-to-end
tests run them). Movers can be stopped and started between measurements (one mover, then two limited ones for
the scale-out figure), and every process started here is stopped by ``close()``. On top of the shared plane:
CPU accounting, timed ``--json`` commands and where a flow's time went.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.measure import BenchError
from lab import plane, procs

READY_TIMEOUT = 30.0


class FerryPlane(plane.Plane):
    """NATS, one control plane and any number of movers sharing a data directory and a store."""

    error_type = BenchError

    def __init__(self, base: Path, engine_url: str, user: str, password: str, ca_file: str) -> None:
        # Production job timeout; engine waits short enough that a stuck lab fails the run in seconds.
        super().__init__(base, engine_url, user, password, ca_file,
                         config={"engine_timeout": 30, "job_timeout": 3600},
                         ready_timeout=READY_TIMEOUT, command_timeout=3600, stop_timeout=10)

    def start_movers(self, n: int, *extra: str, store: Path | None = None) -> None:
        """Start ``n`` movers (``extra``: e.g. ``--workers 1 --threads 1``), each waited for until ready.

        ``store``: the movers write there instead of the control plane's store (a fresh store per
        measurement, so that a later backup does not deduplicate against an earlier one)."""
        for _ in range(n):
            self.spawn_mover(*extra, store=store, wait=True)

    def cpu(self) -> float:
        """CPU seconds used so far by the running movers and the control plane (with their reaped children)."""
        return cpu_seconds([p.pid for p in [*self.movers, *([self.control] if self.control else [])]])

    def timed_json(self, *args: str) -> tuple[float, Any, tuple[float, float]]:
        """Wall time of ``ferry ARGS --json`` (the whole command, as an administrator waits for it), its output,
        and its (start, end) epoch times (for ``phases``)."""
        t0, w0 = time.perf_counter(), time.time()
        r = self.ferry(*args, "--json")
        return time.perf_counter() - t0, json.loads(r.stdout), (w0, time.time())

    def phases(self, flow_id: str, span: tuple[float, float]) -> dict[str, float]:
        """Where a flow's wall time went: seconds in each state the control plane logged for it, plus the
        command's start-up and trigger before the first state ("cli+trigger") and its exit after the last."""
        marks: list[tuple[float, str]] = []
        for line in (self.base / "control.log").read_text(errors="replace").splitlines():
            if f"state id={flow_id} state=" not in line:
                continue
            stamp, _, _ = line.partition(" INFO ")
            try:
                t = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
            except ValueError:
                continue
            marks.append((t, line.rsplit("state=", 1)[1].strip()))
        if not marks:
            return {}
        out = {"cli+trigger": round(marks[0][0] - span[0], 3)}
        for (t, state), (t_next, _) in zip(marks, [*marks[1:], (span[1], "")], strict=True):
            key = "cli exit" if state in ("succeeded", "failed") else state
            out[key] = round(out.get(key, 0.0) + t_next - t, 3)
        return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (and their waited-for children) from ``/proc/PID/stat``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone: its time is lost, as it would be for any exited process we did not reap
        # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14-17
        total += sum(int(x) for x in fields[11:15])
    return total / tick


def pids_of(*needles: str) -> list[int]:
    """Processes whose command line contains every one of ``needles``."""
    pids = (int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit())
    return [pid for pid in pids if all(n in procs.cmdline(pid) for n in needles)]
