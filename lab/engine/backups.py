"""Placeholder: filled in by the next commit."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.engine.app import Engine


def register(e: Engine) -> None:
    return None
