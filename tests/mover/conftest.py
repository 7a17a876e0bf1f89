"""Fixtures shared by the store tests (a module may define its own ``store`` with other sizes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mover.store import Store

STORE_BLOCK = 64 * 1024  # small blocks and packs: several packs fill from a few MiB of test data


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store of 64 KiB blocks and 1 MiB packs, closed afterwards."""
    s = Store.init(str(tmp_path / "store"), block_size=STORE_BLOCK, pack_size=1 << 20)
    yield s
    s.close()
