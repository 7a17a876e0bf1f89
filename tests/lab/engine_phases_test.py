"""The background phases of backups and snapshots (``lab.engine.phases``): due times, waits, failures.

A real engine object that is not serving: its state is set directly and the modules' ``tick`` called by hand,
so each step is seen on its own. It has no storage backend (``None``): only steps that do not reach storage
run here (backups of VMs without disks, failures before any layer is made). The whole lab runs the same
steps with real storage in engine_backups_test and engine_snapshots_test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest

from lab.engine import backups, snapshots
from lab.engine.app import Engine
from lab.engine.backend import Backend
from lab.engine.http import HttpError
from lab.engine.phases import refuse_if_busy, unlocked_disk, vm_child


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    # Certificates are read only by start(), which is never called here.
    e = Engine(tmp_path, cast(Backend, None), tmp_path / "cert", tmp_path / "key", tmp_path / "ca", {})
    e.state.coll("vms")["vm1"] = {"id": "vm1", "name": "web", "status": "down", "attachments": {}}
    e.state.coll("disks")["d1"] = {"id": "d1", "name": "web-disk", "status": "locked"}
    return e


def dirty(e: Engine) -> bool:
    """Whether the last ticks marked the state for saving (and clear the mark)."""
    return bool(e.state.data.pop("_dirty", False))


def events(e: Engine, code: int) -> list[dict[str, Any]]:
    return [ev for ev in e.state.data["events"] if ev["code"] == code]


def new_backup(e: Engine, vm: str = "vm1") -> dict[str, Any]:
    b: dict[str, Any] = {"id": "b1", "vm": vm, "phase": "initializing", "from_checkpoint": None, "to_checkpoint": "cp1",
         "disks": [], "modes": {}, "created": time.time(), "due": time.time() - 1, "exports": {}, "temp": {},
         "job": e.job("Backing up VM web")}
    e.state.coll("backups")["b1"] = b
    return b


def test_backup_phases_keep_their_delays_and_wait_for_transfers(engine: Engine) -> None:
    e = engine
    b = new_backup(e)
    backups.tick(e)
    assert b["phase"] == "starting" and dirty(e)
    # The next step is STEP_DELAY after this one, not before.
    assert b["due"] == pytest.approx(b["modified"] + backups.STEP_DELAY)
    backups.tick(e)
    assert b["phase"] == "starting" and not dirty(e)
    b["due"] = time.time() - 1
    backups.tick(e)
    assert b["phase"] == "ready" and dirty(e)
    assert b["to_checkpoint"] is None  # no disk tracks changes: no checkpoint
    backups.tick(e)  # ready waits for finalize
    assert b["phase"] == "ready" and not dirty(e)

    b.update(phase="finalizing", due=time.time() - 1)
    e.state.coll("transfers")["t1"] = {"id": "t1", "backup": "b1", "phase": "transferring"}
    stamp = b["modified"]
    backups.tick(e)
    # An open transfer of the backup: finalizing waits, and a wait changes nothing (not even the date).
    assert b["phase"] == "finalizing" and b["modified"] == stamp and not dirty(e)
    del e.state.coll("transfers")["t1"]
    backups.tick(e)
    assert b["phase"] == "succeeded" and dirty(e) and b["modified"] > stamp
    assert e.state.coll("jobs")[b["job"]]["status"] == "finished"
    assert len(events(e, 10792)) == 1


def test_backup_step_that_raises_fails_the_backup(engine: Engine) -> None:
    e = engine
    b = new_backup(e, vm="gone")  # _start cannot find the VM: the step raises
    e.state.coll("checkpoints")["cp1"] = {"id": "cp1", "vm": "gone", "disks": []}
    b["phase"] = "starting"
    backups.tick(e)
    assert b["phase"] == "failed" and dirty(e) and "modified" in b
    assert "cp1" not in e.state.coll("checkpoints")  # the new checkpoint is dropped with the failed start
    assert e.state.coll("jobs")[b["job"]]["status"] == "failed"
    (ev,) = events(e, 10791)
    assert ev["severity"] == "error" and "failed" in ev["description"]
    backups.tick(e)  # failed is final
    assert b["phase"] == "failed" and not dirty(e)


def test_snapshot_waits_for_its_due_time_then_a_failed_step_removes_it(engine: Engine) -> None:
    e = engine
    s: dict[str, Any] = {"id": "s1", "vm": "gone", "type": "regular", "description": "nightly", "status": "locked",
         "phase": "creating", "date": time.time(), "disks": {"d1": ""}, "ovf": None,
         "due": time.time() + snapshots.CREATE_DELAY, "job": e.job("Creating VM Snapshot nightly")}
    e.state.coll("snapshots")["s1"] = s
    snapshots.tick(e)
    assert "s1" in e.state.coll("snapshots") and not dirty(e)
    s["due"] = time.time() - 1
    snapshots.tick(e)  # _create cannot find the VM: the snapshot goes, its disks unlocked
    assert "s1" not in e.state.coll("snapshots") and dirty(e)
    assert e.state.coll("disks")["d1"]["status"] == "ok"
    assert e.state.coll("jobs")[s["job"]]["status"] == "failed"
    (ev,) = events(e, 69)
    assert ev["severity"] == "error" and "nightly" in ev["description"]


def test_lookups_and_refusals_worded_as_the_engine(engine: Engine) -> None:
    e = engine
    b = new_backup(e)
    assert vm_child(e, "backups", "vm1", "b1", "Backup") is b
    e.state.coll("vms")["vm2"] = {"id": "vm2", "name": "db", "status": "down", "attachments": {}}
    for vm, oid in (("vm2", "b1"), ("nope", "b1"), ("vm1", "nope")):
        with pytest.raises(HttpError) as err:
            vm_child(e, "backups", vm, oid, "Backup")
        assert err.value.status == 404
    with pytest.raises(HttpError, match="Entity not found: Backup: id=b1"):
        vm_child(e, "backups", "vm2", "b1", "Backup")

    with pytest.raises(HttpError, match=r"^Cannot create Snapshot\. VM web is currently in backup\.$") as err:
        refuse_if_busy(e, "vm1", "create Snapshot")
    assert err.value.status == 409
    refuse_if_busy(e, "vm2", "create Snapshot")  # another VM is free
    b["phase"] = "succeeded"
    refuse_if_busy(e, "vm1", "backup VM")

    with pytest.raises(HttpError, match=r"^Cannot backup VM\. Disk web-disk is locked\.") as err:
        unlocked_disk(e, "d1", "backup VM")
    assert err.value.status == 409
    e.state.coll("disks")["d1"]["status"] = "ok"
    assert unlocked_disk(e, "d1", "backup VM")["id"] == "d1"
