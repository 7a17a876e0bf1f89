"""SDK objects to XML and back, with the SDK's own writers and readers, plus the ``<link>`` elements
the engine adds so ``connection.follow_link()`` works."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from typing import Any

from ovirtsdk4 import types
from ovirtsdk4.reader import Reader
from ovirtsdk4.writer import Writer

from lab.engine.http import API_PREFIX, HttpError, Reply, Request

# Sub-collections each kind of object links to, as the engine lists them under <link rel=...>.
LINKS: dict[str, tuple[str, ...]] = {
    "vm": ("diskattachments", "snapshots", "backups", "checkpoints", "nics"),
    "snapshot": ("disks",),
    "disk": ("disksnapshots",),
    "backup": ("disks",),
    "checkpoint": ("disks",),
    "storage_domain": ("disks", "disksnapshots"),
}


def href(*parts: str) -> str:
    return "/".join((API_PREFIX, *parts))


def ts(t: float | None) -> datetime.datetime | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def _linked(text: str, tags: Iterable[str]) -> str:
    for tag in tags:
        rels = LINKS.get(tag)
        if not rels:
            continue

        def add(m: re.Match[str], rels: tuple[str, ...] = rels) -> str:
            base = m.group(2)
            links = "".join(f'<link href="{base}/{r}" rel="{r}"/>' for r in rels)
            return m.group(0) + links

        # Only full elements carrying an href get links; nested references are written without children.
        text = re.sub(rf'(<{tag} href="([^"]+)" id="[^"]+">)', add, text)
    return text


def obj_reply(obj: Any, status: int = 200) -> Reply:
    text = Writer.write(obj)
    text = _linked(text, LINKS)
    return Reply(status, text.encode())


def list_reply(objs: list[Any], root: str) -> Reply:
    text = Writer.write(objs, root=root)
    text = _linked(text, LINKS)
    return Reply(200, text.encode())


def action_reply(**kw: Any) -> Reply:
    return Reply(200, Writer.write(types.Action(status="complete", **kw)).encode())


def fault_reply(e: HttpError) -> Reply:
    if e.status == 401:
        # The engine answers a bad or expired token with an empty 401; the SDK then logs in again.
        return Reply(401, b"", "text/html;charset=UTF-8", {"WWW-Authenticate": 'Bearer realm="oVirt"'})
    detail = e.detail if e.detail.startswith("[") or e.status == 404 else f"[{e.detail}]"
    return Reply(e.status, Writer.write(types.Fault(reason=e.reason, detail=detail)).encode())


def read(req: Request, cls: type | None = None) -> Any:
    """The request body as an SDK object; 400 fault when it is missing or of the wrong type."""
    if not req.body:
        raise HttpError(400, "Request body is missing", "Incomplete parameters")
    try:
        obj = Reader.read(req.body.decode())
    except Exception as e:
        raise HttpError(400, f"Cannot parse request body: {e}", "Bad request") from None
    if cls is not None and not isinstance(obj, cls):
        raise HttpError(400, f"Expected {cls.__name__}, got {type(obj).__name__}", "Bad request")
    return obj


def new(cls: Any, href: str | None = None, **kw: Any) -> Any:
    """An SDK object with an ``href`` (the types take it as an attribute, not in the constructor)."""
    obj = cls(**kw)
    obj.href = href
    return obj


def ref(cls: Any, id: str | None, *path: str) -> Any:
    """A nested reference (id and href, no content), or None."""
    if id is None:
        return None
    return new(cls, href(*path, id) if path else None, id=id)
