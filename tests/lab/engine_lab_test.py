"""The lab as a whole: the ``ferry lab`` CLI, hosts over SSH (real sshd, host key verified), an unreachable
host, and an engine restart that keeps its state while the SDK logs in again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncssh
import ovirtsdk4
import pytest
from ovirtsdk4 import types

from lab.client import Lab

MiB = 1024**2
FERRY = [sys.executable, "-m", "control.cli"]


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``ferry ARGS`` in this process (the CLI's own main), for speed; one test runs it as a program."""
    from control.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_status_second_up_write_fault(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    p = ferry("lab", "status", "--dir", str(lab.dir), "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["engine_url"] == lab.url and st["user"] == "admin@internal"
    assert Path(st["password_file"]).read_text().strip() == st["password"] == lab.password
    assert Path(st["ca_file"]).exists()
    assert st["proxy_vm"] == lab.proxy_vm
    assert {h["name"] for h in st["hosts"]} == {"host1", "host2"}
    for h in st["hosts"]:
        assert h["ssh_port"] > 0 and h["host_key"].startswith("ssh-ed25519 ") and Path(h["ssh_key"]).exists()

    rc, out, err = cli(capsys, "lab", "up", "--dir", str(lab.dir))
    assert rc == 7
    assert err.strip().count("\n") == 0 and "already running" in err

    info = lab.create_vm(f"cli-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}])
    rc, out, err = cli(capsys, "lab", "write", "--dir", str(lab.dir), info["name"], "--disk", "0", "--percent", "5")
    assert rc == 0, err
    assert out.startswith("wrote ") and int(out.split()[1]) > 0

    rc, out, err = cli(capsys, "lab", "fault", "--dir", str(lab.dir), "snapshot_remove_conflict", "3")
    assert rc == 0, err
    assert lab.faults() == {"snapshot_remove_conflict": 3}
    rc, out, err = cli(capsys, "lab", "fault", "--dir", str(lab.dir), "--clear")
    assert rc == 0 and lab.faults() == {}
    rc, out, err = cli(capsys, "lab", "fault", "--dir", str(lab.dir), "no_such_fault")
    assert rc == 7 and "unknown fault" in err

    rc, out, err = cli(capsys, "lab", "status", "--dir", str(lab.dir / "nowhere"))
    assert rc == 7 and "no lab running" in err
    rc, out, err = cli(capsys, "lab", "status", "--dir", str(lab.dir))
    assert rc == 0 and lab.url in out and "host1" in out


async def _ssh(host: dict[str, Any], command: str) -> bytes:
    known = asyncssh.import_known_hosts(f"[127.0.0.1]:{host['ssh_port']} {host['host_key']}")
    async with asyncssh.connect("127.0.0.1", port=host["ssh_port"], username=host["ssh_user"],
                                client_keys=[host["ssh_key"]], known_hosts=known) as conn:
        r = await conn.run(command, check=True, encoding=None)
        out = r.stdout
        assert isinstance(out, bytes)
        return out


def test_ssh_reads_volume_files(lab: Lab, sdk: Any, tmp_path: Path) -> None:
    info = lab.create_vm(f"ssh-{uuid.uuid4().hex[:6]}", disks=[
        {"size": 16 * MiB, "fill": 0}, {"size": 16 * MiB, "fill": 0, "storage_domain": "iscsi-data"}])
    lab.write(info["id"], 0, 10, seed=1)
    lab.write(info["id"], 1, 10, seed=2)
    host = lab.hosts[0]
    rhev = lab.status["rhev_root"]
    for did in info["disks"]:
        local_path = lab.volume_paths(did)[-1]
        path = lab.volume_paths(did, host=True)[-1]
        assert path.startswith(rhev + "/mnt/") and f"/images/{did}/" in path
        local = hashlib.sha256(Path(local_path).read_bytes()).hexdigest()
        remote = asyncio.run(_ssh(host, f"sha256sum {path}")).split()[0].decode()
        assert remote == local
        meta = json.loads(asyncio.run(_ssh(host, f"qemu-img info -U --output json {path}")))
        assert meta["format"] == "qcow2" and meta["virtual-size"] == 16 * MiB
    # The block domain's volumes are LVs of a VG named by the domain id, seen through the emulated lvs.
    sd = lab.storage_domain("iscsi-data")
    out = asyncio.run(_ssh(host, f"lvs --noheadings -o lv_name {sd['id']}")).decode()
    disk = sdk.system_service().disks_service().disk_service(info["disks"][1]).get()
    assert disk.image_id in out.split()
    # A wrong host key is refused: the client verifies it.
    bad = dict(host, host_key=lab.hosts[1]["host_key"])
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(_ssh(bad, "true"))


def test_host_unreachable(lab: Lab, sdk: Any) -> None:
    hosts = sdk.system_service().hosts_service()
    h2 = next(h for h in lab.hosts if h["name"] == "host2")
    lab.fault("host_down", "host2")
    try:
        assert hosts.host_service(h2["id"]).get().status == types.HostStatus.NON_RESPONSIVE
        with pytest.raises((OSError, asyncssh.Error)):
            asyncio.run(_ssh(h2, "true"))
        info = lab.create_vm(f"hd-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}], start=False)
        transfers = sdk.system_service().image_transfers_service()
        with pytest.raises(ovirtsdk4.Error, match="not responding") as e:
            transfers.add(types.ImageTransfer(disk=types.Disk(id=info["disks"][0]), host=types.Host(id=h2["id"]),
                                              direction=types.ImageTransferDirection.DOWNLOAD))
        assert e.value.code == 409
        t = transfers.add(types.ImageTransfer(disk=types.Disk(id=info["disks"][0]),
                                              direction=types.ImageTransferDirection.DOWNLOAD))
        assert t.host.id != h2["id"]
        transfers.image_transfer_service(t.id).cancel()
    finally:
        lab.clear_faults()
    assert hosts.host_service(h2["id"]).get().status == types.HostStatus.UP
    assert asyncio.run(_ssh(h2, "echo ok")).strip() == b"ok"


def test_engine_restart_keeps_state(lab: Lab, sdk: Any) -> None:
    info = lab.create_vm(f"rs-{uuid.uuid4().hex[:6]}", disks=[{"size": 16 * MiB, "fill": 0}])
    snaps = sdk.system_service().vms_service().vm_service(info["id"]).snapshots_service()
    s = snaps.add(types.Snapshot(description="before restart"))
    t0 = time.monotonic()
    lab.restart_engine(1.0)
    assert time.monotonic() - t0 >= 1.0
    # The same connection works: its token is gone, the SDK logs in again on the 401.
    vm = sdk.system_service().vms_service().vm_service(info["id"]).get()
    assert vm.name == info["name"] and vm.status == types.VmStatus.UP
    deadline = time.monotonic() + 10
    while snaps.snapshot_service(s.id).get().snapshot_status != types.SnapshotStatus.OK:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(lab.volume_paths(info["disks"][0])) == 2


def test_engine_restart_cuts_open_connections(lab: Lab) -> None:
    """A restart drops keep-alive connections and tokens, as a real engine restart does."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    u = urlsplit(lab.url)
    token = json.loads(_token_request(lab))["access_token"]
    conn = http.client.HTTPSConnection(u.hostname or "", u.port, context=ctx, timeout=10)
    conn.request("GET", u.path, headers={"Authorization": f"Bearer {token}", "Version": "4"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    lab.restart_engine(0.5)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", u.path, headers={"Authorization": f"Bearer {token}", "Version": "4"})
        conn.getresponse().read()
    conn.close()
    fresh = http.client.HTTPSConnection(u.hostname or "", u.port, context=ctx, timeout=10)
    fresh.request("GET", u.path, headers={"Authorization": f"Bearer {token}", "Version": "4"})
    r = fresh.getresponse()
    r.read()
    fresh.close()
    assert r.status == 401  # the old token died with the engine


def _token_request(lab: Lab) -> str:
    import ssl
    import urllib.parse
    import urllib.request

    base = lab.url.split("/ovirt-engine/")[0]
    body = urllib.parse.urlencode({"grant_type": "password", "username": lab.user, "password": lab.password,
                                   "scope": "ovirt-app-api"}).encode()
    req = urllib.request.Request(f"{base}/ovirt-engine/sso/oauth/token", data=body,
                                 headers={"Accept": "application/json"})
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return str(resp.read().decode())
