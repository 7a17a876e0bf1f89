"""Small named objects kept in the store beside the backups (VM records with their OVF, for example).

``objects/<kind>/<name>``: opaque bytes, each written atomically (temp, fsync, rename). They make the
store self-describing: the control plane can rebuild its catalog from the store alone.
"""

from __future__ import annotations

import os
import re

from mover.errors import NotFound, StoreError
from mover.store import fsutil

OBJECT_DIR = "objects"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}$")  # no slashes, no leading dot: one file


def _check(root: str, what: str, value: str) -> None:
    if not _NAME.match(value):
        raise StoreError(f"invalid object {what} {value!r}", path=root)


def path(root: str, kind: str, name: str) -> str:
    _check(root, "kind", kind)
    _check(root, "name", name)
    return os.path.join(root, OBJECT_DIR, kind, name)


def put(root: str, kind: str, name: str, data: bytes) -> None:
    """Create or replace object ``kind/name`` atomically."""
    final = path(root, kind, name)
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
    except OSError as e:
        raise fsutil.store_error(e, root, f"cannot create {OBJECT_DIR}/{kind}") from e
    fsutil.write_file(root, final, data)


def get(root: str, kind: str, name: str) -> bytes:
    try:
        with open(path(root, kind, name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(kind=kind, name=name) from None
    except OSError as e:
        raise fsutil.store_error(e, root, f"cannot read {OBJECT_DIR}/{kind}/{name}") from e


def names(root: str, kind: str) -> list[str]:
    """Names of the objects of ``kind``, sorted."""
    _check(root, "kind", kind)
    try:
        return sorted(n for n in os.listdir(os.path.join(root, OBJECT_DIR, kind)) if not n.startswith("."))
    except FileNotFoundError:
        return []


def delete(root: str, kind: str, name: str) -> None:
    p = path(root, kind, name)
    if not os.path.exists(p):
        raise NotFound(kind=kind, name=name)
    try:
        os.unlink(p)
        fsutil.fsync_dir(os.path.dirname(p))
    except OSError as e:
        raise fsutil.store_error(e, root, f"cannot delete {OBJECT_DIR}/{kind}/{name}") from e
