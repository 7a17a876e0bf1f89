"""Test helpers: the real ovirt-imageio daemon (TLS from a throwaway CA) and qemu-nbd behind its tickets.

Imported by the imageio source/sink and worker tests (not a test module itself). Everything started here is
stopped by ``close()``, which the tests' fixtures call even when a test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from lab.pki import CA

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


class QemuNbd:
    """``qemu-nbd`` exporting an image on a unix socket (read-only, optionally with a dirty bitmap)."""

    def __init__(self, image: Path | str, sock: Path, fmt: str | None = "qcow2", read_only: bool = True,
                 bitmap: str | None = None, allocation_depth: bool = False):
        """``fmt=None`` with a ``json:{...}`` image string; ``allocation_depth`` exports qemu:allocation-depth
        (imageio's ``hole`` extents), as vdsm does for transfers."""
        cmd = ["qemu-nbd", "--persistent", "--shared=8", "--cache=none", "--aio=native",
               f"--socket={sock}", "--export-name="]  # fmt: skip
        if fmt:
            cmd.append(f"--format={fmt}")
        if allocation_depth:
            cmd.append("--allocation-depth")
        if read_only:
            cmd.append("--read-only")
        if bitmap:
            cmd += ["-B", bitmap]
        if not read_only:
            cmd.append("--discard=unmap")
        cmd.append(str(image))
        self.sock = sock
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: sock.exists() or self.proc.poll() is not None, what="qemu-nbd socket")
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd failed: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"nbd:unix:{self.sock}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class ImageioDaemon:
    """The real ``ovirt-imageio`` daemon on loopback: TLS data port, TCP control port, tickets."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CA.create(self.dir / "ca")
        cert, key = self.ca.issue("imageio", self.dir / "tls")
        self.ca_pem = self.ca.cert_path.read_text()
        self.port = free_port()
        self.control_port = free_port()
        conf = self.dir / "conf" / "conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        (conf / "daemon.conf").write_text(
            f"""
[daemon]
run_dir = {self.dir / "run"}
drop_privileges = false
systemd_enable = false
poll_interval = 0.1

[tls]
enable = true
key_file = {key}
cert_file = {cert}

[remote]
host = 127.0.0.1
port = {self.port}

[local]
enable = false

[control]
transport = tcp
port = {self.control_port}
remove_timeout = 5

[handlers]
keys = logfile

[handler_logfile]
keyword__class = logging.FileHandler
args = ('{self.dir / "daemon.log"}',)
kwargs = {{}}
level = DEBUG
formatter = long
"""
        )
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ovirt-imageio"), "--conf-dir", str(self.dir / "conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_for(self._ready, timeout=15, what="imageio daemon")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"imageio daemon exited: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
            with socket.create_connection(("127.0.0.1", self.control_port), timeout=0.2):
                return True
        except OSError:
            return False

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def add_ticket(self, url: str, size: int, ops: list[str], dirty: bool = False, timeout: int = 300) -> str:
        """Add a ticket for ``url`` (an nbd: URL); return the transfer URL."""
        ticket = str(uuid.uuid4())
        body = {"uuid": ticket, "size": size, "url": url, "ops": ops, "timeout": timeout, "dirty": dirty,
                "sparse": True, "transfer_id": str(uuid.uuid4())}  # fmt: skip
        self._control("PUT", f"/tickets/{ticket}", body)
        return f"https://127.0.0.1:{self.port}/images/{ticket}"

    def remove_ticket(self, transfer_url: str) -> None:
        self._control("DELETE", "/tickets/" + transfer_url.rsplit("/", 1)[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    subprocess.run([*cmd, str(image)], check=True, capture_output=True)


def make_image(path: Path, size: int, writes: list[tuple[int, int, int]], fmt: str = "qcow2") -> None:
    """Create an image of ``size`` bytes with pattern writes ``(offset, length, byte)``; the rest zeros."""
    qemu_img("create", "-f", fmt, str(path), str(size))
    cmds = [f"write -P {pattern} {offset} {length}" for offset, length, pattern in writes]
    if cmds:
        qemu_io(path, fmt, *cmds)


def raw_content(image: Path, fmt: str = "qcow2") -> bytes:
    """The guest's view of an image (converted to raw in a temp file next to it)."""
    out = image.with_suffix(".content.raw")
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out))  # -U: qemu-nbd may hold it
    try:
        return out.read_bytes()
    finally:
        os.unlink(out)
