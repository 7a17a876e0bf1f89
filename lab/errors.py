"""Errors of the lab."""

from __future__ import annotations

from mover.errors import FerryError


class LabError(FerryError):
    msg = "lab: {self.reason}"
    exit_code = 7
