"""The catalog: engines, VMs, backups, disk backups, restores and the point kept for the next incremental.

SQLite by default (one file in the data directory, WAL so the CLI can read while the control plane writes).
Engine passwords are never in the database: each engine row names a password file readable only by its
owner. The catalog is an index; the store stays self-describing (see ``control.vmmeta``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from control.errors import NotFound, UsageError

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS engines (
    id TEXT PRIMARY KEY, url TEXT NOT NULL UNIQUE, user TEXT NOT NULL, ca_file TEXT,
    password_file TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY, engine_id TEXT NOT NULL, name TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS backups (
    id TEXT PRIMARY KEY, engine_id TEXT NOT NULL, vm_id TEXT NOT NULL, vm_name TEXT NOT NULL,
    mode TEXT NOT NULL, method TEXT NOT NULL, type TEXT NOT NULL, state TEXT NOT NULL,
    started REAL NOT NULL, finished REAL, error TEXT, point_id TEXT, store TEXT NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}', engine_ref TEXT);
CREATE INDEX IF NOT EXISTS backups_vm ON backups (vm_id, started);
CREATE TABLE IF NOT EXISTS disk_backups (
    backup_id TEXT NOT NULL, disk_id TEXT NOT NULL, alias TEXT NOT NULL, format TEXT NOT NULL,
    size INTEGER NOT NULL, kind TEXT NOT NULL, store_backup_id TEXT, state TEXT NOT NULL,
    note TEXT, stats TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (backup_id, disk_id));
CREATE TABLE IF NOT EXISTS chains (
    vm_id TEXT NOT NULL, method TEXT NOT NULL, point_id TEXT NOT NULL, backup_id TEXT NOT NULL,
    PRIMARY KEY (vm_id, method));
CREATE TABLE IF NOT EXISTS locks (
    vm_id TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS restores (
    id TEXT PRIMARY KEY, backup_id TEXT NOT NULL, vm_id TEXT, vm_name TEXT NOT NULL, state TEXT NOT NULL,
    started REAL NOT NULL, finished REAL, error TEXT, stats TEXT NOT NULL DEFAULT '{}');
"""


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Engine:
    id: str
    url: str
    user: str
    ca_file: str | None
    password_file: str
    created: float = 0.0

    def password(self) -> str:
        try:
            with open(self.password_file) as f:
                return f.read().rstrip("\n")
        except OSError as e:
            raise UsageError(f"cannot read the password file of engine {self.url}: {e.strerror}") from None


