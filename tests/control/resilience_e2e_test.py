"""Delivery guarantees through the whole system: a mover killed (SIGKILL) in the middle of an export, and
NATS restarted in the middle of a backup. The backup completes and the restore is bit-identical.

Movers here read at most 6 MiB/s per job so an export lasts seconds (long enough to interrupt), and
redeliver a silent mover's job after 3 s instead of 30."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from control.catalog import Catalog
from lab.client import Lab
from tests.control.backup_e2e_test import make_vm, same
from tests.control.plane import Plane

MIB = 2**20


@pytest.fixture(scope="module")
def slow_plane(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    p = Plane(tmp_path_factory.mktemp("slow"), lab,
              mover_args=("--ack-wait", "3", "--rate-limit", str(6 * MIB), "--backoff", "0.5"))
    try:
        yield p
    finally:
        p.close()


def start_backup(plane: Plane, vm: str, *args: str) -> str:
    (out,) = plane.ferry_json("backup", vm, "--no-wait", *args)
    return str(out["backup_id"])


def wait_backup(plane: Plane, backup_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cat = Catalog(plane.data / "catalog.sqlite")
        try:
            b = cat.backup(backup_id).to_dict()
        except Exception:
            b = {"state": "unknown"}
        finally:
            cat.close()
        if b["state"] in ("succeeded", "failed"):
            return b
        time.sleep(0.3)
    raise AssertionError(f"backup {backup_id} did not finish\n{plane.logs()}")


def mover_running(plane: Plane, backup_id: str, timeout: float = 30) -> int:
    """Index of a mover that has started an export job of ``backup_id``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(len(plane.movers)):
            log = plane.base / f"mover-{i}.log"
            if log.exists() and f"Job start job=exp-{backup_id}" in log.read_text(errors="replace"):
                return i
        time.sleep(0.05)
    raise AssertionError(f"no mover started a job of {backup_id}\n{plane.logs()}")


def restore_and_compare(plane: Plane, lab: Lab, backup_id: str, vm: dict[str, Any]) -> None:
    r = plane.ferry_json("restore", backup_id, "--name", f"{vm['name']}-restored")
    assert r["state"] == "succeeded", r
    new = plane.restored_disks(r["restore_id"])
    for d in vm["disks"]:
        assert same(lab.volume_paths(d)[-1], lab.volume_paths(new[d])[-1]), d


def test_mover_killed_mid_export_job_is_redelivered(slow_plane: Plane, lab: Lab) -> None:
    vm = make_vm(lab, "r-kill")
    bid = start_backup(slow_plane, vm["name"], "--type", "full", "--method", "checkpoint")
    victim = mover_running(slow_plane, bid)
    time.sleep(0.5)  # well inside the export: 10+ MiB at 6 MiB/s
    slow_plane.movers[victim].send_signal(signal.SIGKILL)
    slow_plane.movers[victim].wait()
    b = wait_backup(slow_plane, bid)
    assert b["state"] == "succeeded", json.dumps(b, indent=1) + slow_plane.logs()
    # The killed mover's job ran again, on a live mover.
    assert max(d["stats"]["attempt"] for d in b["disks"]) >= 2
    killed = f"vm:{slow_plane.movers[victim].pid}"
    assert all(d["stats"]["mover"] != killed for d in b["disks"])
    slow_plane.movers[victim] = slow_plane.start_mover()
    restore_and_compare(slow_plane, lab, bid, vm)


def test_nats_restart_mid_backup(slow_plane: Plane, lab: Lab) -> None:
    vm = make_vm(lab, "r-nats")
    bid = start_backup(slow_plane, vm["name"], "--type", "full", "--method", "snapshot")
    mover_running(slow_plane, bid)
    slow_plane.nats.restart()
    b = wait_backup(slow_plane, bid)
    assert b["state"] == "succeeded", json.dumps(b, indent=1) + slow_plane.logs()
    restore_and_compare(slow_plane, lab, bid, vm)


def test_engine_restart_mid_backup(slow_plane: Plane, lab: Lab) -> None:
    """The engine restarts during the export and forgets its SSO tokens: the flow's next calls get a 401,
    the SDK logs in again, and the backup completes (finalize, checkpoint clean-up) as usual."""
    vm = make_vm(lab, "r-engine")
    bid = start_backup(slow_plane, vm["name"], "--type", "full", "--method", "checkpoint")
    mover_running(slow_plane, bid)
    lab.restart_engine(downtime=1.0)
    b = wait_backup(slow_plane, bid)
    assert b["state"] == "succeeded", json.dumps(b, indent=1) + slow_plane.logs()
    restore_and_compare(slow_plane, lab, bid, vm)


def test_control_plane_killed_mid_backup_is_recovered_at_restart(slow_plane: Plane, lab: Lab) -> None:
    """A control plane SIGKILLed in the middle of a backup: the restarted one marks it failed, finalizes the
    VM backup, cancels the open transfers and unlocks the VM; the next backup runs."""
    from tests.control.faults_e2e_test import engine_state

    vm = make_vm(lab, "r-control")
    bid = start_backup(slow_plane, vm["name"], "--type", "full", "--method", "checkpoint")
    mover_running(slow_plane, bid)
    slow_plane.kill_control()
    assert engine_state(lab, vm["id"])["open_backups"] != []  # left open by the dead control plane
    slow_plane.start_control()
    b = wait_backup(slow_plane, bid, timeout=30)
    assert b["state"] == "failed" and "interrupted" in b["error"] and "finalized" in b["error"]
    st = engine_state(lab, vm["id"])
    assert st["open_backups"] == [] and st["open_transfers"] == []
    nxt = start_backup(slow_plane, vm["name"], "--type", "full")
    assert wait_backup(slow_plane, nxt)["state"] == "succeeded"


def test_second_backup_of_a_busy_vm_is_refused(slow_plane: Plane, lab: Lab) -> None:
    vm = make_vm(lab, "r-busy")  # 20+ MiB to read at 6 MiB/s: the first backup runs for seconds
    first = start_backup(slow_plane, vm["name"], "--type", "full")
    mover_running(slow_plane, first)
    second = start_backup(slow_plane, vm["name"], "--type", "full")
    b2 = wait_backup(slow_plane, second)
    assert b2["state"] == "failed" and "is busy" in b2["error"] and first in b2["error"]
    assert wait_backup(slow_plane, first)["state"] == "succeeded"
