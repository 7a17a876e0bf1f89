"""The store's config file (format version, block size, hash and compression) and its secret key.

``config.json`` makes the store self-describing; ``key`` (mode 0600) holds the per-store secret that keys
block ids, so a guest cannot forge a block that collides with another VM's.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field

from mover import kernels
from mover.errors import StoreCorrupt, StoreError
from mover.store import fsutil

FORMAT_NAME = "ferry-store"
FORMAT_VERSION = 1  # bump when a reader of the old version could misread the new layout

# Default block size: 256 KiB. Measured on this machine (docs/store-format.md, "Block size"): zstd-1 ratio
# and throughput are within a few % of 1 MiB blocks, while a 1% change scattered over 64 KiB clusters dirties
# 3.9% of 256 KiB blocks against 14.9% of 1 MiB blocks and 47% of 4 MiB blocks.
DEFAULT_BLOCK_SIZE = 256 * 1024
MIN_BLOCK_SIZE = 64 * 1024  # the dirty-bitmap / qcow2 cluster granularity: smaller blocks gain nothing
MAX_BLOCK_SIZE = 4 * 1024 * 1024

# Keyed BLAKE3 measured faster than OpenSSL HMAC-SHA256 (SHA-NI) here; see docs/store-format.md, "Block ids".
DEFAULT_HASH = "blake3-keyed"

# zstd level 1: level 3 stores a few % less but compresses at roughly half the speed (docs, "Compression").
DEFAULT_ZSTD_LEVEL = 1

# A writer closes a pack at this size: big enough that a 6 GiB backup makes a few dozen packs and index
# segments, small enough that a crash loses little work and prune rewrites little.
DEFAULT_PACK_SIZE = 128 * 1024 * 1024

CONFIG_FILE = "config.json"
KEY_FILE = "key"


@dataclass
class StoreConfig:
    """What a store was created with; readers follow it, never their own defaults."""

    block_size: int = DEFAULT_BLOCK_SIZE
    hash: str = DEFAULT_HASH
    compression: str = "zstd"
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    pack_size: int = DEFAULT_PACK_SIZE
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def validate(self, path: str) -> None:
        """Refuse values this version cannot work with."""
        if self.format != FORMAT_NAME:
            raise StoreCorrupt(f"{CONFIG_FILE} names format {self.format!r}, not {FORMAT_NAME!r}", path=path)
        if self.version > FORMAT_VERSION:
            raise StoreError(
                f"format version {self.version} is newer than this Ferry supports ({FORMAT_VERSION}); upgrade Ferry",
                path=path,
            )
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise StoreError(
                f"block size {bs} must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]", path=path
            )
        if self.hash not in kernels.HASH_ALGORITHMS:
            raise StoreError(f"unknown block hash {self.hash!r}", path=path)
        if self.compression != "zstd":
            raise StoreError(f"unknown compression {self.compression!r}", path=path)
        if self.pack_size < bs:
            raise StoreError(f"pack size {self.pack_size} smaller than a block", path=path)


def save(root: str, config: StoreConfig) -> None:
    """Create ``config.json`` (``FileExistsError`` if there is one): it makes the directory a store."""
    data = json.dumps(asdict(config), indent=2, sort_keys=True).encode() + b"\n"
    fsutil.write_new(root, os.path.join(root, CONFIG_FILE), data)


def load(root: str) -> StoreConfig:
    """Read and validate ``config.json``."""
    path = os.path.join(root, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"not a Ferry store (no {CONFIG_FILE}); create it with init", path=root) from None
    except (OSError, ValueError) as e:
        raise StoreCorrupt(f"cannot read {CONFIG_FILE}: {e}", path=root) from e
    if not isinstance(raw, dict):
        raise StoreCorrupt(f"{CONFIG_FILE} is not an object", path=root)
    known = set(StoreConfig.__dataclass_fields__)
    try:
        config = StoreConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise StoreCorrupt(f"{CONFIG_FILE}: {e}", path=root) from e
    config.validate(root)
    return config


def new_key(root: str, algorithm: str) -> bytes:
    """Create the store's secret key file (0600; ``FileExistsError`` if there is one) and return the key.

    Never replaced: every block id of the store depends on it.
    """
    key = secrets.token_bytes(kernels.KEY_SIZES[algorithm])
    fsutil.write_new(root, os.path.join(root, KEY_FILE), key.hex().encode() + b"\n", mode=0o600)
    return key


def load_key(root: str, algorithm: str) -> bytes:
    """Read the store's secret key."""
    try:
        with open(os.path.join(root, KEY_FILE), "rb") as f:
            key = bytes.fromhex(f.read().decode().strip())
    except FileNotFoundError:
        raise StoreCorrupt(f"{KEY_FILE} is missing: block ids cannot be computed", path=root) from None
    except (OSError, ValueError) as e:
        raise StoreCorrupt(f"cannot read {KEY_FILE}: {e}", path=root) from e
    if len(key) != kernels.KEY_SIZES[algorithm]:
        raise StoreCorrupt(f"{KEY_FILE} holds {len(key)} bytes, {algorithm} needs {kernels.KEY_SIZES[algorithm]}", path=root)
    return key