@dataclass
class DiskBackup:
    backup_id: str
    disk_id: str
    alias: str
    format: str  # "raw" | "cow" as the engine reports the disk
    size: int  # provisioned size in bytes
    kind: str  # "full" | "incremental"
    store_backup_id: str | None = None
    state: str = "pending"  # pending | running | succeeded | failed
    note: str | None = None  # why a disk fell back to full, for example
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Backup:
    id: str
    engine_id: str
    vm_id: str
    vm_name: str
    mode: str  # imageio | ssh | attach
    method: str  # checkpoint | snapshot
    type: str  # full | incremental (what was asked; a disk may still fall back to full)
    state: str  # see control.flows.backup.State
    started: float
    store: str
    finished: float | None = None
    error: str | None = None
    point_id: str | None = None  # checkpoint or snapshot kept on the engine for the next incremental
    stats: dict[str, Any] = field(default_factory=dict)
    # The engine object this backup made (VM backup or snapshot id), recorded as soon as it exists so that a
    # control plane restarted after a crash can clean it up.
    engine_ref: str | None = None
    disks: list[DiskBackup] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Restore:
    id: str
    backup_id: str
    vm_name: str
    state: str
    started: float
    vm_id: str | None = None
    finished: float | None = None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    """Thread-safe access to the catalog database."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the flows' threads, serialised by a lock: writes are tiny and rare.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # engines

    def add_engine(self, url: str, user: str, password_file: str, ca_file: str | None) -> Engine:
        """Add an engine, or update the one with this URL (same id: its backups stay attached)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM engines WHERE url = ?", (url,)).fetchone()
            if row:
                db.execute("UPDATE engines SET user = ?, ca_file = ?, password_file = ? WHERE id = ?",
                           (user, ca_file, password_file, row["id"]))
                eid = row["id"]
            else:
                eid = new_id()
                db.execute("INSERT INTO engines VALUES (?, ?, ?, ?, ?, ?)",
                           (eid, url, user, ca_file, password_file, time.time()))
        return self.engine(eid)

    def engine(self, id_or_url: str) -> Engine:
        rows = self._all("SELECT * FROM engines WHERE id = ? OR url = ?", (id_or_url, id_or_url))
        if not rows:
            raise NotFound(kind="engine", name=id_or_url)
        return Engine(**dict(rows[0]))

    def engines(self) -> list[Engine]:
        return [Engine(**dict(r)) for r in self._all("SELECT * FROM engines ORDER BY created")]

    def remove_engine(self, id_or_url: str) -> Engine:
        """Forget an engine (its backups stay listed and restorable once it is added again)."""
        e = self.engine(id_or_url)
        with self._tx() as db:
            db.execute("DELETE FROM engines WHERE id = ?", (e.id,))
        return e

    # vms

    def record_vm(self, engine_id: str, vm_id: str, name: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO vms VALUES (?, ?, ?, ?)", (vm_id, engine_id, name, time.time()))

    def vm_id_by_name(self, name: str) -> str | None:
        rows = self._all("SELECT id FROM vms WHERE name = ? ORDER BY updated DESC", (name,))
        return rows[0]["id"] if rows else None

    def vm_name(self, vm_id: str) -> str | None:
        rows = self._all("SELECT name FROM vms WHERE id = ?", (vm_id,))
        return rows[0]["name"] if rows else None

    def engine_of_vm(self, vm: str) -> str | None:
        """Id of the engine the VM (name or id) was last seen on."""
        rows = self._all("SELECT engine_id FROM vms WHERE id = ? OR name = ? ORDER BY updated DESC", (vm, vm))
        return rows[0]["engine_id"] if rows else None

    # locks: one backup or restore at a time per VM, across processes

    def lock_vm(self, vm_id: str, owner: str) -> bool:
        """Take the VM's lock for ``owner``; False if another live owner has it (a dead one's is taken over)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM locks WHERE vm_id = ?", (vm_id,)).fetchone()
            if row and row["owner"] != owner and _alive(row["pid"]):
                return False
            db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", (vm_id, owner, os.getpid(), time.time()))
            return True

    def unlock_vm(self, vm_id: str, owner: str) -> None:
        """Release the lock if ``owner`` holds it; idempotent."""
        with self._tx() as db:
            db.execute("DELETE FROM locks WHERE vm_id = ? AND owner = ?", (vm_id, owner))

    def lock_held_elsewhere(self, vm_id: str, owner: str) -> bool:
        """True if ``owner`` holds the VM's lock in another live process (a control plane still running it)."""
        rows = self._all("SELECT owner, pid FROM locks WHERE vm_id = ?", (vm_id,))
        return bool(rows) and rows[0]["owner"] == owner and rows[0]["pid"] != os.getpid() \
            and _alive(rows[0]["pid"])

    def lock_owner(self, vm_id: str) -> str | None:
        rows = self._all("SELECT owner FROM locks WHERE vm_id = ?", (vm_id,))
        return rows[0]["owner"] if rows else None

    # backups

    def add_backup(self, b: Backup) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO backups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (b.id, b.engine_id, b.vm_id, b.vm_name, b.mode, b.method, b.type, b.state, b.started,
                 b.finished, b.error, b.point_id, b.store, json.dumps(b.stats), b.engine_ref))

    def update_backup(self, backup_id: str, **fields: Any) -> None:
        if not fields:
            return
        if "stats" in fields:
            fields["stats"] = json.dumps(fields["stats"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE backups SET {cols} WHERE id = ?", (*fields.values(), backup_id))

    def put_disk_backup(self, d: DiskBackup) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO disk_backups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.backup_id, d.disk_id, d.alias, d.format, d.size, d.kind, d.store_backup_id, d.state,
                 d.note, json.dumps(d.stats)))

    def backup(self, backup_id: str) -> Backup:
        rows = self._all("SELECT * FROM backups WHERE id = ?", (backup_id,))
        if not rows:
            # Short ids, as the CLI prints them, are accepted when unambiguous.
            rows = self._all("SELECT * FROM backups WHERE id LIKE ?", (backup_id + "%",))
            if len(rows) != 1:
                raise NotFound(kind="backup", name=backup_id)
        return self._backup(rows[0])

    def _backup(self, row: sqlite3.Row) -> Backup:
        d = dict(row)
        d["stats"] = json.loads(d["stats"])
        b = Backup(**d)
        for r in self._all("SELECT * FROM disk_backups WHERE backup_id = ? ORDER BY alias", (b.id,)):
            dd = dict(r)
            dd["stats"] = json.loads(dd["stats"])
            b.disks.append(DiskBackup(**dd))
        return b

    def backups(self, vm: str | None = None) -> list[Backup]:
        if vm:
            rows = self._all("SELECT * FROM backups WHERE vm_id = ? OR vm_name = ? ORDER BY started", (vm, vm))
        else:
            rows = self._all("SELECT * FROM backups ORDER BY started")
        return [self._backup(r) for r in rows]

    def last_disk_backup(self, backup_id: str, disk_id: str) -> DiskBackup | None:
        for d in self.backup(backup_id).disks:
            if d.disk_id == disk_id and d.state == "succeeded" and d.store_backup_id:
                return d
        return None

    def import_backup(self, meta: dict[str, Any], engine_id: str, store: str) -> bool:
        """Add a succeeded backup from its store metadata (``control.vmmeta``); False if already known."""
        known = self._all("SELECT engine_id FROM backups WHERE id = ?", (meta["backup_id"],))
        if known:
            if engine_id and not known[0]["engine_id"]:
                # Indexed before its engine was added: attach it now, so it can be restored.
                self.update_backup(meta["backup_id"], engine_id=engine_id)
                self.record_vm(engine_id, meta["vm"]["id"], meta["vm"]["name"])
            return False
        b = Backup(id=meta["backup_id"], engine_id=engine_id, vm_id=meta["vm"]["id"], vm_name=meta["vm"]["name"],
                   mode=meta["mode"], method=meta["method"], type=meta["type"], state="succeeded",
                   started=float(meta.get("started", meta["created"])), finished=float(meta["created"]),
                   point_id=meta.get("point_id"), store=store, stats=dict(meta.get("stats") or {}))
        self.add_backup(b)
        for d in meta["disks"]:
            self.put_disk_backup(DiskBackup(backup_id=b.id, disk_id=d["disk_id"], alias=d["alias"],
                                            format=d["format"], size=int(d["size"]), kind=d["kind"],
                                            store_backup_id=d["store_backup_id"], state="succeeded",
                                            note=d.get("note")))
        if engine_id:
            self.record_vm(engine_id, b.vm_id, b.vm_name)
        return True

    # the point kept for the next incremental

    def chain(self, vm_id: str, method: str) -> tuple[str, str] | None:
        """(point id, backup id) of the VM's last kept checkpoint or snapshot for ``method``."""
        rows = self._all("SELECT point_id, backup_id FROM chains WHERE vm_id = ? AND method = ?", (vm_id, method))
        return (rows[0]["point_id"], rows[0]["backup_id"]) if rows else None

    def set_chain(self, vm_id: str, method: str, point_id: str, backup_id: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO chains VALUES (?, ?, ?, ?)", (vm_id, method, point_id, backup_id))

    def drop_chain(self, vm_id: str, method: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM chains WHERE vm_id = ? AND method = ?", (vm_id, method))

    # restores

    def add_restore(self, r: Restore) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO restores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (r.id, r.backup_id, r.vm_id, r.vm_name, r.state, r.started, r.finished, r.error,
                        json.dumps(r.stats)))

    def update_restore(self, restore_id: str, **fields: Any) -> None:
        if "stats" in fields:
            fields["stats"] = json.dumps(fields["stats"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE restores SET {cols} WHERE id = ?", (*fields.values(), restore_id))

    def restores_running(self) -> list[Restore]:
        rows = self._all("SELECT id FROM restores WHERE state NOT IN ('succeeded', 'failed')")
        return [self.restore(r["id"]) for r in rows]

    def restore(self, restore_id: str) -> Restore:
        rows = self._all("SELECT * FROM restores WHERE id = ?", (restore_id,))
        if not rows:
            raise NotFound(kind="restore", name=restore_id)
        d = dict(rows[0])
        d["stats"] = json.loads(d["stats"])
        return Restore(**d)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
