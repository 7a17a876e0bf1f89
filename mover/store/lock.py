"""Store-wide locks on lock files (``fcntl.flock``), so prune never deletes a block a backup relies on.

Protocol (docs/store-format.md, "Concurrency"): every process that writes blocks or manifests holds a
*shared* lock on ``locks/store`` from its first writer until it closes the store; prune and compaction
hold it *exclusively*, so they run only when no backup is in flight. Prunes serialize on ``locks/prune``
taken without waiting: a second prune fails at once with ``StoreLocked``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

from mover.errors import StoreLocked

log = logging.getLogger(__name__)

LOCK_DIR = "locks"
STORE_LOCK = "store"
PRUNE_LOCK = "prune"
COMPACT_LOCK = "compact"  # one index compaction at a time (writers skip compacting when it is taken)


class FileLock:
    """One flock on one lock file; a separate open file description per instance."""

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_DIR, name)
        self._fd: int | None = None
        self.mode: str | None = None

    def acquire(self, exclusive: bool, timeout: float = 0.0, busy: str = "locked by another process") -> None:
        """Take the lock, waiting up to ``timeout`` seconds; ``StoreLocked`` if it stays busy."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(self._fd, op | fcntl.LOCK_NB)
                self.mode = "exclusive" if exclusive else "shared"
                log.debug("Locked path=%s mode=%s", self.path, self.mode)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLocked(busy, path=self.root) from None
                # polling rather than a blocking flock keeps the wait bounded and interruptible
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def release(self) -> None:
        """Drop the lock (and close the descriptor)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
            self.mode = None

    @property
    def held(self) -> bool:
        return self.mode is not None
