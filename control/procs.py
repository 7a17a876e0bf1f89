"""Stopping child processes: what ``ferry up`` does with its movers, and the lab's plane with its own."""

from __future__ import annotations

import signal
import subprocess


def stop(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every process still running, wait up to ``timeout`` for each, kill those that did not exit."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            # An idle mover or control plane exits at once; a busy one finishes its fetch first, then is killed.
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
