"""The control plane as a process, reached over NATS by the CLI: triggers answer expected failures with one
line and the right exit code; a flow that fails leaves the VM unlocked and says why."""

from __future__ import annotations

import json

from tests.control.plane import Plane


def test_missing_vm_is_one_line_not_found(plane: Plane) -> None:
    r = plane.ferry("backup", "no-such-vm", "--type", "full", check=False)
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip() == "ferry: error: VM no-such-vm not found"


def test_bad_trigger_is_answered(plane: Plane) -> None:
    r = plane.ferry("backup", "", check=False)
    assert r.returncode == 2 and "vm is empty" in r.stderr


def test_vm_without_disks_fails_cleanly(plane: Plane) -> None:
    r = plane.ferry("backup", "ferry-proxy", "--type", "full", "--json", check=False)
    assert r.returncode == 7, r.stderr
    (b,) = json.loads(r.stdout)
    assert b["state"] == "failed"
    assert "has no disk left to back up" in b["error"]
    listed = plane.ferry_json("backups", "ferry-proxy")
    assert [x["id"] for x in listed] == [b["id"]]


def test_restore_of_unknown_backup(plane: Plane) -> None:
    r = plane.ferry("restore", "0000dead", check=False)
    assert r.returncode == 5 and "backup 0000dead not found" in r.stderr
