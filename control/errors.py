"""Errors of the control plane."""

from __future__ import annotations

from mover.errors import FerryError, NotFound, UsageError

__all__ = ["EngineError", "EngineUnreachable", "AuthError", "FerryError", "NotFound", "UsageError"]


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
