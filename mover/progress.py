"""Progress of a backup or restore: thread-safe counters, listeners, and a terminal progress bar.

The pipeline only counts; who watches is up to the caller: the CLI shows a ``rich`` bar when stderr is a
terminal, a NATS job handler publishes the snapshot as progress messages.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

Listener = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)

# Listeners are called at most this often: a progress bar needs no more, and a NATS publish per buffer
# would cost more than the work it reports.
INTERVAL = 0.5


class Progress:
    """Counters of one transfer. ``total`` is the logical size; the others are bytes.

    ``done`` counts bytes accounted for (read, or skipped as zero or unchanged without reading), so
    ``done / total`` is the fraction finished.
    """

    FIELDS = ("done", "read", "zero", "duplicate", "new", "stored", "unchanged", "written")

    def __init__(self, total: int = 0, listener: Listener | None = None, interval: float = INTERVAL) -> None:
        self.total = total
        self._listeners: list[Listener] = [listener] if listener else []
        self._interval = interval
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self._started = time.monotonic()
        self._last = float("-inf")  # the first add notifies at once

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def start(self, total: int | None = None) -> None:
        """(Re)start the clock, at the moment data starts to move."""
        if total is not None:
            self.total = total
        self._started = time.monotonic()

    def add(self, **counts: int) -> None:
        """Add to counters (``read=..., zero=...``); thread-safe; notifies listeners now and then."""
        now = time.monotonic()
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += v
            due = now - self._last >= self._interval
            if due:
                self._last = now
        if due:
            self._notify()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    def snapshot(self) -> dict[str, Any]:
        """Counters, elapsed seconds and rate (bytes done per second) as plain JSON-able values."""
        with self._lock:
            snap: dict[str, Any] = dict(self._counts)
        secs = self.seconds
        snap["total"] = self.total
        snap["seconds"] = round(secs, 3)
        snap["rate"] = int(snap["done"] / secs) if secs > 0 else 0
        return snap

    def finish(self) -> dict[str, Any]:
        """Tell listeners the final state and return it."""
        self._notify()
        return self.snapshot()

    def _notify(self) -> None:
        if not self._listeners:
            return
        snap = self.snapshot()
        for listener in self._listeners:
            try:
                listener(snap)
            except Exception as e:
                # Reporting progress must never fail the transfer it reports on.
                log.warning("Progress listener failed listener=%r error=%s", listener, e)


class TerminalBar:
    """A ``rich`` progress bar on stderr, only when stderr is a terminal (quiet otherwise).

    Use as a context manager around the transfer; pass ``bar.update`` as the Progress listener.
    """

    def __init__(self, description: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._description = description
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> TerminalBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(file=self._stream, force_terminal=True),  # enabled: draw it
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._description, total=None, detail="")
        return self

    def update(self, snap: dict[str, Any]) -> None:
        """Listener: show bytes done of total, and how much was new, duplicate and zero."""
        if self._bar is None:
            return
        detail = (
            f"new {_human(snap['new'])} dup {_human(snap['duplicate'])} zero {_human(snap['zero'])}"
            if snap.get("read") or snap.get("zero")
            else ""
        )
        self._bar.update(self._task, completed=snap["done"], total=snap["total"] or None, detail=detail)

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_size(n: float) -> str:
    """Bytes as a short human string (``1.5 GiB``)."""
    return _human(n)
