"""A host's data path: the real ovirt-imageio daemon and the qemu-nbd exports behind its tickets.

On a hypervisor vdsm starts ``qemu-nbd`` on a unix socket for each image transfer and adds a ticket to the
local ``ovirt-imageio`` daemon whose url is ``nbd:unix:<socket>``; clients then read and write
``https://host:54322/images/<ticket>``. The engine's own imageio (the proxy, :54323) gets a ticket with the
same id whose url is the host daemon's https URL. The lab runs exactly these programs: the daemon from the
``ovirt-imageio`` PyPI package with a config directory of its own and TLS from the lab CA, and ``qemu-nbd``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lab import procs
from lab.errors import LabError
from lab.pki import CA

log = logging.getLogger("lab.imageio")

# The daemon imports a lot at start; on a loaded 2-core machine it can take a few seconds.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_LISTENING = re.compile(r"(\w+)\.service listening on \('([^']*)', (\d+)")


def _daemon_command(conf_dir: Path) -> list[str]:
    exe = Path(sys.executable).parent / "ovirt-imageio"
    if exe.exists():
        return [str(exe), "--conf-dir", str(conf_dir)]
    # Same program, when the console script is not beside this interpreter.
    return [sys.executable, "-c", "from ovirt_imageio._internal import server; server.main()",
            "--conf-dir", str(conf_dir)]


def short_socket_dir(prefix: str) -> Path:
    """A new private directory for unix sockets: sun_path holds 107 bytes, pytest's tmp paths can be longer."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class ImageioDaemon:
    """One ``ovirt-imageio`` daemon (a host's :54322, or the engine's proxy :54323) on 127.0.0.1."""

    def __init__(self, dir: Path | str, name: str, ca: CA, port: int = 0, control_port: int = 0) -> None:
        self.dir = Path(dir) / name
        self.name = name
        self.ca = ca
        self.port = port
        self.control_port = control_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_dir = self.dir / "conf"
        self.run_dir = self.dir / "run"
        self.log_path = self.dir / "daemon.log"
        self.pid_path = self.dir / "daemon.pid"

    @property
    def url(self) -> str:
        """Base URL of the images service: ``https://127.0.0.1:PORT``."""
        return f"https://127.0.0.1:{self.port}"

    def transfer_url(self, ticket_id: str) -> str:
        """The URL a client reads and writes for a ticket (the engine's transfer_url/proxy_url)."""
        return f"{self.url}/images/{ticket_id}"

    def _write_config(self) -> None:
        cert, key = self.ca.issue("daemon", self.dir / "pki")
        self.conf_dir.joinpath("conf.d").mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = f"""\
[daemon]
run_dir = {self.run_dir}
drop_privileges = false
systemd_enable = false
max_connections = 8

[tls]
enable = true
key_file = {key}
cert_file = {cert}
ca_file = {self.ca.cert_path}

[backend_http]
# The proxy role: the host daemons it forwards to are signed by the same lab CA.
ca_file = {self.ca.cert_path}
buffer_size = 1048576

# Small buffers: many lab daemons share one small machine (imageio's default is 8 MiB per connection).
[backend_file]
buffer_size = 1048576

[backend_nbd]
buffer_size = 1048576

[remote]
host = 127.0.0.1
port = {self.port}

[local]
enable = false

[control]
transport = tcp
port = {self.control_port}

[logger_root]
level = DEBUG

[handler_logfile]
args = ({str(self.log_path)!r},)
kwargs = {{}}
"""
        (self.conf_dir / "conf.d" / "50-lab.conf").write_text(conf)

    def start(self) -> None:
        """Start the daemon; return when both services listen (ports learnt from its log when 0)."""
        if self.proc is not None:
            raise LabError(f"imageio daemon {self.name} already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        if procs.reap(self.pid_path, str(self.conf_dir)):
            log.warning("Ended a stale imageio daemon name=%s", self.name)
        self._write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.dir / "stderr.log", "ab")
        try:
            self.proc = subprocess.Popen(
                _daemon_command(self.conf_dir), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT
        ports: dict[str, int] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "stderr.log").read_text(errors="replace").strip().splitlines()[-1:]
                self.proc = None
                raise LabError(f"imageio daemon {self.name} exited at start: {' '.join(tail) or 'see its log'}")
            text = self.log_path.read_text(errors="replace")[offset:] if self.log_path.exists() else ""
            for m in _LISTENING.finditer(text):
                ports[m.group(1)] = int(m.group(3))
            if "Ready for requests" in text and "remote" in ports and "control" in ports:
                self.port, self.control_port = ports["remote"], ports["control"]
                procs.write_pid(self.pid_path, self.proc.pid)
                log.info("Started imageio name=%s port=%d control_port=%d pid=%d",
                         self.name, self.port, self.control_port, self.proc.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise LabError(f"imageio daemon {self.name} not ready after {START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.pid_path.unlink(missing_ok=True)
        log.info("Stopped imageio name=%s", self.name)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        if not self.running:
            raise LabError(f"imageio daemon {self.name} is not running")
        con = http.client.HTTPConnection("127.0.0.1", self.control_port, timeout=70)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            con.request(method, path, body=data, headers=headers)
            resp = con.getresponse()
            return resp.status, resp.read()
        except OSError as e:
            raise LabError(f"imageio daemon {self.name} control: {e}") from None
        finally:
            con.close()

    def add_ticket(
        self,
        ticket_id: str,
        size: int,
        url: str,
        ops: list[str] | tuple[str, ...],
        dirty: bool = False,
        timeout: int = 300,
        transfer_id: str | None = None,
        sparse: bool = True,
        inactivity_timeout: int | None = None,
        filename: str | None = None,
    ) -> None:
        """Install a ticket (``PUT /tickets/<id>``): ``url`` is ``nbd:unix:/sock`` or a host's https URL."""
        ticket: dict[str, Any] = {
            "uuid": ticket_id, "size": size, "url": url, "ops": list(ops), "timeout": timeout,
            "sparse": sparse, "dirty": dirty,
        }
        if transfer_id:
            ticket["transfer_id"] = transfer_id
        if inactivity_timeout is not None:
            ticket["inactivity_timeout"] = inactivity_timeout
        if filename:
            ticket["filename"] = filename
        status, body = self._control("PUT", f"/tickets/{ticket_id}", ticket)
        if status != 200:
            raise LabError(f"imageio {self.name}: add ticket {ticket_id[:8]}: {status} {body[:200]!r}")
        log.info("Added ticket daemon=%s ticket=%s... ops=%s dirty=%s", self.name, ticket_id[:8], ops, dirty)

    def ticket(self, ticket_id: str) -> dict[str, Any]:
        """imageio's ticket status: active, connections, idle_time, transferred, expires, ..."""
        status, body = self._control("GET", f"/tickets/{ticket_id}")
        if status == 404:
            raise LabError(f"imageio {self.name}: no ticket {ticket_id[:8]}")
        if status != 200:
            raise LabError(f"imageio {self.name}: get ticket {ticket_id[:8]}: {status} {body[:200]!r}")
        return dict(json.loads(body))

    def extend_ticket(self, ticket_id: str, timeout: int) -> None:
        status, body = self._control("PATCH", f"/tickets/{ticket_id}", {"timeout": timeout})
        if status != 200:
            raise LabError(f"imageio {self.name}: extend ticket {ticket_id[:8]}: {status} {body[:200]!r}")

    def remove_ticket(self, ticket_id: str) -> None:
        """Remove a ticket; ongoing operations are cancelled (409 from imageio when they do not end in time)."""
        status, body = self._control("DELETE", f"/tickets/{ticket_id}")
        if status not in (200, 204):
            raise LabError(f"imageio {self.name}: remove ticket {ticket_id[:8]}: {status} {body[:200]!r}")
        log.info("Removed ticket daemon=%s ticket=%s...", self.name, ticket_id[:8])


class NbdExport:
    """``qemu-nbd`` exporting an image on a unix socket, as vdsm starts it for an image transfer.

    ``backing=False`` exports one layer only (vdsm's shallow transfer: unallocated clusters read as holes
    through ``--allocation-depth``); ``bitmap`` exports that persistent bitmap as
    ``qemu:dirty-bitmap:<name>`` for imageio's ``/extents?context=dirty``.
    """

    def __init__(
        self,
        image: Path | str,
        fmt: str,
        read_only: bool = True,
        bitmap: str | None = None,
        backing: bool = True,
        socket_path: Path | str | None = None,
    ) -> None:
        self.image = Path(image)
        self.fmt = fmt
        self.read_only = read_only
        self.bitmap = bitmap
        self.backing = backing
        self._own_dir: Path | None = None
        if socket_path is None:
            self._own_dir = short_socket_dir("ferry-nbd-")
            socket_path = self._own_dir / "nbd.sock"
        self.socket = Path(socket_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The backend URL for an imageio ticket."""
        return f"nbd:unix:{self.socket}"

    def _command(self) -> list[str]:
        cmd = ["qemu-nbd", "--socket", str(self.socket), "--persistent", "--shared=8", "--export-name=",
               "--allocation-depth"]
        if self.read_only:
            cmd.append("--read-only")
        else:
            cmd += ["--discard=unmap", "--detect-zeroes=unmap"]
        if self.bitmap:
            cmd += ["--bitmap", self.bitmap]
        if self.fmt == "qcow2" and not self.backing:
            spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(self.image.absolute())},
                    "backing": None}
            cmd.append("json:" + json.dumps(spec))
        else:
            cmd += ["--format", self.fmt, str(self.image)]
        return cmd

    def start(self) -> None:
        err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, start_new_session=True)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err.seek(0)
                    lines = err.read().decode(errors="replace").strip().splitlines()
                    self.proc = None
                    self._cleanup()
                    raise LabError(f"qemu-nbd {self.image.name}: {lines[-1] if lines else 'exited'}")
                if self.socket.exists() and self._greets(deadline):
                    log.debug("Started qemu-nbd image=%s socket=%s", self.image, self.socket)
                    return
                time.sleep(0.02)
            self.stop()
            raise LabError(f"qemu-nbd {self.image.name}: socket not ready after 10s")
        finally:
            err.close()

    def _greets(self, deadline: float) -> bool:
        """True when qemu-nbd sends its NBD greeting.

        qemu-nbd listens before it opens the image, so a socket that accepts connections proves nothing:
        a missing or corrupt image makes it exit after that. Its greeting comes only once the image is open.
        """
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(str(self.socket))
                return s.recv(8) == b"NBDMAGIC"
            except OSError:
                return False

    def stop(self) -> None:
        """Stop qemu-nbd and remove its socket; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> NbdExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
