"""The engine's search language, the small part backup tools use: ``name=x``, ``id=x``, ``status=x``,
wildcards ``*``, clauses joined with ``and``."""

from __future__ import annotations

import fnmatch
import re
from typing import Any


def _value(obj: Any, field: str) -> str | None:
    v = getattr(obj, field, None)
    if v is None and field == "name":
        v = getattr(obj, "alias", None)
    if v is None:
        return None
    return str(getattr(v, "value", v))


def matches(obj: Any, search: str) -> bool:
    """True when the SDK object satisfies every ``field=value`` clause (case-insensitive, ``*`` wildcards)."""
    for clause in re.split(r"\s+and\s+", search.strip(), flags=re.I):
        if not clause:
            continue
        m = re.match(r"^\s*([\w.]+)\s*(!?=)\s*(.*?)\s*$", clause)
        if not m:
            # A bare word searches names, as the engine's free-text search does.
            m2 = _value(obj, "name")
            if m2 is None or not fnmatch.fnmatch(m2.lower(), f"*{clause.strip().lower()}*"):
                return False
            continue
        field, op, want = m.group(1).lower(), m.group(2), m.group(3).strip("'\"")
        got = _value(obj, field)
        ok = got is not None and fnmatch.fnmatch(got.lower(), want.lower())
        if ok == (op == "!="):
            return False
    return True
