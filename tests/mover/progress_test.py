"""Progress counters: thread-safe sums, throttled listeners, a failing listener, the terminal bar."""

from __future__ import annotations

import io
import threading
from typing import Any

from mover.progress import Progress, TerminalBar, human_size


def test_counts_from_threads() -> None:
    p = Progress(total=8 * 1000 * 4096)

    def add() -> None:
        for _ in range(1000):
            p.add(done=4096, read=4096, new=4096)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = p.finish()
    assert snap["done"] == snap["total"] == snap["read"] == snap["new"] == 8 * 1000 * 4096
    assert snap["zero"] == 0 and snap["seconds"] >= 0 and snap["rate"] >= 0


def test_listener_is_throttled_and_gets_the_end() -> None:
    seen: list[dict[str, Any]] = []
    p = Progress(total=100, listener=seen.append, interval=3600)
    for _ in range(100):
        p.add(done=1)
    assert len(seen) == 1  # the first add, then nothing for an hour
    p.finish()
    assert seen[-1]["done"] == 100


def test_failing_listener_does_not_fail_the_transfer() -> None:
    def boom(_: dict[str, Any]) -> None:
        raise RuntimeError("nats is down")

    p = Progress(total=10, listener=boom, interval=0)
    p.add(done=10)
    assert p.finish()["done"] == 10


def test_terminal_bar() -> None:
    quiet = TerminalBar("x", stream=io.StringIO())
    assert not quiet.enabled  # not a terminal: no bar
    out = io.StringIO()
    with TerminalBar("backup disk", stream=out, enabled=True) as bar:
        p = Progress(total=1 << 30, listener=bar.update, interval=0)
        p.add(done=1 << 29, read=1 << 29, zero=1 << 20)
    assert "backup disk" in out.getvalue()
    assert human_size(1536 * 1024) == "1.5 MiB" and human_size(10) == "10 B"
