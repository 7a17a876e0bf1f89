"""The proxy VM: disks attached to it appear on this machine as real block devices.

In the disk-attachment mode a backup appliance runs in a VM of the cluster; the engine hot-plugs snapshot
disks into it and they show up as ``/dev/sdX`` with a ``/dev/disk/by-id/`` link named from the disk's serial
(the disk id, cut to 20 characters by virtio). The lab gives the same thing with real kernel devices:
``qemu-nbd`` (started by ``nbdfuse --socket-activation``) exports the image, ``nbdfuse`` presents it as a
file, and ``losetup`` turns that file into ``/dev/loopN``; the by-id link is ``<dir>/by-id/virtio-<serial>``.

Attachments are recorded in ``<dir>/<vm>/attachments.json`` so a restarted lab can still detach them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from lab import procs
from lab.errors import LabError

log = logging.getLogger("lab.proxyvm")

# virtio-blk and virtio-scsi disks carry at most 20 bytes of serial; oVirt uses the disk id.
SERIAL_LEN = 20
READY_TIMEOUT = 15.0


def serial(disk_id: str) -> str:
    """The serial a guest sees for an oVirt disk."""
    return disk_id[:SERIAL_LEN]


def check_host() -> None:
    """LabError with the missing piece when this machine cannot make block devices."""
    for tool in ("nbdfuse", "qemu-nbd", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            raise LabError(f"proxy VM needs {tool} (install libnbd-bin, qemu-utils, util-linux, fuse3)")
    if not os.path.exists("/dev/fuse"):
        raise LabError("proxy VM needs FUSE: /dev/fuse is missing (modprobe fuse, or run the container with it)")
    if not os.path.exists("/dev/loop-control"):
        raise LabError("proxy VM needs loop devices: /dev/loop-control is missing (modprobe loop)")
    if os.geteuid() != 0:
        raise LabError("proxy VM needs root to set up loop devices")


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        raise LabError(f"{cmd[0]} failed: {lines[-1] if lines else p.returncode}")
    return p.stdout.strip()


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class ProxyVM:
    """The lab's backup proxy VM ``vm_id``; its state lives in ``<dir>/<vm_id>``."""

    def __init__(self, dir: Path | str, vm_id: str) -> None:
        self.vm_id = vm_id
        self.dir = Path(dir) / vm_id
        self.by_id = self.dir / "by-id"
        self.state_path = self.dir / "attachments.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.by_id.mkdir(exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, dict[str, Any]]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def attachments(self) -> dict[str, dict[str, Any]]:
        """disk id -> {logical_name, image, fmt, read_only, link}."""
        return self._load()

    def link_path(self, disk_id: str) -> Path:
        return self.by_id / f"virtio-{serial(disk_id)}"

    def attach(self, disk_id: str, image: Path | str, fmt: str, read_only: bool = True) -> str:
        """Hot-plug ``image`` as disk ``disk_id``; return its logical name (``/dev/loopN``)."""
        check_host()
        state = self._load()
        if disk_id in state:
            raise LabError(f"disk {disk_id} is already attached to proxy VM {self.vm_id}")
        image = Path(image)
        if not image.exists():
            raise LabError(f"cannot attach disk {disk_id}: no image {image}")
        mnt = self.dir / f"{disk_id}.nbd"
        pidfile = self.dir / f"{disk_id}.pid"
        mnt.touch()
        pidfile.unlink(missing_ok=True)
        cmd = ["nbdfuse"]
        if read_only:
            cmd.append("-r")
        cmd += ["-P", str(pidfile), str(mnt), "--socket-activation", "qemu-nbd", "-f", fmt,
                "--cache=writeback", "--discard=unmap"]
        if read_only:
            cmd.append("--read-only")
        cmd.append(str(image))
        errlog = self.dir / f"{disk_id}.log"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        entry: dict[str, Any] = {"image": str(image), "fmt": fmt, "read_only": read_only, "mount": str(mnt),
                                 "nbdfuse_pid": proc.pid, "logical_name": None, "link": None}
        state[disk_id] = entry
        self._save(state)
        self._procs[disk_id] = proc
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not (pidfile.exists() and pidfile.read_text().strip()):
                if proc.poll() is not None:
                    lines = errlog.read_text(errors="replace").strip().splitlines()
                    raise LabError(f"nbdfuse for disk {disk_id} exited: {lines[-1] if lines else proc.returncode}")
                if time.monotonic() > deadline:
                    raise LabError(f"nbdfuse for disk {disk_id} not ready after {READY_TIMEOUT:.0f}s")
                time.sleep(0.02)
            dev = _run(["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(mnt)])
            entry["logical_name"] = dev
            self._save(state)
            link = self.link_path(disk_id)
            link.unlink(missing_ok=True)
            link.symlink_to(dev)
            entry["link"] = str(link)
            self._save(state)
        except BaseException:
            self.detach(disk_id)
            raise
        log.info("Attached vm=%s disk=%s dev=%s read_only=%s", self.vm_id, disk_id, dev, read_only)
        return dev

    def detach(self, disk_id: str) -> None:
        """Hot-unplug: loop device, FUSE mount, nbdfuse and its qemu-nbd all go. Unknown disks are ignored."""
        state = self._load()
        entry = state.get(disk_id)
        if entry is None:
            return
        if entry.get("link"):
            Path(entry["link"]).unlink(missing_ok=True)
        dev = entry.get("logical_name")
        mnt = Path(entry["mount"])
        if dev:
            self._detach_loop(dev, mnt)
        self._unmount(mnt)
        self._stop_nbdfuse(disk_id, int(entry["nbdfuse_pid"]))
        for p in (mnt, self.dir / f"{disk_id}.pid", self.dir / f"{disk_id}.log"):
            p.unlink(missing_ok=True)
        del state[disk_id]
        self._save(state)
        log.info("Detached vm=%s disk=%s dev=%s", self.vm_id, disk_id, dev)

    def detach_all(self) -> None:
        """Detach every disk (lab down, test teardown); keeps going past failures, raises the first one."""
        first: LabError | None = None
        for disk_id in list(self._load()):
            try:
                self.detach(disk_id)
            except LabError as e:
                first = first or e
        if first:
            raise first

    def _detach_loop(self, dev: str, backing: Path) -> None:
        # Only detach a loop device still backed by our file: after a reboot the number may be someone else's.
        out = subprocess.run(["losetup", "--noheadings", "-O", "BACK-FILE", dev], capture_output=True,
                             text=True, check=False).stdout.strip()
        if out and Path(out.split(" (deleted)")[0]) == backing:
            _run(["losetup", "--detach", dev])
        # The kernel releases the backing file asynchronously; the FUSE unmount needs it released.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(["losetup", "--noheadings", "-O", "BACK-FILE", dev], capture_output=True,
                                 text=True, check=False).stdout.strip()
            if not out or Path(out.split(" (deleted)")[0]) != backing:
                return
            time.sleep(0.05)
        raise LabError(f"loop device {dev} still busy after detach")

    def _unmount(self, mnt: Path) -> None:
        deadline = time.monotonic() + 10
        while _mounted(mnt):
            p = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True, check=False)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"cannot unmount {mnt}: {p.stderr.strip()}")
            time.sleep(0.1)

    def _stop_nbdfuse(self, disk_id: str, pid: int) -> None:
        proc = self._procs.pop(disk_id, None)
        deadline = time.monotonic() + 10
        # After the unmount nbdfuse exits by itself and its qemu-nbd with it; signals only for stragglers.
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not procs.alive(pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()
