"""Process helpers for the lab's long-running children: /proc walks, pid files, reaping stale instances.

The lab starts its daemons in sessions of their own, so a lab killed with SIGKILL leaves them running. Each
daemon records its pid; the next start (or ``ferry lab down``) ends a stale instance, recognised by its
command line so that a recycled pid never kills an unrelated process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ")" are safe.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: only its parent can reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def terminate(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        pids = [p for p in pids if alive(p)]
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if alive(p)]
        if not pids:
            return


def write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def reap(pid_file: Path, marker: str) -> bool:
    """End the process recorded in ``pid_file`` (and its descendants) if its command line holds ``marker``.

    Returns True when a stale process was found. The pid file is removed either way.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    pid_file.unlink(missing_ok=True)
    if not alive(pid) or marker not in cmdline(pid):
        return False
    terminate([pid, *descendants(pid)])
    return True
