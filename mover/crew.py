"""A crew of threads that stop together: the first failure (or a cancel, or Ctrl-C) stops them all.

Used by the backup pipeline and by restore. Blocking queue operations poll a shared stop flag, so no thread
waits forever on a queue whose other end died; the first error is kept and raised by the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from mover.errors import Cancelled

# Poll period of blocking queue operations, so every thread notices a failure or a cancel promptly.
POLL = 0.1


class Stop(Exception):
    """Raised inside a thread when another thread failed or the caller cancelled."""


class Crew:
    """Threads sharing one stop flag; the first error wins and stops everyone.

    ``cancel``: an event the caller may set from anywhere (a job handler on a cancel message).
    """

    def __init__(self, cancel: threading.Event | None) -> None:
        self.stop = threading.Event()
        self.cancel = cancel
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def fail(self, e: BaseException) -> None:
        """Record ``e`` (unless an earlier error is recorded) and stop every thread."""
        with self._lock:
            if self.error is None:
                self.error = e
        self.stop.set()

    def stopped(self) -> bool:
        """True once the crew must stop (turning a set ``cancel`` event into ``Cancelled``)."""
        if self.cancel is not None and self.cancel.is_set() and not self.stop.is_set():
            self.fail(Cancelled("cancel requested"))
        return self.stop.is_set()

    def spawn(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        """Start ``fn(*args)`` in a daemon thread whose exception stops the crew."""

        def run() -> None:
            try:
                fn(*args)
            except Stop:
                pass
            except BaseException as e:
                self.fail(e)

        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def get(self, q: queue.Queue[Any]) -> Any:
        """``q.get()`` that raises ``Stop`` once the crew stops."""
        while True:
            if self.stopped():
                raise Stop
            try:
                return q.get(timeout=POLL)
            except queue.Empty:
                continue

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        """``q.put(item)`` that raises ``Stop`` once the crew stops."""
        while True:
            if self.stopped():
                raise Stop
            try:
                q.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def join(self) -> None:
        """Wait for every thread; Ctrl-C stops the crew cleanly instead of leaving threads running."""
        for t in self._threads:
            while t.is_alive():
                try:
                    t.join(POLL)
                except KeyboardInterrupt:
                    self.fail(Cancelled("interrupted"))
                self.stopped()
