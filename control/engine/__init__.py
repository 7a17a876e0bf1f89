"""The engine client: the only package that imports ``ovirtsdk4``.

``EngineClient`` is one authenticated connection to one engine (REST API v4), with the calls the flows need:
inventory (``base``), snapshots, VM backups and checkpoints, image transfers, and what restores need. SDK
failures come out as ``control.errors`` (AuthError, EngineUnreachable, NotFound, EngineConflict).
"""

from __future__ import annotations

from control.engine.backups import BackupOps
from control.engine.base import DiskInfo, Transfer, api_url, validate_user
from control.engine.restore import RestoreOps
from control.engine.snapshots import SnapshotOps
from control.engine.transfers import TransferOps

__all__ = ["DiskInfo", "EngineClient", "Transfer", "api_url", "validate_user"]


class EngineClient(SnapshotOps, BackupOps, TransferOps, RestoreOps):
    """Connection + every engine call Ferry makes. Use as a context manager or call ``connect()``."""
