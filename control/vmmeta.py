"""VM-level backup metadata kept in the store, so the store describes itself.

Each VM backup writes ``<store>/vms/<backup_id>.json``: the VM (id, name, cluster), its OVF, and per disk
its attachment details and the store backup id holding its data. The catalog can be rebuilt from these
files and the store's own disk backups; a restore reads the OVF from here. Written atomically (temp file,
fsync, rename, fsync of the directory), like every write to the store.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from control.errors import NotFound, UsageError
from mover.jobs import store_path

FORMAT = 1
SUBDIR = "vms"


def _dir(store: str) -> Path:
    return Path(store_path(store)) / SUBDIR


def save(store: str, meta: dict[str, Any]) -> Path:
    """Write the metadata of one VM backup (``meta["backup_id"]`` names it) atomically."""
    d = _dir(store)
    d.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"format": FORMAT, **meta}, indent=1, sort_keys=True).encode()
    path = d / f"{meta['backup_id']}.json"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def load(store: str, backup_id: str) -> dict[str, Any]:
    path = _dir(store) / f"{backup_id}.json"
    try:
        with open(path, "rb") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise NotFound(kind="VM backup metadata", name=f"{backup_id} in store {store}") from None
    except ValueError as e:
        raise UsageError(f"VM backup metadata {path} is damaged: {e}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"VM backup metadata {path}: unknown format {meta.get('format')!r}")
    return dict(meta)


def list_ids(store: str) -> list[str]:
    d = _dir(store)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def delete(store: str, backup_id: str) -> None:
    try:
        os.unlink(_dir(store) / f"{backup_id}.json")
    except FileNotFoundError:
        pass
