"""Open pack files for reading, shared by threads, bounded in number.

A descriptor is closed only when no thread is using it: closing one another thread is about to
``pread`` would make that read fail (EBADF), or worse read another file that reused the number.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from mover.store import pack

MAX_OPEN_PACKS = 64  # restores read packs roughly in order, so a few dozen cover the working set
# An open descriptor of a pack that prune deleted keeps its disk space allocated: look for such packs
# this often (one stat per open pack), and whenever the store re-lists its index.
SWEEP_INTERVAL = 30.0


class _Handle:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class PackFiles:
    """An LRU of read-only pack descriptors with per-use reference counts."""

    def __init__(self, root: str, limit: int = MAX_OPEN_PACKS) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Handle] = OrderedDict()
        self._swept = time.monotonic()

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[int]:
        """A descriptor of pack ``name`` for the duration of the block (``FileNotFoundError`` if gone)."""
        if time.monotonic() - self._swept > SWEEP_INTERVAL:
            self.sweep()
        with self._lock:
            h = self._open.get(name)
            if h is None:
                h = _Handle(os.open(pack.pack_path(self.root, name), os.O_RDONLY))
                self._open[name] = h
                while len(self._open) > self.limit:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        os.close(old.fd)
            else:
                self._open.move_to_end(name)
            h.users += 1
        try:
            yield h.fd
        finally:
            with self._lock:
                h.users -= 1
                if h.evicted and h.users == 0:
                    os.close(h.fd)

    def _drop(self, name: str) -> None:
        h = self._open.pop(name)
        h.evicted = True
        if h.users == 0:
            os.close(h.fd)

    def sweep(self) -> int:
        """Close the descriptors of packs that no longer exist (so their space is freed); returns how many."""
        with self._lock:
            self._swept = time.monotonic()
            gone = [n for n in self._open if not os.path.exists(pack.pack_path(self.root, n))]
            for name in gone:
                self._drop(name)
        return len(gone)

    def close(self) -> None:
        """Close every descriptor not in use (those in use close when their user is done)."""
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            for h in handles:
                h.evicted = True
                if h.users == 0:
                    os.close(h.fd)
