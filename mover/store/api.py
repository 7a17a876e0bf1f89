"""The face the store shows to the pipeline, the CLI and the job handlers.

Written down first so the store and its users could be built in parallel; ``mover.store.repo.Store``
implements it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ZERO_ID = b"\0" * 32  # manifest entry of a block that reads as zeros: never hashed, compressed or stored


@dataclass
class BackupInfo:
    """Metadata of one disk backup (one restore point of one disk)."""

    id: str  # assigned by the store when saved
    size: int  # logical size of the disk in bytes
    block_size: int
    created: float  # unix time
    base: str | None = None  # backup this one was taken on top of (informational: manifests are full)
    kind: str = "full"  # "full" | "incremental"
    source: str = ""  # what was read (a path, a disk id); never a secret
    labels: dict[str, Any] = field(default_factory=dict)  # vm, disk, mode, ...; free-form, JSON
    stats: dict[str, Any] = field(default_factory=dict)  # bytes read, stored, zero, duplicate, seconds


class Manifest(Protocol):
    """offset -> block id, one entry per block of the disk; ``ZERO_ID`` for zero blocks.

    Entry i covers bytes [i * block_size, (i + 1) * block_size) (the last may be short).
    """

    block_size: int
    size: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> bytes: ...

    def __setitem__(self, index: int, block_id: bytes) -> None: ...

    def close(self) -> None:
        """Release the manifest (its mapping, and the store lock it holds while a backup is in flight)."""
        ...


class BlockWriter(Protocol):
    """Appends new blocks to this process's pack files. Thread-safe."""

    def known(self, ids: bytes | bytearray | memoryview) -> bytearray:
        """One flag per 32-byte id of ``ids`` (1: in the store, or ``ZERO_ID``), looked up as one batch."""
        ...

    def add(self, block_id: bytes, data: bytes | memoryview, looked_up: bool = False) -> int:
        """Store ``data`` (raw, uncompressed) under ``block_id`` unless the store has it.

        Compresses in the calling thread. Returns the bytes written to the store (0 for a duplicate).
        ``looked_up``: ``known`` already found the id missing from the index.
        """
        ...

    def commit(self) -> None:
        """Make every block added so far durable (finish the pack, fsync, publish its index)."""
        ...

    def abort(self) -> None:
        """Drop what has not been committed."""
        ...


class StoreAPI(Protocol):
    path: str
    block_size: int

    def block_id(self, data: bytes | memoryview) -> bytes:
        """The keyed id of one block."""
        ...

    def block_ids(self, data: bytes | memoryview, zero: bytes | None = None) -> list[bytes]:
        """Ids of consecutive blocks in ``data`` (GIL released); ``ZERO_ID`` where ``zero[i]`` is set."""
        ...

    def has(self, block_id: bytes) -> bool: ...

    def read_block(self, block_id: bytes) -> bytes:
        """Raw (decompressed, verified) content of a block."""
        ...

    def read_into(self, ids: Sequence[bytes], out: memoryview, verify: bool = True) -> list[int]:
        """Blocks ``ids`` (decompressed, verified) into ``out``, block k at ``k * block_size``; their lengths."""
        ...

    def writer(self) -> BlockWriter: ...

    def new_manifest(self, size: int, base: str | None = None) -> Manifest:
        """An all-zero manifest for a disk of ``size`` bytes, or a copy of backup ``base``'s manifest.

        Until it is saved or closed the manifest is a backup in flight: it holds the store's shared lock,
        so no prune drops a block it names (close it on every path, as the pipeline does).
        """
        ...

    def save_backup(self, info: BackupInfo, manifest: Manifest) -> BackupInfo:
        """Write the manifest and metadata atomically; blocks must be committed first. Returns info with id."""
        ...

    def load_manifest(self, backup_id: str) -> Manifest: ...

    def backup(self, backup_id: str) -> BackupInfo: ...

    def backups(self) -> Iterator[BackupInfo]: ...

    def delete_backup(self, backup_id: str) -> None: ...

    def prune(self, wait: float = 60.0) -> dict[str, int]:
        """Drop blocks no backup references; safe while other processes back up. Returns counts.

        Waits up to ``wait`` seconds for backups in flight (``StoreLocked`` after); a second prune at
        the same time fails at once with ``StoreLocked``.
        """
        ...

    def repair(self, wait: float = 60.0) -> dict[str, int]:
        """Rebuild the index of packs that no valid index segment covers. Returns counts."""
        ...

    def check(self, read_data: bool = False) -> dict[str, Any]:
        """Problems found (missing/corrupt blocks, and the backups they break)."""
        ...

    def close(self) -> None: ...
