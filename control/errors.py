"""Errors of the control plane."""

from __future__ import annotations

from mover.errors import FerryError, NotFound, UsageError

__all__ = ["AuthError", "Busy", "EngineConflict", "EngineError", "EngineUnreachable", "FerryError", "FlowError",
           "NotFound", "UsageError"]


class EngineError(FerryError):
    msg = "engine {self.url}: {self.reason}"
    exit_code = 6
    url = ""


class EngineUnreachable(EngineError):
    msg = "engine {self.url} is unreachable: {self.reason}"
    retryable = True


class AuthError(EngineError):
    msg = "engine {self.url} refused the login of {self.user}: {self.reason}"
    user = ""


class EngineConflict(EngineError):
    """The engine refused an action in the current state (HTTP 409); waiting and retrying can help."""

    retryable = True


class FlowError(FerryError):
    """A backup or restore flow failed; ``reason`` says in which step."""

    msg = "{self.kind} {self.name} failed: {self.reason}"
    exit_code = 7
    kind = "backup"
    name = ""


class Busy(FerryError):
    msg = "VM {self.name} is busy: {self.reason}"
    exit_code = 8
    retryable = True
    name = ""
