"""The content-addressed store: fixed-size blocks, keyed ids, zstd-compressed packs, full manifests.

``Store.open(path)`` is the entry point; see ``docs/store-format.md`` for the on-disk format.
"""

from mover.store.api import ZERO_ID, BackupInfo
from mover.store.repo import Store

__all__ = ["ZERO_ID", "BackupInfo", "Store"]
