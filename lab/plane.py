"""Ferry as separate processes, as in production: NATS, ``ferry control`` and ``ferry mover``.

An embedded ``nats-server``, one control plane and any number of movers, each its own process, driven by the
``ferry`` CLI and sharing one data directory and one store. The end-to-end tests (``tests/control/plane.py``:
short engine waits, hooks) and the imageio benchmark (``bench/imageio_plane.py``: production timeouts, movers
restarted between measurements) build on ``Plane``; every process started here is stopped by ``close()``.
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

from control.natsd import NatsServer
from control.procs import stop
from lab.errors import LabError

ROOT = Path(__file__).resolve().parents[1]


class Plane:
    """NATS, one control plane and movers sharing ``base/data`` (config, catalog) and ``base/store``.

    ``config`` is written to the data directory's ``config.json``; ``ready_timeout`` bounds the wait for the
    control plane (and a waited-for mover), ``command_timeout`` one ``ferry`` command, ``stop_timeout`` the
    wait for a process to exit after SIGTERM before it is killed. Errors are of ``error_type`` (subclasses
    raise their own kind)."""

    error_type: type[Exception] = LabError

    def __init__(self, base: Path, engine_url: str, user: str, password: str, ca_file: str, *,
                 config: dict[str, Any], ready_timeout: float = 30.0, command_timeout: float = 3600.0,
                 stop_timeout: float = 10.0) -> None:
        self.base = base
        self.data = base / "data"
        self.store = base / "store"
        self.data.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        (self.data / "config.json").write_text(json.dumps(config))
        self.ready_timeout = ready_timeout
        self.command_timeout = command_timeout
        self.stop_timeout = stop_timeout
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.nats = NatsServer(base / "nats")
        self.control: subprocess.Popen[bytes] | None = None
        self.movers: list[subprocess.Popen[bytes]] = []
        self._started_movers = 0
        self.nats.start()
        try:
            pw = base / "engine-password"
            fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password)
            self.ferry("engine", "add", engine_url, "--user", user, "--password-file", str(pw), "--ca-file", ca_file)
            self.start_control()
        except BaseException:
            self.close()  # no caller holds this plane yet: nothing else would stop NATS or the control plane
            raise

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "control.cli", "-v", *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, env=self.env, cwd=ROOT)

    def start_control(self) -> None:
        """Start ``ferry control`` (log ``control.log``) and wait until it answers triggers."""
        self.control = self._spawn(["control", "--data-dir", str(self.data), "--nats", self.nats.url,
                                    "--store", str(self.store)], self.base / "control.log")
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            r = self.ferry("backup", "--no-wait", "", check=False)  # an empty VM name: answered with an error
            if "no control plane answered" not in r.stderr:
                return
            time.sleep(0.2)
        raise self.error_type("control plane did not come up: " + self.tail(self.base / "control.log"))

    def kill_control(self) -> None:
        """SIGKILL the control plane (a crash: no clean-up of its flows)."""
        assert self.control is not None
        self.control.send_signal(signal.SIGKILL)
        self.control.wait()

    def spawn_mover(self, *extra: str, store: Path | None = None, wait: bool = False) -> subprocess.Popen[bytes]:
        """Start one ``ferry mover`` with the imageio and store capabilities and ``extra`` arguments.

        Its log is ``mover-N.log``, N counting the movers started so far from 0. ``store``: write there instead
        of the plane's store. ``wait``: return only once it logged that it is ready."""
        log = self.base / f"mover-{self._started_movers}.log"
        self._started_movers += 1
        p = self._spawn(["mover", "--nats", self.nats.url, "--store", str(store or self.store),
                         "--capability", "imageio", "--capability", "store", *extra], log)
        self.movers.append(p)
        deadline = time.monotonic() + self.ready_timeout
        while wait and "Mover ready" not in log.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise self.error_type("mover did not come up: " + self.tail(log))
            time.sleep(0.05)
        return p

    def stop_movers(self) -> None:
        """Stop every mover (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        stop(self.movers, self.stop_timeout)
        self.movers = []

    def ferry(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run one ``ferry`` command against this plane (``failed()``'s error if it fails and ``check``)."""
        cmd = [sys.executable, "-m", "control.cli", args[0]]
        if args[0] == "engine":
            cmd += [args[1], *args[2:], "--data-dir", str(self.data)]
        else:
            cmd += [*args[1:], "--data-dir", str(self.data), "--nats", self.nats.url, "--store", str(self.store)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT,
                           timeout=self.command_timeout if timeout is None else timeout)
        if check and r.returncode != 0:
            raise self.failed(args, r)
        return r

    def failed(self, args: tuple[str, ...], r: subprocess.CompletedProcess[str]) -> Exception:
        """The error for a failed ``ferry`` command: its exit code and last line of output."""
        return self.error_type(f"ferry {' '.join(args)} -> exit {r.returncode}: "
                               f"{(r.stderr.strip().splitlines() or [''])[-1]}")

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
        """The last ``n`` characters of a log."""
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def logs(self, n: int = 3000) -> str:
        """The tail of every log of this plane (control plane, movers), for a failure's message."""
        return "\n".join(f"--- {f.name}\n{self.tail(f, n)}" for f in sorted(self.base.glob("*.log")))

    def close(self) -> None:
        """Stop every process started here: movers, the control plane, NATS."""
        stop([*self.movers, *([self.control] if self.control else [])], self.stop_timeout)
        self.movers = []
        self.control = None
        self.nats.stop()
