"""The ``lab`` fixture: one lab per test session, brought up in a tmp dir and down at the end, asserting that
nothing of it is left (no qemu-nbd, nbdfuse, ovirt-imageio or sshd process, loop device or FUSE mount)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import client
from lab.client import Lab


def leftovers(dir: Path) -> list[str]:
    """Processes, loop devices and mounts that still refer to the lab directory."""
    d = f"{dir}/"  # with the slash: lab1 must not match lab10
    out: list[str] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if d in cmd:
            out.append(f"process {p.name}: {cmd[:200]}")
    loops = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                           capture_output=True, text=True, check=False).stdout
    out += [f"loop {line.strip()}" for line in loops.splitlines() if d in line]
    with open("/proc/self/mountinfo") as f:
        out += [f"mount {line.strip()}" for line in f if d in line]
    return out


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    dir = tmp_path_factory.mktemp("lab")
    handle = client.up(dir)
    try:
        yield handle
    finally:
        client.down(dir)
        left = leftovers(dir)
        assert not left, "lab left behind:\n" + "\n".join(left)


@pytest.fixture
def sdk(lab: Lab) -> Iterator[object]:
    """A fresh ovirtsdk4 connection, closed (logged out) after the test."""
    conn = lab.connection()
    try:
        yield conn
    finally:
        conn.close()
