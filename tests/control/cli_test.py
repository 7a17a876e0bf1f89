"""The ``ferry`` entry point: trigger clients start light and exit without the final garbage collections,
yet print their one-line errors and exit codes as before (a real nats-server, no control plane on it)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control import cli
from control.natsd import NatsServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[str]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_backup_as_a_program_prints_its_error_and_code(nats: str, tmp_path: Path) -> None:
    code = ("import sys, control.cli as c; rc = c.main()\n"
            "mods = [m for m in ('ovirtsdk4', 'pycurl', 'rich', 'control.service') if m in sys.modules]\n"
            "print('heavy', mods, 'frozen', __import__('gc').get_freeze_count() > 0, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "backup", "vm1", "--nats", nats, "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "ferry: error: no control plane answered on ferry.trigger.backup" in r.stderr
    # A trigger client: no engine SDK, no flows, no rich; its objects frozen for a quick exit.
    assert "heavy [] frozen True" in r.stderr


def test_in_process_main_does_not_freeze(nats: str, tmp_path: Path) -> None:
    before = gc.get_freeze_count()
    assert cli.main(["backup", "vm1", "--nats", nats, "--data-dir", str(tmp_path)]) == 2
    assert gc.get_freeze_count() == before
