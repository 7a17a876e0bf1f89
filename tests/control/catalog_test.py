"""The catalog: engines, backups with disks, chains, VM locks (live and dead owners), file modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.catalog import Backup, Catalog, DiskBackup, Restore
from control.errors import NotFound


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


def _backup(cat: Catalog, vm: str = "vm-1", state: str = "succeeded") -> Backup:
    b = Backup(id=f"b-{time.monotonic_ns()}", engine_id="e", vm_id=vm, vm_name="web", mode="imageio",
               method="checkpoint", type="full", state=state, started=time.time(), store="/s")
    cat.add_backup(b)
    return b


def test_engine_add_update_and_file_mode(cat: Catalog, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    e = cat.add_engine("https://e/ovirt-engine/api", "admin@internal", str(pw), "/ca.pem")
    assert cat.engine(e.url).id == e.id
    assert e.password() == "s3cret"
    e2 = cat.add_engine("https://e/ovirt-engine/api", "other@internal", str(pw), None)
    assert e2.id == e.id and e2.user == "other@internal"
    assert len(cat.engines()) == 1
    # The catalog holds no password, and only its owner reads it.
    assert b"s3cret" not in (tmp_path / "catalog.sqlite").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "catalog.sqlite").st_mode) == 0o600
    with pytest.raises(NotFound):
        cat.engine("nope")


def test_backup_with_disks_round_trip_and_prefix(cat: Catalog) -> None:
    b = _backup(cat)
    cat.put_disk_backup(DiskBackup(b.id, "d1", "root", "cow", 1 << 30, "full", "sb-1", "succeeded",
                                   stats={"bytes_read": 5}))
    cat.put_disk_backup(DiskBackup(b.id, "d2", "data", "raw", 1 << 20, "incremental", None, "failed", note="x"))
    cat.update_backup(b.id, state="failed", stats={"stored": 7}, error="boom")
    got = cat.backup(b.id[:10])
    assert got.state == "failed" and got.error == "boom" and got.stats == {"stored": 7}
    assert [(d.alias, d.kind, d.state) for d in got.disks] == [("data", "incremental", "failed"),
                                                                ("root", "full", "succeeded")]
    assert cat.last_disk_backup(b.id, "d1").store_backup_id == "sb-1"  # type: ignore[union-attr]
    assert cat.last_disk_backup(b.id, "d2") is None  # failed disks are no base
    assert [x.id for x in cat.backups("web")] == [b.id]
    with pytest.raises(NotFound):
        cat.backup("zzz")


def test_chain_set_replace_drop(cat: Catalog) -> None:
    assert cat.chain("vm", "checkpoint") is None
    cat.set_chain("vm", "checkpoint", "cp1", "b1")
    cat.set_chain("vm", "checkpoint", "cp2", "b2")
    cat.set_chain("vm", "snapshot", "s1", "b3")
    assert cat.chain("vm", "checkpoint") == ("cp2", "b2")
    assert cat.chain("vm", "snapshot") == ("s1", "b3")
    cat.drop_chain("vm", "checkpoint")
    assert cat.chain("vm", "checkpoint") is None


def test_vm_lock_live_owner_blocks_dead_owner_is_taken_over(cat: Catalog, tmp_path: Path) -> None:
    assert cat.lock_vm("vm", "flow-a")
    assert cat.lock_vm("vm", "flow-a")  # re-entrant for its owner
    assert not cat.lock_vm("vm", "flow-b")  # this process is alive
    cat.unlock_vm("vm", "flow-b")  # not the owner: no effect
    assert cat.lock_owner("vm") == "flow-a"
    cat.unlock_vm("vm", "flow-a")
    assert cat.lock_owner("vm") is None
    # A lock taken by a process that died is stale: the next flow takes it over.
    code = ("import sys; from control.catalog import Catalog; c = Catalog(sys.argv[1]); "
            "assert c.lock_vm('vm2', 'dead-flow')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "catalog.sqlite")], check=True,
                   cwd=Path(__file__).parents[2])
    assert cat.lock_owner("vm2") == "dead-flow"
    assert cat.lock_vm("vm2", "flow-c")
    assert cat.lock_owner("vm2") == "flow-c"


def test_restore_record(cat: Catalog) -> None:
    r = Restore(id="r1", backup_id="b1", vm_name="web-2", state="preparing", started=time.time())
    cat.add_restore(r)
    cat.update_restore("r1", state="succeeded", vm_id="v9", stats={"written": 3})
    got = cat.restore("r1")
    assert (got.state, got.vm_id, got.stats) == ("succeeded", "v9", {"written": 3})
