"""Lab faults through the whole system: each ends in a clear one-line error or a fall-back, and nothing is
left on the engine (no open transfer or VM backup, no extra snapshot, the VM unlocked)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control.engine import EngineClient
from control.natsd import free_port
from lab.client import Lab
from tests.control.backup_e2e_test import backup, make_vm
from tests.control.plane import Plane


@pytest.fixture
def faults(lab: Lab) -> Iterator[Lab]:
    lab.clear_faults()
    try:
        yield lab
    finally:
        lab.clear_faults()


def engine_state(lab: Lab, vm_id: str) -> dict[str, Any]:
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        # This VM's transfers only: another test's transfer may still be ending when ``before`` is taken.
        disks = {d.id for d in c.vm_disks(vm_id)}
        return {
            "open_transfers": [t.id for t in c.transfers() if t.disk is not None and t.disk.id in disks
                               and not t.phase.value.startswith(("finished", "cancelled"))],
            "open_backups": [b.id for b in c.call("l", lambda: c.vm_service(vm_id).backups_service().list())
                             if b.phase.value not in ("succeeded", "failed")],
            "snapshots": [s.id for s in c.snapshots(vm_id)],
            "checkpoints": [cp.id for cp in c.checkpoints(vm_id)],
        }


def failed_backup(plane: Plane, *args: str) -> dict[str, Any]:
    r = plane.ferry("backup", *args, "--json", check=False)
    assert r.returncode == 7, r.stderr
    (b,) = json.loads(r.stdout)
    assert b["state"] == "failed"
    return b


def test_snapshot_fails_then_next_backup_works(plane: Plane, faults: Lab) -> None:
    vm = make_vm(faults, "f-snapfail")
    before = engine_state(faults, vm["id"])
    faults.fault("snapshot_fail", 1)
    b = failed_backup(plane, vm["name"], "--type", "full", "--method", "snapshot")
    assert "snapshot" in b["error"] and "\n" not in b["error"]
    assert engine_state(faults, vm["id"]) == before  # the failed snapshot is gone, nothing open
    # The VM lock was released: the next backup runs.
    backup(plane, vm["name"], "--type", "full", "--method", "snapshot")


def test_hung_transfer_is_cancelled_and_backup_finalized(plane: Plane, faults: Lab) -> None:
    vm = make_vm(faults, "f-hang")
    first = backup(plane, vm["name"], "--type", "full", "--method", "checkpoint")
    faults.fault("transfer_hang", "initializing")
    b = failed_backup(plane, vm["name"], "--type", "incremental", "--method", "checkpoint")
    assert "timed out" in b["error"]
    st = engine_state(faults, vm["id"])
    assert st["open_transfers"] == [] and st["open_backups"] == []
    faults.clear_faults()
    # The chain still holds: the next incremental works from the last good checkpoint, and leaves only its own.
    nxt = backup(plane, vm["name"], "--type", "incremental", "--method", "checkpoint")
    assert {d["kind"] for d in nxt["disks"]} == {"incremental"}
    assert engine_state(faults, vm["id"])["checkpoints"] == [nxt["point_id"]]
    assert first["point_id"] != nxt["point_id"]


def test_snapshot_removal_conflicts_are_retried(plane: Plane, faults: Lab) -> None:
    vm = make_vm(faults, "f-409")
    backup(plane, vm["name"], "--type", "full", "--method", "snapshot")
    faults.fault("snapshot_remove_conflict", 2)
    incr = backup(plane, vm["name"], "--type", "incremental", "--method", "snapshot")
    assert engine_state(faults, vm["id"])["snapshots"] == [incr["point_id"]]
    assert faults.faults() == {}  # both 409s were consumed by our retries
    assert not [w for w in incr["stats"]["warnings"] if "could not remove" in w]


def test_broken_checkpoint_falls_back_to_full(plane: Plane, faults: Lab) -> None:
    vm = make_vm(faults, "f-broken")
    full = backup(plane, vm["name"], "--type", "full", "--method", "checkpoint")
    faults.fault("checkpoint_broken", full["point_id"])
    incr = backup(plane, vm["name"], "--type", "incremental", "--method", "checkpoint")
    assert {d["kind"] for d in incr["disks"]} == {"full"}
    # The engine refuses to back up from a checkpoint whose bitmaps are gone: every disk goes full, and says so.
    assert all("failed on the engine" in (d["note"] or "") for d in incr["disks"])
    assert any("failed on the engine" in w for w in incr["stats"]["warnings"])
    assert engine_state(faults, vm["id"])["checkpoints"][-1] == incr["point_id"]
    assert engine_state(faults, vm["id"])["open_backups"] == []


def test_missing_checkpoint_falls_back_to_full(plane: Plane, faults: Lab) -> None:
    vm = make_vm(faults, "f-gone")
    full = backup(plane, vm["name"], "--type", "full", "--method", "checkpoint")
    with EngineClient(faults.url, faults.user, faults.password, faults.ca_file) as c:
        c.remove_checkpoint(vm["id"], full["point_id"])
    incr = backup(plane, vm["name"], "--type", "incremental", "--method", "checkpoint")
    assert {d["kind"] for d in incr["disks"]} == {"full"}
    assert any("gone from the engine" in w for w in incr["stats"]["warnings"])


def test_wrong_password_and_unreachable_engine(plane: Plane, lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("wrong")
    good = plane.base / "engine-password"
    try:
        plane.ferry("engine", "add", lab.url, "--user", lab.user, "--password-file", str(bad), "--ca-file",
                    lab.ca_file, "--no-check")
        r = plane.ferry("backup", "ferry-proxy", "--type", "full", check=False)
        assert r.returncode == 6, r.stderr
        assert "refused the login of admin@internal" in r.stderr and "wrong" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        plane.ferry("engine", "add", lab.url, "--user", lab.user, "--password-file", str(good), "--ca-file",
                    lab.ca_file)
    nowhere = f"https://127.0.0.1:{free_port()}/ovirt-engine/api"
    plane.ferry("engine", "add", nowhere, "--user", lab.user, "--password-file", str(good), "--ca-file",
                lab.ca_file, "--no-check")
    try:
        r = plane.ferry("backup", "ferry-proxy", "--engine", nowhere, check=False)
        assert r.returncode == 6 and "is unreachable" in r.stderr, r.stderr
        # Without --engine, the VM is looked up on every engine: the unreachable one does not get in the way.
        r = plane.ferry("backup", "no-such-vm", check=False)
        assert r.returncode == 5 and "VM no-such-vm not found" in r.stderr, r.stderr
    finally:
        plane.ferry("engine", "remove", nowhere)
    # `engine add` checks the login by default: a wrong password is refused there already.
    r = plane.ferry("engine", "add", lab.url, "--user", lab.user, "--password-file", str(bad), "--ca-file",
                    lab.ca_file, check=False)
    assert r.returncode == 6 and "refused the login" in r.stderr
