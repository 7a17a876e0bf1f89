"""The whole system for end-to-end tests: NATS, the control plane and movers as separate processes."""

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
from lab import client as labclient

ROOT = Path(__file__).resolve().parents[2]


class Plane:
    """NATS (in-test), ``ferry control`` and ``ferry mover`` processes sharing one data dir and store."""

    def __init__(self, base: Path, lab: labclient.Lab, movers: int = 2, workers: int = 1,
                 mover_args: tuple[str, ...] = ()) -> None:
        self.base = base
        self.lab = lab
        self.data = base / "data"
        self.store = base / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        # Short engine waits so a hung transfer fails the flow in seconds, not the production 10 minutes.
        # Hooks for the VMs of the hook tests only: each appends to hooks.log what ran, for which backup.
        self.hook_log = base / "hooks.log"
        log = f'echo "$FERRY_HOOK $FERRY_VM $FERRY_BACKUP_ID" >> {self.hook_log}'
        hooks = {"web-hooks": {"pre": log, "post": log},
                 "web-hookfail": {"pre": f"{log}; echo database refused to quiesce >&2; exit 3", "post": log}}
        (self.data / "config.json").write_text(json.dumps({"engine_timeout": 8, "job_timeout": 300,
                                                           "hooks": hooks}))
        self.nats = NatsServer(base / "nats")
        self.workers = workers
        self.mover_args = mover_args
        self.control: subprocess.Popen[bytes] | None = None
        self.movers: list[subprocess.Popen[bytes]] = []
        self.nats.start()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        pw = base / "engine-password"
        pw.write_text(lab.password)
        self.ferry("engine", "add", lab.url, "--user", lab.user, "--password-file", str(pw), "--ca-file", lab.ca_file)
        self.start_control()
        for _ in range(movers):
            self.start_mover()

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.base / log, "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", "control.cli", "-v", *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, env=self.env, cwd=ROOT)
        finally:
            out.close()

    def start_control(self) -> None:
        self.control = self._spawn(["control", "--data-dir", str(self.data), "--nats", self.nats.url,
                                    "--store", str(self.store)], "control.log")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = self.ferry("backup", "--no-wait", "", check=False)  # an empty VM name: answered with an error
            if "no control plane answered" not in r.stderr:
                return
            time.sleep(0.2)
        raise RuntimeError("control plane did not come up: " + (self.base / "control.log").read_text()[-2000:])

    def kill_control(self) -> None:
        assert self.control is not None
        self.control.send_signal(signal.SIGKILL)
        self.control.wait()

    def start_mover(self, workers: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        p = self._spawn(["mover", "--nats", self.nats.url, "--store", str(self.store), "--capability", "imageio",
                         "--capability", "store", "--workers", str(workers or self.workers), *self.mover_args, *extra],
                        f"mover-{len(self.movers)}.log")
        self.movers.append(p)
        return p

    def ferry(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "control.cli", args[0]]
        if args[0] == "engine":
            cmd += [args[1], *args[2:], "--data-dir", str(self.data)]
        else:
            cmd += [*args[1:], "--data-dir", str(self.data), "--nats", self.nats.url, "--store", str(self.store)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ferry {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n"
                                 + self.logs())
        return r

    def ferry_json(self, *args: str, check: bool = True) -> Any:
        r = self.ferry(*args, "--json", check=check)
        return json.loads(r.stdout) if r.stdout.strip() else None

    def logs(self, n: int = 3000) -> str:
        out = []
        for f in sorted(self.base.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(out)

    def close(self) -> None:
        procs = [p for p in [self.control, *self.movers] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                # Movers finish their fetch before exiting; 5 s is plenty for an idle one, then it is killed.
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.nats.stop()
