"""The engine client against the lab engine (real ovirtsdk4 over TLS): login, the three expected failures
(wrong password, unreachable engine, untrusted CA), user@domain validation, inventory, missing VM."""

from __future__ import annotations

import pytest

from control.engine import EngineClient, api_url, validate_user
from control.errors import AuthError, EngineUnreachable, NotFound, UsageError
from control.natsd import free_port
from lab.client import Lab


def test_login_version_and_inventory(lab: Lab) -> None:
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        assert c.version() >= (4, 4)
        assert {h.name for h in c.hosts()} >= {"host1"}
        assert {s.name for s in c.storage_domains()} >= {"nfs-data"}
        assert c.clusters()
        vm = c.find_vm("ferry-proxy")
        assert c.find_vm(vm.id).name == "ferry-proxy"
        assert c.find_cluster(c.clusters()[0].name).id == c.clusters()[0].id
        with pytest.raises(NotFound, match="VM no-such-vm not found"):
            c.find_vm("no-such-vm")


def test_wrong_password_is_auth_error(lab: Lab) -> None:
    with pytest.raises(AuthError, match="refused the login of admin@internal") as e:
        EngineClient(lab.url, lab.user, "not-the-password", lab.ca_file).connect()
    assert "not-the-password" not in str(e.value)
    assert "\n" not in str(e.value)


def test_unreachable_engine(lab: Lab) -> None:
    url = f"https://127.0.0.1:{free_port()}/ovirt-engine/api"
    with pytest.raises(EngineUnreachable, match="is unreachable") as e:
        EngineClient(url, lab.user, lab.password, lab.ca_file).connect()
    assert e.value.retryable


def test_untrusted_ca_is_refused(lab: Lab) -> None:
    with pytest.raises(EngineUnreachable, match="TLS certificate not trusted"):
        EngineClient(lab.url, lab.user, lab.password, "/etc/ssl/certs/ca-certificates.crt").connect()


def test_user_must_be_user_at_domain() -> None:
    assert validate_user("admin@internal") == "admin@internal"
    for bad in ("admin", "a@b@c", "@internal", "admin@"):
        with pytest.raises(UsageError, match="user@domain"):
            validate_user(bad)


def test_api_url_forms() -> None:
    assert api_url("engine.example") == "https://engine.example/ovirt-engine/api"
    assert api_url("https://e:8443/ovirt-engine/api/") == "https://e:8443/ovirt-engine/api"
