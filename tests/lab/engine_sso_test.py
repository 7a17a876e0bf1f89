"""The engine's front door with the real ovirtsdk4: CA download, SSO login/logout, wrong password, root,
inventory, events, jobs, 404 faults."""

from __future__ import annotations

import ssl
import subprocess
import urllib.request
from typing import Any

import ovirtsdk4
import pytest
from ovirtsdk4 import types

from lab.client import Lab


def test_ca_served_and_verifies_engine(lab: Lab) -> None:
    url = lab.url.replace("/api", "/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA")
    # Bootstrapping: the CA is fetched without verification, as an administrator does with curl -k.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=ctx) as r:
        pem = r.read()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert pem == open(lab.ca_file, "rb").read()
    with urllib.request.urlopen(lab.url.replace("/api", "/lab/faults"),
                                context=ssl.create_default_context(cadata=pem.decode())) as r:
        assert r.status == 200


def test_login_root_and_logout(sdk: Any) -> None:
    api = sdk.system_service().get()
    assert api.product_info.version.major == 4
    assert api.product_info.version.minor == 5
    assert api.product_info.name == "oVirt Engine"
    assert sdk.test(raise_exception=True)


def test_wrong_password_is_auth_error(lab: Lab) -> None:
    conn = ovirtsdk4.Connection(url=lab.url, username=lab.user, password="not-the-password", ca_file=lab.ca_file)
    with pytest.raises(ovirtsdk4.AuthError, match="username or password is incorrect"):
        conn.system_service().get()
    conn.close(logout=False)


def test_user_without_profile_is_auth_error(lab: Lab) -> None:
    conn = ovirtsdk4.Connection(url=lab.url, username="admin", password=lab.password, ca_file=lab.ca_file)
    with pytest.raises(ovirtsdk4.AuthError, match="No valid profile"):
        conn.system_service().get()
    conn.close(logout=False)


def test_untrusted_ca_fails(lab: Lab, tmp_path: Any) -> None:
    from lab.pki import CA

    other = CA.create(tmp_path / "other")
    conn = ovirtsdk4.Connection(url=lab.url, username=lab.user, password=lab.password,
                                ca_file=str(other.cert_path))
    with pytest.raises(ovirtsdk4.Error):
        conn.system_service().get()


def test_token_revoked_at_logout(lab: Lab) -> None:
    conn = lab.connection()
    token = conn.authenticate() or conn._sso_token
    conn.system_service().get()
    conn.close()
    req = urllib.request.Request(lab.url, headers={"Authorization": f"Bearer {token}", "Version": "4"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, context=ssl.create_default_context(cafile=lab.ca_file))
    assert e.value.code == 401


def test_inventory(sdk: Any, lab: Lab) -> None:
    system = sdk.system_service()
    dcs = system.data_centers_service().list()
    clusters = system.clusters_service().list()
    hosts = system.hosts_service().list()
    sds = system.storage_domains_service().list()
    assert len(dcs) == 1 and len(clusters) == 1
    assert clusters[0].data_center.id == dcs[0].id
    assert sorted(h.name for h in hosts) == ["host1", "host2"]
    for h in hosts:
        assert h.status == types.HostStatus.UP
        assert h.ssh.port > 0 and h.ssh.public_key.startswith("ssh-ed25519 ")
        keygen = subprocess.run(["ssh-keygen", "-lf", "-"], input=h.ssh.public_key, capture_output=True,
                                text=True, check=True).stdout
        assert keygen.split()[1] == h.ssh.fingerprint
    kinds = {s.name: s.storage.type for s in sds}
    assert kinds == {"nfs-data": types.StorageType.NFS, "iscsi-data": types.StorageType.ISCSI}
    sd = system.storage_domains_service().storage_domain_service(sds[0].id).get()
    assert sd.id == sds[0].id and sd.available > 0
    proxy = system.vms_service().vm_service(lab.proxy_vm).get()
    assert proxy.status == types.VmStatus.UP
    assert proxy.virtio_scsi.enabled


def test_unknown_ids_are_404(sdk: Any) -> None:
    system = sdk.system_service()
    with pytest.raises(ovirtsdk4.NotFoundError):
        system.vms_service().vm_service("00000000-0000-0000-0000-00000000dead").get()
    with pytest.raises(ovirtsdk4.NotFoundError):
        system.disks_service().disk_service("nope").get()
    with pytest.raises(ovirtsdk4.NotFoundError):
        system.image_transfers_service().image_transfer_service("nope").finalize()
    with pytest.raises(ovirtsdk4.NotFoundError):
        system.hosts_service().host_service("nope").get()


def test_events_add_and_list(sdk: Any) -> None:
    events = sdk.system_service().events_service()
    ev = events.add(types.Event(description="ferry test event", severity=types.LogSeverity.NORMAL,
                                origin="ferry", custom_id=4242))
    assert ev.id
    listed = events.list(max=50)
    assert any(e.description == "ferry test event" and e.custom_id == 4242 for e in listed)
    newer = events.list(from_=int(ev.id) - 1)
    assert any(e.id == ev.id for e in newer)
    with pytest.raises(ovirtsdk4.Error):
        events.add(types.Event(description="incomplete"))


def test_follow_link(sdk: Any, lab: Lab) -> None:
    vm = sdk.system_service().vms_service().vm_service(lab.proxy_vm).get()
    atts = sdk.follow_link(vm.disk_attachments)
    assert isinstance(atts, list)
