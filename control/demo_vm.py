"""The VM-level demo: the lab, embedded NATS, the control plane and two movers, end to end.

A VM with two disks of realistic data (ext4 filled from real files) is backed up full, the guest writes,
an incremental backup moves only the changed data, the last backup is restored as a new VM, and every
restored disk is compared bit for bit with the original. A table per backup (mode, type, bytes read, sent,
stored, time, rate) is printed, and everything is shut down (``--keep`` keeps the files).

Every Ferry part runs as in production: ``ferry up`` (embedded NATS, control plane, two ``ferry mover``
processes) and the ``ferry engine add``/``backup``/``restore`` commands, as separate processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-size", type=int, default=512, help="MiB per disk (default 512)")
    p.add_argument("--fill", type=float, default=0.5, help="fraction of each disk filled with files")
    p.add_argument("--change", type=float, default=1.0, help="percent of each disk the guest changes")
    p.add_argument("--method", choices=["checkpoint", "snapshot"], default="checkpoint")
    p.add_argument("--dir", help="work directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")


class Demo:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.data = work / "data"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.up_proc: subprocess.Popen[bytes] | None = None
        self.lab: Any = None

    def say(self, text: str) -> None:
        print(f"==> {text}", flush=True)

    def ferry(self, *args: str, json_out: bool = False) -> Any:
        cmd = [sys.executable, "-m", "control.cli", *args, "--data-dir", str(self.data)]
        if json_out:
            cmd.append("--json")
        r = subprocess.run(cmd, env=self.env, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE if json_out else None)
        if r.returncode != 0:
            raise SystemExit(f"demo: `ferry {' '.join(args)}` failed with exit code {r.returncode}")
        return json.loads(r.stdout) if json_out else None

    def start(self) -> None:
        from lab import client as labclient

        self.say("starting the lab (engine, imageio daemons, storage domains)")
        self.lab = labclient.up(self.work / "lab")
        self.say("starting `ferry up`: embedded NATS, the control plane and two movers")
        log = open(self.work / "ferry-up.log", "ab")
        self.up_proc = subprocess.Popen(
            [sys.executable, "-m", "control.cli", "-v", "up", "--data-dir", str(self.data), "--movers", "2"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, cwd=ROOT, start_new_session=True)
        log.close()
        url_file = self.data / "nats" / "url"
        deadline = time.monotonic() + 30
        while not url_file.exists():
            if self.up_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"demo: `ferry up` did not start (see {self.work / 'ferry-up.log'})")
            time.sleep(0.1)
        self.say("adding the engine")
        self.ferry("engine", "add", self.lab.url, "--user", self.lab.user, "--password-file",
                   str(self.lab.status["password_file"]), "--ca-file", self.lab.ca_file)

    def stop(self) -> None:
        if self.up_proc is not None and self.up_proc.poll() is None:
            self.up_proc.send_signal(signal.SIGTERM)
            try:
                self.up_proc.wait(30)
            except subprocess.TimeoutExpired:
                self.up_proc.kill()
                self.up_proc.wait()
        if self.lab is not None:
            from lab import client as labclient

            labclient.down(self.lab.dir)

    def run(self) -> int:
        a = self.args
        size = a.disk_size * MIB
        self.say(f"creating VM demo-vm with two {a.disk_size} MiB qcow2 disks of real files")
        vm = self.lab.create_vm("demo-vm", disks=[
            {"size": size, "format": "cow", "sparse": True, "fill": a.fill, "seed": 1, "backup": "incremental"},
            {"size": size, "format": "cow", "sparse": True, "fill": a.fill, "seed": 2, "backup": "incremental"},
        ], guest_agent=True)
        self.wait_ready()
        self.say("full backup")
        full = self.ferry("backup", "demo-vm", "--mode", "imageio", "--type", "full", "--method", a.method,
                          json_out=True)[0]
        self.say(f"the guest writes {a.change}% of each disk")
        for i in range(2):
            self.lab.write(vm["id"], disk=i, percent=a.change, seed=7 + i)
        self.say("incremental backup")
        incr = self.ferry("backup", "demo-vm", "--mode", "imageio", "--type", "incremental", "--method", a.method,
                          json_out=True)[0]
        self.say("restoring the incremental backup as a new VM demo-vm-restored")
        rst = self.ferry("restore", incr["id"], "--name", "demo-vm-restored", json_out=True)
        self.say("verifying every restored disk bit for bit")
        ok = self.verify(vm, rst)
        print()
        print_table([full, incr])
        print(f"\nrestore: VM {rst.get('vm')} ({rst.get('vm_id')}), {len(rst.get('disks') or {})} disks, "
              f"verification {'IDENTICAL' if ok else 'DIFFERENT'}")
        return 0 if ok else 1

    def wait_ready(self) -> None:
        """Until the control plane answers (``ferry up`` may still be starting its movers)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run([sys.executable, "-m", "control.cli", "backup", "--no-wait", "", "--data-dir",
                                str(self.data)], env=self.env, cwd=ROOT, capture_output=True, text=True)
            if "no control plane answered" not in r.stderr:
                return
            time.sleep(0.2)
        raise SystemExit("demo: the control plane did not answer")

    def verify(self, vm: dict[str, Any], rst: dict[str, Any]) -> bool:
        from control.catalog import Catalog

        cat = Catalog(self.data / "catalog.sqlite")
        try:
            mapping = cat.restore(rst["restore_id"]).stats.get("disks", {})
        finally:
            cat.close()
        ok = True
        for orig in vm["disks"]:
            new = mapping.get(orig)
            if not new:
                print(f"  disk {orig}: not restored")
                ok = False
                continue
            a, b = self.lab.volume_paths(orig)[-1], self.lab.volume_paths(new)[-1]
            r = subprocess.run(["qemu-img", "compare", "-q", a, b], capture_output=True, text=True)
            same = r.returncode == 0
            ok &= same
            print(f"  disk {orig[:8]} -> {new[:8]}: {'identical' if same else 'DIFFERENT ' + r.stdout.strip()}")
        return ok


def print_table(backups: list[dict[str, Any]]) -> None:
    cols = ["backup", "mode", "type", "disk", "read MiB", "sent MiB", "stored MiB", "time s", "MiB/s"]
    rows = []
    for b in backups:
        for d in b["disks"]:
            s = d.get("stats") or {}
            read = float(s.get("read", 0))
            secs = float(s.get("seconds", 0)) or 1e-9
            rows.append([b["id"][:8], f"{b['mode']}/{b['method']}", d["kind"], d["alias"], f"{read / MIB:.1f}",
                         # imageio mode: what was read crossed the network to the mover, once
                         f"{read / MIB:.1f}", f"{float(s.get('stored', 0)) / MIB:.1f}", f"{secs:.2f}",
                         f"{read / MIB / secs:.0f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def cmd(args: argparse.Namespace) -> int:
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ferry-demo-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, args)
    try:
        demo.start()
        return demo.run()
    finally:
        demo.stop()
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ferry demo", description=__doc__.splitlines()[0] if __doc__ else None)
    register_args(p)
    return cmd(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
