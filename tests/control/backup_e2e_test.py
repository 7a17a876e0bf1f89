"""End to end over the real pieces: lab engine and imageio daemons, NATS, ``ferry control`` and two
``ferry mover`` processes, driven by the ``ferry`` CLI. Full, incremental and restore with both methods,
every restored disk compared bit for bit, and nothing left on the engine afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from control.engine import EngineClient
from control.flows.backup import SHALLOW_LAYER_READS
from lab.client import Lab
from lab.plane import ROOT
from tests.control.plane import Plane

MIB = 2**20


def make_vm(lab: Lab, name: str, agent: bool = True, small: bool = False) -> dict[str, Any]:
    if small:
        return lab.create_vm(name, guest_agent=agent, disks=[
            {"size": 16 * MIB, "format": "cow", "sparse": True, "fill": 0.3, "seed": 3, "backup": "incremental"}])
    return lab.create_vm(name, guest_agent=agent, disks=[
        {"size": 64 * MIB, "format": "cow", "sparse": True, "fill": 0.4, "seed": 1, "backup": "incremental"},
        {"size": 32 * MIB, "format": "cow", "sparse": True, "fill": 0.3, "seed": 2, "backup": "incremental"},
    ])


def snapshot_raw(lab: Lab, disk: str, dest: Path) -> Path:
    """The disk's current guest-visible content, as a raw file (to compare a later restore with)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", lab.volume_paths(disk)[-1], str(dest)], check=True)
    return dest


