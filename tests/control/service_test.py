"""The control plane as a process, reached over NATS by the CLI: triggers answer expected failures with one
line and the right exit code; a flow that fails leaves the VM unlocked and says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.plane import ROOT
from tests.control.plane import Plane


def test_missing_vm_is_one_line_not_found(plane: Plane) -> None:
    r = plane.ferry("backup", "no-such-vm", "--type", "full", check=False)
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip() == "ferry: error: VM no-such-vm not found"


def test_bad_trigger_is_answered(plane: Plane) -> None:
    r = plane.ferry("backup", "", check=False)
    assert r.returncode == 2 and "vm is empty" in r.stderr


def test_vm_without_disks_fails_cleanly(plane: Plane) -> None:
    r = plane.ferry("backup", "ferry-proxy", "--type", "full", "--json", check=False)
    assert r.returncode == 7, r.stderr
    (b,) = json.loads(r.stdout)
    assert b["state"] == "failed"
    assert "has no disk left to back up" in b["error"]
    listed = plane.ferry_json("backups", "ferry-proxy")
    assert [x["id"] for x in listed] == [b["id"]]


def test_restore_of_unknown_backup(plane: Plane) -> None:
    r = plane.ferry("restore", "0000dead", check=False)
    assert r.returncode == 5 and "backup 0000dead not found" in r.stderr


def test_ferry_up_runs_everything_and_stops_clean(tmp_path: Path) -> None:
    """`ferry up`: embedded NATS (URL published for the CLI), control plane, movers; SIGTERM stops all."""
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen([sys.executable, "-m", "control.cli", "up", "--data-dir", str(data), "--movers", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        url_file = data / "nats" / "url"
        deadline = time.monotonic() + 30
        r = None
        while time.monotonic() < deadline:
            if url_file.exists():
                r = subprocess.run([sys.executable, "-m", "control.cli", "backup", "web", "--data-dir", str(data)],
                                   capture_output=True, text=True, env=env, cwd=ROOT)
                if "no control plane answered" not in r.stderr:
                    break
            time.sleep(0.2)
        # Found NATS through the data dir, reached the control plane, which answers: no engine yet.
        assert r is not None and r.returncode == 2 and "no engine configured" in r.stderr, r
        children = _children(up.pid)
        assert len(children) >= 2  # nats-server and one mover
        # A second control plane on the same data dir shares the running NATS instead of starting its own.
        ctl = subprocess.Popen([sys.executable, "-m", "control.cli", "control", "--data-dir", str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        time.sleep(2)
        url = url_file.read_text().strip()
        assert not any("nats-server" in Path(f"/proc/{c}/cmdline").read_text() for c in _children(ctl.pid))
        ctl.send_signal(signal.SIGTERM)
        ctl_out = ctl.communicate(timeout=30)[0].decode()
        assert ctl.returncode == 0 and url in ctl_out, ctl_out
        assert url_file.read_text().strip() == url  # still `ferry up`'s
    finally:
        up.send_signal(signal.SIGTERM)
        out = up.communicate(timeout=30)[0].decode()
    assert up.returncode == 0, out
    assert not url_file.exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def test_trigger_over_nats_replies_with_the_backup_id(plane: Plane) -> None:
    """Any NATS client can start a backup: request on ferry.trigger.backup, the reply carries the id, and
    the backup's events follow on ferry.events.backup.<id>."""
    import asyncio

    from mover import bus as mbus
    from mover import jobs

    async def go() -> tuple[dict[str, object], dict[str, object]]:
        b = await mbus.connect(mbus.BusOptions(url=plane.nats.url))
        try:
            msg = await b.nc.request(jobs.TRIGGER_BACKUP, json.dumps({"vm": "ferry-proxy", "type": "full"}).encode(),
                                     timeout=30)
            reply = json.loads(msg.data)
            for _ in range(100):
                try:
                    last = await b.js.get_last_msg(jobs.STREAM_EVENTS, jobs.backup_subject(reply["backup_id"]))
                    ev = json.loads(last.data)
                    if ev["state"] in ("succeeded", "failed"):
                        return reply, ev
                except Exception:
                    pass
                await asyncio.sleep(0.1)
            raise AssertionError("no final event")
        finally:
            await b.close()

    reply, ev = asyncio.run(go())
    assert set(reply) == {"backup_id"}
    assert ev["backup_id"] == reply["backup_id"] and ev["vm"] == "ferry-proxy"
    assert ev["state"] == "failed" and "no disk left" in ev["error"]  # the proxy VM has no disks
