"""Errors of the mover layer, and the base class every Ferry error derives from.

Each error carries a message template filled from its attributes (as ovirt-imageio does), an exit code for
the CLI, and whether retrying the same operation can help (``retryable``).
"""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    """Base of all expected Ferry failures: the CLI prints ``str(err)`` as one line and exits ``exit_code``."""

    msg = "{self.reason}"
    exit_code = 1
    retryable = False

    def __init__(self, reason: str = "", **kw: Any) -> None:
        self.reason = reason
        for k, v in kw.items():
            setattr(self, k, v)
        super().__init__(reason)

    def __str__(self) -> str:
        return self.msg.format(self=self)


class UsageError(FerryError):
    """Bad arguments or configuration."""

    exit_code = 2


class SourceError(FerryError):
    """The source of a backup cannot be read."""

    msg = "cannot read source {self.path}: {self.reason}"
    exit_code = 3
    path = ""


class SinkError(FerryError):
    """The destination of a restore cannot be written."""

    msg = "cannot write {self.path}: {self.reason}"
    exit_code = 3
    path = ""


class StoreError(FerryError):
    """The store cannot be used as asked."""

    msg = "store {self.path}: {self.reason}"
    exit_code = 4
    path = ""


class StoreFull(StoreError):
    msg = "store {self.path}: no space left on device ({self.reason})"
    retryable = True


class StoreCorrupt(StoreError):
    msg = "store {self.path} is damaged: {self.reason}"


class StoreLocked(StoreError):
    msg = "store {self.path} is busy: {self.reason}"
    retryable = True


class NotFound(FerryError):
    msg = "{self.kind} {self.name} not found"
    exit_code = 5
    kind = "object"
    name = ""


class Cancelled(FerryError):
    msg = "cancelled: {self.reason}"
    exit_code = 130
