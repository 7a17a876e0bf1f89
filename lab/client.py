"""A Python API to a running lab, for tests, benchmarks and the demo.

Reads ``DIR/lab.json`` (written by the lab process) and talks to the lab-only endpoints under
``/ovirt-engine/lab/`` with the lab CA; engine objects themselves are reached with the real ``ovirtsdk4``.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lab.errors import LabError

UP_TIMEOUT = 60.0
DOWN_TIMEOUT = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own unreaped child) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def up(dir: Path | str, timeout: float = UP_TIMEOUT) -> Lab:
    """Start a lab process in ``dir`` (detached) and return once it serves; LabError with its reason if not."""
    d = Path(dir).absolute()
    d.mkdir(parents=True, exist_ok=True)
    from lab.daemon import lock

    lock(d).close()  # a clear error now if a lab runs here; the child takes the lock for good
    (d / "lab.json").unlink(missing_ok=True)
    log = open(d / "lab.log", "ab")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.daemon", "--dir", str(d)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env, cwd=root,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _read(d)
        if st and st.get("pid") == proc.pid:
            return Lab(d)
        if proc.poll() is not None:
            raise LabError(f"lab process exited: {_last_error(d)}")
        time.sleep(0.05)
    proc.terminate()
    raise LabError(f"lab not ready after {timeout:.0f}s (see {d / 'lab.log'})")


def down(dir: Path | str, timeout: float = DOWN_TIMEOUT) -> bool:
    """Stop the lab running in ``dir``; False when none was running."""
    d = Path(dir).absolute()
    pid = _pid(d)
    if pid is None or not _alive(pid):
        # A lab killed hard leaves its children (own sessions) behind: clean up after it.
        return cleanup_dead(d)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise LabError(f"lab process {pid} did not stop in {timeout:.0f}s; killed")


def cleanup_dead(d: Path) -> bool:
    """After a lab process died without stopping its parts: detach the proxy VM's devices, end every process
    whose command line names the lab directory (imageio, sshd, qemu-nbd, nbdfuse of this lab only).
    Returns True when something was left."""
    from lab import procs
    from lab.proxyvm import ProxyVM

    found = False
    root = d / "proxyvm"
    if root.is_dir():
        for vm_dir in root.iterdir():
            if (vm_dir / "attachments.json").exists():
                vm = ProxyVM(root, vm_dir.name)
                if vm.attachments():
                    found = True
                    vm.detach_all()
    mine = [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and f"{d}/" in procs.cmdline(int(p.name))]
    if mine:
        found = True
        procs.terminate(mine)
    (d / "lab.json").unlink(missing_ok=True)
    return found


def _pid(d: Path) -> int | None:
    try:
        text = (d / "lab.lock").read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _read(d: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((d / "lab.json").read_text()))
    except (OSError, ValueError):
        return None


def _last_error(d: Path) -> str:
    try:
        lines = (d / "lab.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split("ferry: error: ", 1)[-1]
    return lines[-1] if lines else "no log"


class Lab:
    """A handle on a running lab."""

    def __init__(self, dir: Path | str) -> None:
        self.dir = Path(dir).absolute()
        st = _read(self.dir)
        if st is None or not _alive(int(st.get("pid", 0))):
            raise LabError(f"no lab running in {self.dir} (run 'ferry lab up --dir {self.dir}')")
        self.status: dict[str, Any] = st
        self._ctx = ssl.create_default_context(cafile=st["ca_file"])

    # what a backup tool is given

    @property
    def url(self) -> str:
        return str(self.status["engine_url"])

    @property
    def user(self) -> str:
        return str(self.status["user"])

    @property
    def password(self) -> str:
        return Path(self.status["password_file"]).read_text().strip()

    @property
    def ca_file(self) -> str:
        return str(self.status["ca_file"])

    @property
    def proxy_vm(self) -> str:
        return str(self.status["proxy_vm"])

    @property
    def hosts(self) -> list[dict[str, Any]]:
        return list(self.status["hosts"])

    def connection(self, **kw: Any) -> Any:
        """A real ``ovirtsdk4.Connection`` to the lab engine (the caller closes it)."""
        import ovirtsdk4

        return ovirtsdk4.Connection(url=self.url, username=self.user, password=self.password,
                                    ca_file=self.ca_file, **kw)

    def storage_domain(self, name_or_kind: str = "nfs-data") -> dict[str, Any]:
        for sd in self.status["storage_domains"]:
            if name_or_kind in (sd["name"], sd["kind"], sd["id"]):
                return dict(sd)
        raise LabError(f"no storage domain {name_or_kind}")

    # lab-only calls

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
        base = self.url.replace("/ovirt-engine/api", "/ovirt-engine/lab/")
        data = json.dumps(body or {}).encode() if body is not None or method != "GET" else None
        req = urllib.request.Request(base + path.lstrip("/"), data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise LabError(f"lab {method} {path}: {e.code} {_detail(e.read())}") from None
        except (urllib.error.URLError, OSError) as e:
            raise LabError(f"lab {method} {path}: {e}") from None
        return json.loads(text) if text else None

    def create_vm(self, name: str, disks: list[dict[str, Any]] | None = None, start: bool = True,
                  guest_agent: bool = True, **kw: Any) -> dict[str, Any]:
        """A VM with disks holding realistic data; each disk spec: size, format (cow|raw), sparse,
        storage_domain (name), fill (0..1 of the size written as an ext4 of real files), seed, backup
        (incremental|none). Returns {"id", "name", "disks": [ids]}."""
        return dict(self.call("POST", "vms", {"name": name, "disks": disks or [{"size": 64 * 2**20}],
                                              "start": start, "guest_agent": guest_agent, **kw}, timeout=3600))

    def write(self, vm: str, disk: int | str = 0, percent: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
        """The guest writes ``percent`` % of a disk at random 64 KiB clusters; returns the changed extents."""
        return list(self.call("POST", f"vms/{vm}/write", {"disk": disk, "percent": percent, "seed": seed}))

    def set_guest_agent(self, vm: str, running: bool) -> None:
        """Start or stop the VM's guest agent (freeze/thaw need it; the engine skips them without it)."""
        self.call("PUT", f"vms/{vm}", {"guest_agent": running})

    def fault(self, name: str, value: Any = True) -> None:
        """Set a fault: snapshot_fail, snapshot_remove_conflict (N), transfer_hang (phase), host_down (host),
        checkpoint_broken (checkpoint id), engine_restart (downtime seconds)."""
        self.call("POST", "faults", {"name": name, "value": value})

    def clear_faults(self) -> None:
        self.call("DELETE", "faults")

    def faults(self) -> dict[str, Any]:
        return dict(self.call("GET", "faults"))

    def freeze_log(self, vm: str | None = None) -> list[dict[str, Any]]:
        """Freeze/thaw records with timestamps, oldest first."""
        log = list(self.call("GET", "freezelog"))
        return [r for r in log if vm is None or r["vm"] == vm]

    def volume_paths(self, disk: str, host: bool = False) -> list[str]:
        """The disk's chain as volume file paths, base first; ``host=True``: the paths under the lab's
        /rhev/data-center stand-in (``status["rhev_root"]``), as a host reaches them."""
        return list(self.call("GET", f"disks/{disk}/chain" + ("?host=true" if host else "")))

    def restart_engine(self, downtime: float = 1.0) -> None:
        """Restart the engine (state kept); returns once it serves again."""
        self.call("POST", "faults", {"name": "engine_restart", "value": downtime})
        deadline = time.monotonic() + downtime + 30
        time.sleep(downtime)
        while time.monotonic() < deadline:
            try:
                self.call("GET", "faults", timeout=2)
                return
            except LabError:
                time.sleep(0.1)
        raise LabError("engine did not come back after restart")


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body).get("detail", body[:200]))
    except ValueError:
        return body[:200].decode(errors="replace")
