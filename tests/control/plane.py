"""The whole system for end-to-end tests: ``lab.plane.Plane`` with the tests' configuration.

Short engine waits so a hung transfer fails the flow in seconds, not the production 10 minutes; hooks for the
VMs of the hook tests; movers started at once (two, one worker each, by default) without waiting for them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from lab import client as labclient
from lab import plane


class Plane(plane.Plane):
    """NATS (in-test), ``ferry control`` and ``ferry mover`` processes sharing one data dir and store."""

    def __init__(self, base: Path, lab: labclient.Lab, movers: int = 2, workers: int = 1,
                 mover_args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.workers = workers
        self.mover_args = mover_args
        # Hooks for the VMs of the hook tests only: each appends to hooks.log what ran, for which backup.
        self.hook_log = base / "hooks.log"
        log = f'echo "$FERRY_HOOK $FERRY_VM $FERRY_BACKUP_ID" >> {self.hook_log}'
        hooks = {"web-hooks": {"pre": log, "post": log},
                 "web-hookfail": {"pre": f"{log}; echo database refused to quiesce >&2; exit 3", "post": log}}
        # Movers finish their fetch before exiting; 5 s is plenty for an idle one, then it is killed.
        super().__init__(base, lab.url, lab.user, lab.password, lab.ca_file,
                         config={"engine_timeout": 8, "job_timeout": 300, "hooks": hooks},
                         ready_timeout=20, command_timeout=300, stop_timeout=5)
        try:
            for _ in range(movers):
                self.start_mover()
        except BaseException:
            self.close()
            raise

    def start_mover(self, workers: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """One more mover (log ``mover-N.log``, N its index when started), not waited for."""
        return self.spawn_mover("--workers", str(workers or self.workers), *self.mover_args, *extra)

    def failed(self, args: tuple[str, ...], r: subprocess.CompletedProcess[str]) -> Exception:
        # A test failure shows the command's whole output and the logs of every process.
        return AssertionError(f"ferry {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n" + self.logs())

    def ferry_json(self, *args: str, check: bool = True) -> Any:
        """A ``ferry ARGS --json`` command's decoded output (None when it printed nothing)."""
        r = self.ferry(*args, "--json", check=check)
        return json.loads(r.stdout) if r.stdout.strip() else None
