"""A hypervisor reached by SSH: a real OpenSSH sshd on 127.0.0.1 with its own host key.

The lab hands out one client key (authorized for the current user, root on a lab machine, as backup tools log
in to oVirt hosts). Sessions get qemu-img, qemu-nbd and nc from the system, and emulated ``lvs`` and
``lvchange`` first on PATH: device-mapper cannot run on this kernel, so block domains are files (see
lab.storage) and these two scripts activate and list them as LVM would. The scripts find the emulated volume
groups under the roots listed in ``<host dir>/lvm-roots`` (``add_lvm_root``), accept ``VG/LV`` and
``<root>/dev/VG/LV`` names, and print what ``lvs --noheadings`` prints.

Volume files keep their lab paths (``<lab dir>/.../<sd>/images/<disk>/<volume>``): the host sees the same
filesystem as the lab, so a backup tool reads exactly the files the lab engine reports.
"""

from __future__ import annotations

import getpass
import logging
import re
import socket
import subprocess
import time
from pathlib import Path

from lab import procs
from lab.errors import LabError

log = logging.getLogger("lab.sshd")

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 10.0
_LISTENING = re.compile(r"Server listening on 127\.0\.0\.1 port (\d+)")

# sshd for a session: the emulated LVM tools first, then the hypervisor's usual PATH.
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LVM_SCRIPT = r'''#!/usr/bin/python3
"""Emulated lvs/lvchange for the Ferry lab (block domains are files: no device-mapper here)."""
import os, sys
from pathlib import Path

HOST_DIR = Path(__file__).resolve().parent.parent


def roots():
    f = HOST_DIR / "lvm-roots"
    return [Path(x) for x in f.read_text().split("\n") if x] if f.exists() else []


def find(name):
    """(root, vg, lv) of 'VG/LV' or '<root>/dev/VG/LV' or '/dev/VG/LV'."""
    parts = name.rstrip("/").split("/")
    vg, lv = (parts[-2], parts[-1]) if len(parts) >= 2 else (parts[0], None)
    for r in roots():
        if (r / "lvm" / vg).is_dir():
            return r, vg, lv
    sys.stderr.write(f"  Volume group \"{vg}\" not found\n")
    sys.exit(5)


def lvs_of(r, vg, lv=None):
    d = r / "lvm" / vg
    names = [lv] if lv else sorted(p.name[:-5] for p in d.glob("*.tags"))
    out = []
    for n in names:
        data = d / n
        if not data.exists():
            sys.stderr.write(f"  Failed to find logical volume \"{vg}/{n}\"\n")
            sys.exit(5)
        active = (r / "dev" / vg / n).is_symlink()
        tags = (d / f"{n}.tags").read_text().strip() if (d / f"{n}.tags").exists() else ""
        out.append({"lv_name": n, "vg_name": vg, "lv_attr": "-wi-a-----" if active else "-wi-------",
                    "lv_size": str(data.stat().st_size), "lv_tags": tags,
                    "lv_path": str(r / "dev" / vg / n), "lv_active": "active" if active else ""})
    return out


def lvs(args):
    fields, sep, headings, names = ["lv_name", "vg_name", "lv_attr", "lv_size"], "  ", True, []
    it = iter(args)
    for a in it:
        if a in ("-o", "--options"):
            fields = [f.strip() for f in next(it).split(",")]
        elif a.startswith("--options="):
            fields = a.split("=", 1)[1].split(",")
        elif a == "--separator":
            sep = next(it)
        elif a == "--noheadings":
            headings = False
        elif a in ("--units", "--select", "-S", "--config"):
            next(it)
        elif a.startswith("-"):
            continue
        else:
            names.append(a)
    rows = []
    if names:
        for n in names:
            r, vg, lv = find(n)
            rows += lvs_of(r, vg, lv)
    else:
        for r in roots():
            for d in sorted((r / "lvm").iterdir()) if (r / "lvm").is_dir() else []:
                rows += lvs_of(r, d.name)
    if headings:
        print(sep.join(f.upper() for f in fields))
    for row in rows:
        print("  " + sep.join(row.get(f, "") for f in fields))


def lvchange(args):
    mode, names = None, []
    it = iter(args)
    for a in it:
        if a in ("-a", "--activate"):
            mode = next(it)
        elif a.startswith("-a") and len(a) > 2:
            mode = a[2:]
        elif a.startswith("--activate="):
            mode = a.split("=", 1)[1]
        elif a in ("--config", "--addtag", "--deltag"):
            next(it)
        elif not a.startswith("-"):
            names.append(a)
    if mode not in ("y", "n", "ay") or not names:
        sys.stderr.write("lvchange (lab): only -ay/-an VG/LV is emulated\n")
        sys.exit(3)
    for n in names:
        r, vg, lv = find(n)
        data = r / "lvm" / vg / lv
        if not data.exists():
            sys.stderr.write(f"  Failed to find logical volume \"{vg}/{lv}\"\n")
            sys.exit(5)
        dev = r / "dev" / vg / lv
        if mode == "n":
            if dev.is_symlink():
                dev.unlink()
        elif not dev.is_symlink():
            dev.parent.mkdir(parents=True, exist_ok=True)
            dev.symlink_to(data)


cmd = os.path.basename(sys.argv[0])
{"lvs": lvs, "lvchange": lvchange}[cmd](sys.argv[1:])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as e:
        raise LabError(f"ssh-keygen failed: {e}") from None


class Sshd:
    """One host's sshd on 127.0.0.1 (port 0: a free port picked at start)."""

    def __init__(self, dir: Path | str, name: str, port: int = 0) -> None:
        self.dir = Path(dir) / name
        self.name = name
        self.port = port
        self.user = getpass.getuser()
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "client_key"
        self.bin_dir = self.dir / "bin"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"

    @property
    def host_key(self) -> str:
        """The host's public key line (``ssh-ed25519 AAAA...``), for known_hosts and asyncssh."""
        return " ".join(self.host_key_path.with_suffix(".pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key}"

    def add_lvm_root(self, root: Path | str) -> None:
        """Make the emulated block domains under ``root`` (lab.storage Domain.root) visible to lvs/lvchange."""
        f = self.dir / "lvm-roots"
        have = f.read_text().split("\n") if f.exists() else []
        if str(root) not in have:
            with open(f, "a") as out:
                out.write(f"{root}\n")

    def _prepare(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        _keygen(self.host_key_path, f"lab-host-{self.name}")
        _keygen(self.client_key, f"lab-client-{self.name}")
        (self.dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.bin_dir.mkdir(exist_ok=True)
        for tool in ("lvs", "lvchange"):
            p = self.bin_dir / tool
            p.write_text(LVM_SCRIPT)
            p.chmod(0o755)
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        conf = self.dir / "sshd_config"
        conf.write_text(f"""\
ListenAddress 127.0.0.1
Port {self.port}
HostKey {self.host_key_path}
PidFile none
AuthorizedKeysFile {self.dir / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# The lab dir lives in a world-readable tmp tree; sshd's ownership checks of it would refuse the key.
StrictModes no
AllowUsers {self.user}
SetEnv PATH={self.bin_dir}:{HOST_PATH}
Subsystem sftp internal-sftp
LogLevel INFO
MaxSessions 64
MaxStartups 64:30:128
""")
        return conf

    def start(self) -> None:
        """Start sshd in the foreground of its own process (``-D``); return once it listens.

        sshd takes no port 0: with ``port=0`` a free port is picked, and picked again if another process
        takes it before sshd binds it.
        """
        if self.proc is not None:
            raise LabError(f"sshd {self.name} already running")
        if self.port:
            self._start()
            return
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._start()
                return
            except LabError as e:
                self.port = 0
                if "Address already in use" not in str(e) or attempt == 4:
                    raise

    def _start(self) -> None:
        conf = self._prepare()
        if procs.reap(self.pid_path, str(conf)):
            log.warning("Ended a stale sshd name=%s", self.name)
        self.log_path.write_text("")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(conf), "-E", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = _LISTENING.search(text)
            if m:
                self.port = int(m.group(1))
                procs.write_pid(self.pid_path, self.proc.pid)
                log.info("Started sshd name=%s port=%d pid=%d", self.name, self.port, self.proc.pid)
                return
            if self.proc.poll() is not None:
                self.proc = None
                lines = text.strip().splitlines()
                if "Address already in use" in text:
                    raise LabError(f"sshd {self.name}: port {self.port}: Address already in use")
                raise LabError(f"sshd {self.name} exited at start: {lines[-1] if lines else 'no log'}")
            time.sleep(0.05)
        self.stop()
        raise LabError(f"sshd {self.name} not listening after {START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """Stop sshd and every session it started; idempotent.

        sshd puts each connection in a session of its own (setsid), so its process group is not enough: the
        descendants are found through /proc before the listener goes.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        procs.terminate([proc.pid, *procs.descendants(proc.pid)])
        proc.wait()
        self.pid_path.unlink(missing_ok=True)
        log.info("Stopped sshd name=%s", self.name)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
