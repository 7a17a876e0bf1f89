"""``ferry lab up|down|status|write|fault``: the lab on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lab import client
from lab.errors import LabError

DEFAULT_DIR = "ferry-lab"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("lab", help="the simulated oVirt environment (tests, bench, demo)")
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def with_dir(q: argparse.ArgumentParser) -> argparse.ArgumentParser:
        q.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help="lab directory (default ./ferry-lab)")
        return q

    q = with_dir(sub.add_parser("up", help="start a lab in DIR and return when it serves"))
    q.set_defaults(func=_up)
    q = with_dir(sub.add_parser("down", help="stop the lab in DIR (nothing left behind)"))
    q.set_defaults(func=_down)
    q = with_dir(sub.add_parser("status", help="engine URL, credentials, CA, hosts, proxy VM"))
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_status)
    q = with_dir(sub.add_parser("write", help="the guest writes into a VM's disk"))
    q.add_argument("vm", help="VM name or id")
    q.add_argument("--disk", default="0", help="disk index, name or id (default 0)")
    q.add_argument("--percent", type=float, default=1.0, help="percent of the disk to change (default 1)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_write)
    q = with_dir(sub.add_parser("fault", help="inject a fault (or --clear)"))
    q.add_argument("name", nargs="?", help="snapshot_fail | snapshot_remove_conflict | transfer_hang | "
                   "host_down | checkpoint_broken | engine_restart")
    q.add_argument("value", nargs="?", default="true", help="count, phase, host, checkpoint id, seconds")
    q.add_argument("--clear", action="store_true", help="clear all faults")
    q.set_defaults(func=_fault)


def _up(args: argparse.Namespace) -> int:
    lab = client.up(args.dir)
    print(f"lab up: {lab.url} user={lab.user} password-file={lab.status['password_file']} "
          f"ca={lab.ca_file} ({lab.status['startup_seconds']}s)")
    return 0


def _down(args: argparse.Namespace) -> int:
    if not client.down(args.dir):
        raise LabError(f"no lab running in {Path(args.dir).absolute()}")
    print("lab down")
    return 0


def _status(args: argparse.Namespace) -> int:
    lab = client.Lab(args.dir)
    if args.json:
        # The lab's admin password is a throwaway of this lab (not a secret worth hiding from its owner):
        # tests and scripts read it here, as the issue asks, as well as from password_file.
        print(json.dumps({**lab.status, "password": lab.password}, indent=2))
        return 0
    s = lab.status
    print(f"engine    {s['engine_url']}\nuser      {s['user']} (password in {s['password_file']})\n"
          f"ca        {s['ca_file']}\nproxy vm  {s['proxy_vm']}")
    for h in s["hosts"]:
        print(f"host      {h['name']} ssh {h['ssh_user']}@{h['address']}:{h['ssh_port']} key {h['ssh_key']} "
              f"imageio {h['imageio_url']}")
    return 0


def _write(args: argparse.Namespace) -> int:
    lab = client.Lab(args.dir)
    disk: int | str = int(args.disk) if args.disk.isdigit() else args.disk
    extents = lab.write(args.vm, disk, args.percent, args.seed)
    changed = sum(int(e["length"]) for e in extents if e.get("dirty", True))
    print(f"wrote {changed} bytes in {len(extents)} extents")
    return 0


def _fault(args: argparse.Namespace) -> int:
    lab = client.Lab(args.dir)
    if args.clear:
        lab.clear_faults()
        print("faults cleared")
        return 0
    if not args.name:
        print(json.dumps(lab.faults(), indent=2))
        return 0
    value: Any = args.value
    if value in ("true", "false"):
        value = value == "true"
    else:
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                pass
    if args.name == "engine_restart":
        lab.restart_engine(float(value) if not isinstance(value, bool) else 1.0)
    else:
        lab.fault(args.name, value)
    print(f"fault {args.name}={value}")
    return 0
