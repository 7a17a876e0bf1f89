"""The Ferry processes of the imageio benchmark: NATS, ``ferry control`` and ``ferry mover`` as separate processes.

As in production (and as ``tests/control/plane.py`` does for the end-to-end tests): an embedded
``nats-server``, the control plane and movers each their own process, driven by the ``ferry`` CLI. Movers can
be stopped and started between measurements (one mover, then two limited ones for the scale-out figure), and
every process started here is stopped by ``close()``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import BenchError
from control.natsd import NatsServer

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0


class FerryPlane:
    """NATS, one control plane and any number of movers sharing a data directory and a store."""

    def __init__(self, base: Path, engine_url: str, user: str, password: str, ca_file: str) -> None:
        self.base = base
        self.data = base / "data"
        self.store = base / "store"
        self.data.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        # Production job timeout; engine waits short enough that a stuck lab fails the run in seconds.
        (self.data / "config.json").write_text(json.dumps({"engine_timeout": 30, "job_timeout": 3600}))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.nats = NatsServer(base / "nats")
        self.control: subprocess.Popen[bytes] | None = None
        self.movers: list[subprocess.Popen[bytes]] = []
        self._logs = 0
        self.nats.start()
        pw = base / "engine-password"
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
        self.ferry("engine", "add", engine_url, "--user", user, "--password-file", str(pw), "--ca-file", ca_file)
        self.start_control()

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "control.cli", "-v", *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, env=self.env, cwd=ROOT)

    def start_control(self) -> None:
        """Start ``ferry control`` and wait until it answers triggers."""
        self.control = self._spawn(["control", "--data-dir", str(self.data), "--nats", self.nats.url,
                                    "--store", str(self.store)], self.base / "control.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            r = self.ferry("backup", "--no-wait", "", check=False)  # an empty VM name: answered with an error
            if "no control plane answered" not in r.stderr:
                return
            time.sleep(0.2)
        raise BenchError("control plane did not come up: " + self.tail(self.base / "control.log"))

    def start_movers(self, n: int, *extra: str, store: Path | None = None) -> None:
        """Start ``n`` movers (``extra``: e.g. ``--workers 1 --threads 1``), each waited for until ready.

        ``store``: the movers write there instead of the control plane's store (a fresh store per
        measurement, so that a later backup does not deduplicate against an earlier one)."""
        for _ in range(n):
            self._logs += 1
            log = self.base / f"mover-{self._logs}.log"
            args = ["mover", "--nats", self.nats.url, "--store", str(store or self.store),
                    "--capability", "imageio", "--capability", "store", *extra]
            p = self._spawn(args, log)
            self.movers.append(p)
            deadline = time.monotonic() + READY_TIMEOUT
            while "Mover ready" not in log.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("mover did not come up: " + self.tail(log))
                time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds used so far by the running movers and the control plane (with their reaped children)."""
        return cpu_seconds([p.pid for p in [*self.movers, *([self.control] if self.control else [])]])

    def stop_movers(self) -> None:
        _stop(self.movers)
        self.movers = []

    def ferry(self, *args: str, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        """Run one ``ferry`` command against this plane; BenchError with its output if it fails."""
        cmd = [sys.executable, "-m", "control.cli", args[0]]
        if args[0] == "engine":
            cmd += [args[1], *args[2:], "--data-dir", str(self.data)]
        else:
            cmd += [*args[1:], "--data-dir", str(self.data), "--nats", self.nats.url, "--store", str(self.store)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"ferry {' '.join(args)} -> exit {r.returncode}: "
                             f"{(r.stderr.strip().splitlines() or [''])[-1]}")
        return r

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

    def restored_disks(self, restore_id: str) -> dict[str, str]:
        """Original disk id -> new disk id of a finished restore (from the catalog)."""
        from control.catalog import Catalog

        cat = Catalog(self.data / "catalog.sqlite")
        try:
            return dict(cat.restore(restore_id).stats["disks"])
        finally:
            cat.close()

    @staticmethod
    def tail(path: Path, n: int = 1500) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop every process started here: movers, the control plane, NATS."""
        _stop([*self.movers, *([self.control] if self.control else [])])
        self.movers = []
        self.control = None
        self.nats.stop()


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
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            out.append(int(d.name))
    return out


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            # An idle mover or control plane exits at once; a busy one gets a few seconds, then is killed.
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