def same(a: str | Path, b: str | Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def backup(plane: Plane, vm: str, *args: str) -> dict[str, Any]:
    (b,) = plane.ferry_json("backup", vm, *args)
    assert b["state"] == "succeeded", b
    return b


def assert_nothing_left(lab: Lab, vm_id: str, method: str, point: str) -> None:
    """No transfer or VM backup still open, and only the point kept for the next incremental."""
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        open_transfers = [t for t in c.transfers() if not t.phase.value.startswith(("finished", "cancelled"))]
        assert open_transfers == []
        backups = c.call("list", lambda: c.vm_service(vm_id).backups_service().list())
        assert [b.phase.value for b in backups if b.phase.value not in ("succeeded", "failed")] == []
        if method == "checkpoint":
            assert [cp.id for cp in c.checkpoints(vm_id)] == [point]
        else:
            ferry_snaps = [s.id for s in c.snapshots(vm_id) if (s.description or "").startswith("ferry backup")]
            assert ferry_snaps == [point]


@pytest.mark.parametrize("method", ["checkpoint", "snapshot"])
def test_full_incremental_restore(plane: Plane, lab: Lab, tmp_path: Path, method: str) -> None:
    vm = make_vm(lab, f"web-{method}")
    name, disks = vm["name"], vm["disks"]

    full = backup(plane, name, "--type", "full", "--method", method)
    assert full["method"] == method
    assert sorted(d["kind"] for d in full["disks"]) == ["full", "full"]
    # The two movers (one job at a time each) shared the two disk jobs of the backup.
    assert len({d["stats"]["mover"] for d in full["disks"]}) == 2
    at_full = {d: snapshot_raw(lab, d, tmp_path / f"{d}.raw") for d in disks}

    lab.write(vm["id"], disk=0, percent=2, seed=11)
    incr = backup(plane, name, "--type", "incremental", "--method", method)
    kinds = {d["disk_id"]: d["kind"] for d in incr["disks"]}
    assert kinds == {disks[0]: "incremental", disks[1]: "incremental"}
    by_disk = {d["disk_id"]: d["stats"] for d in incr["disks"]}
    if method == "checkpoint" or SHALLOW_LAYER_READS:
        # Only changed data moved (dirty extents of the checkpoint, or the clusters of the one qcow2 layer
        # added since the last snapshot): the 2% written, rounded up to blocks, nothing of the untouched disk.
        assert 0 < by_disk[disks[0]]["read"] < 0.15 * 64 * MIB
        assert by_disk[disks[1]]["read"] == 0
    # Whatever was read, only changed blocks were stored.
    assert by_disk[disks[0]]["stored"] < 0.15 * 64 * MIB
    assert by_disk[disks[1]]["stored"] == 0
    assert_nothing_left(lab, vm["id"], method, incr["point_id"])

    # The latest point, as a new VM: every disk bit for bit.
    r = plane.ferry_json("restore", incr["id"], "--name", f"{name}-restored")
    assert r["state"] == "succeeded", r
    new = plane.restored_disks(r["restore_id"])
    assert set(new) == set(disks)
    for d in disks:
        assert same(lab.volume_paths(d)[-1], lab.volume_paths(new[d])[-1]), d
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        rvm = c.find_vm(f"{name}-restored")
        assert rvm.status.value == "down"
        assert sorted(x.id for x in c.vm_disks(rvm.id)) == sorted(new.values())

    # The full backup's point, one disk only: a floating disk equal to the disk at that time.
    r = plane.ferry_json("restore", full["id"], "--disk", disks[0])
    assert r["state"] == "succeeded", r
    new = plane.restored_disks(r["restore_id"])
    assert list(new) == [disks[0]]
    assert same(at_full[disks[0]], lab.volume_paths(new[disks[0]])[-1])
    assert not same(at_full[disks[0]], lab.volume_paths(disks[0])[-1])  # the guest did change it since


def test_listing_and_inventory(plane: Plane, lab: Lab) -> None:
    vms = plane.ferry_json("vms")
    assert "ferry-proxy" in {v["name"] for v in vms}
    listed = plane.ferry("backups").stdout
    assert "ID" in listed.splitlines()[0]


def test_freeze_thaw_around_the_snapshot_only_with_an_agent(plane: Plane, lab: Lab) -> None:
    vm = make_vm(lab, "web-agent", small=True)
    backup(plane, vm["name"], "--type", "full", "--method", "snapshot")
    ours = [r for r in lab.freeze_log(vm["id"]) if r.get("by") != "engine"]
    snap = [r for r in lab.freeze_log(vm["id"]) if r.get("by") == "engine"]
    assert [r["op"] for r in ours] == ["freeze", "thaw"]
    assert snap and ours[0]["time"] <= snap[0]["time"] <= ours[1]["time"]  # the snapshot inside the freeze

    lab.set_guest_agent(vm["id"], False)
    n = len(lab.freeze_log(vm["id"]))
    backup(plane, vm["name"], "--type", "incremental", "--method", "snapshot")
    assert len(lab.freeze_log(vm["id"])) == n  # no agent: no freeze asked (it would fail)


def test_restore_to_another_domain_started(plane: Plane, lab: Lab) -> None:
    vm = make_vm(lab, "web-move", small=True)
    b = backup(plane, vm["name"], "--type", "full")
    sd = lab.storage_domain("iscsi-data")
    r = plane.ferry_json("restore", b["id"][:8], "--name", "web-moved", "--storage-domain", sd["name"], "--start")
    assert r["state"] == "succeeded", r
    new = plane.restored_disks(r["restore_id"])
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        rvm = c.find_vm("web-moved")
        assert rvm.status.value in ("powering_up", "up")
        (disk,) = c.vm_disks(rvm.id)
        assert disk.storage_domain == sd["id"] and disk.format == "cow" and disk.size == 16 * MIB
    assert same(lab.volume_paths(vm["disks"][0])[-1], lab.volume_paths(new[vm["disks"][0]])[-1])
    from control.catalog import Catalog

    cat = Catalog(plane.data / "catalog.sqlite")
    try:
        st = cat.restore(r["restore_id"]).stats
    finally:
        cat.close()
    assert st["zero"] > 0 and 0 < st["written"] < 16 * MIB  # zeros were not sent, only data was
    # The same name again is refused with one clear line, and leaves nothing behind.
    r2 = plane.ferry("restore", b["id"], "--name", "web-moved", check=False)
    assert r2.returncode != 0 and "exists already" in r2.stderr


def test_catalog_rebuilt_from_the_store(plane: Plane, lab: Lab, tmp_path: Path) -> None:
    vm = make_vm(lab, "web-rebuild", small=True)
    b = backup(plane, vm["name"], "--type", "full")
    fresh = tmp_path / "fresh"

    def ferry_fresh(*args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "control.cli", *args, "--data-dir", str(fresh), "--store",
                            str(plane.store), "--json"], capture_output=True, text=True, env=plane.env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    out = ferry_fresh("catalog", "rebuild")
    assert b["id"] in out["added"] and out["engines_missing"] == [lab.url]
    ferry_fresh("engine", "add", lab.url, "--user", lab.user, "--password-file", str(plane.base / "engine-password"),
                "--ca-file", lab.ca_file)
    assert ferry_fresh("catalog", "rebuild")["added"] == []  # idempotent
    (got,) = ferry_fresh("backups", vm["name"])
    assert got["engine_id"]  # attached to the engine added after the first rebuild
    assert (got["id"], got["state"], got["point_id"], got["method"]) == (b["id"], "succeeded", b["point_id"],
                                                                         b["method"])
    assert [(d["disk_id"], d["store_backup_id"]) for d in got["disks"]] == \
        [(d["disk_id"], d["store_backup_id"]) for d in b["disks"]]


def test_excluded_disk_is_not_backed_up_nor_restored(plane: Plane, lab: Lab) -> None:
    vm = lab.create_vm("web-excl", guest_agent=False, disks=[
        {"size": 16 * MIB, "format": "cow", "sparse": True, "fill": 0.3, "seed": 4, "backup": "incremental"},
        {"size": 8 * MIB, "format": "raw", "sparse": True, "fill": 0.0, "seed": 5}])
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        scratch = next(d for d in c.vm_disks(vm["id"]) if d.id == vm["disks"][1])
    b = backup(plane, vm["name"], "--type", "full", "--exclude", scratch.alias)
    assert [d["disk_id"] for d in b["disks"]] == [vm["disks"][0]]
    assert b["method"] == "checkpoint"  # the excluded raw disk does not force the snapshot method
    r = plane.ferry("backup", vm["name"], "--exclude", "no-such-disk", "--json", check=False)
    assert r.returncode == 7 and "disk no-such-disk of VM web-excl not found" in r.stdout
    r2 = plane.ferry_json("restore", b["id"], "--name", "web-excl-restored")
    assert list(plane.restored_disks(r2["restore_id"])) == [vm["disks"][0]]


def test_pre_and_post_snapshot_commands(plane: Plane, lab: Lab) -> None:
    """Hooks from the control plane's configuration run around the point in time; a failing pre command
    fails the backup with its message, still runs the post command, and leaves no snapshot."""
    ok = make_vm(lab, "web-hooks", small=True)
    b = backup(plane, ok["name"], "--type", "full", "--method", "snapshot")
    lines = plane.hook_log.read_text().splitlines()
    assert lines == [f"pre web-hooks {b['id']}", f"post web-hooks {b['id']}"]

    bad = make_vm(lab, "web-hookfail", small=True)
    r = plane.ferry("backup", bad["name"], "--type", "full", "--method", "snapshot", "--json", check=False)
    (f,) = json.loads(r.stdout)
    assert f["state"] == "failed" and "pre-snapshot command exited 3: database refused to quiesce" in f["error"]
    assert plane.hook_log.read_text().splitlines()[2:] == [f"pre web-hookfail {f['id']}",
                                                           f"post web-hookfail {f['id']}"]
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        assert c.snapshots(bad["id"]) == []
