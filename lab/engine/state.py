"""The engine's model: plain JSON-able dicts per collection, persisted atomically in the lab directory.

A restarted engine reloads this file and carries on: objects in a transient state (locked snapshots,
transfers between phases) carry a ``due`` time that the background worker acts on, so nothing depends on
timers that a restart would lose.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lab.engine.http import HttpError

COLLECTIONS = (
    "datacenters", "clusters", "hosts", "storagedomains", "vms", "disks", "attachments", "snapshots",
    "backups", "checkpoints", "transfers", "jobs", "users",
)


def new_id() -> str:
    return str(uuid.uuid4())


class State:
    """All engine objects, one lock, saved after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.data: dict[str, Any] = {c: {} for c in COLLECTIONS}
        self.data["events"] = []
        self.data["freeze_log"] = []
        self.data["faults"] = {}
        self.data["next_event"] = 1

    @classmethod
    def load(cls, path: Path) -> State:
        st = cls(path)
        if path.exists():
            st.data.update(json.loads(path.read_text()))
        return st

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def coll(self, name: str) -> dict[str, dict[str, Any]]:
        c: dict[str, dict[str, Any]] = self.data[name]
        return c

    def get(self, name: str, id: str, kind: str | None = None) -> dict[str, Any]:
        """The object or a 404 fault, worded as the engine words it."""
        obj = self.data[name].get(id)
        if obj is None:
            raise HttpError(404, f"Entity not found: {kind or name.rstrip('s')}: id={id}", "Operation Failed")
        return obj  # type: ignore[no-any-return]

    def add_event(self, description: str, severity: str = "normal", code: int = 0, **refs: Any) -> dict[str, Any]:
        with self.lock:
            ev = {
                "id": str(self.data["next_event"]),
                "time": time.time(),
                "description": description,
                "severity": severity,
                "code": code,
                "origin": "oVirt",
                **refs,
            }
            self.data["next_event"] += 1
            self.data["events"].append(ev)
            # Keep the log bounded, as the engine's audit log is trimmed.
            del self.data["events"][:-2000]
            return ev
