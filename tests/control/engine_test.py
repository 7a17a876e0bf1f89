"""The engine client against the lab engine (real ovirtsdk4 over TLS): login, the three expected failures
(wrong password, unreachable engine, untrusted CA), user@domain validation, inventory, missing VM."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from control.engine import EngineClient, api_url, validate_user
from control.engine.base import ovf_in
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



class Relay:
    """A TCP relay in front of the engine that can cut every connection and refuse new ones for a while:
    a real network outage between the control plane and the engine."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.socks: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.up()

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(8)
        self.server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                a, _ = srv.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for s in (x, y):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        assert self.server is not None
        # shutdown() first: close() alone leaves a socket blocked in accept() listening (Linux).
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.socks = []


def test_reads_ride_out_an_outage_creates_do_not(lab: Lab) -> None:
    port = int(lab.url.split(":")[2].split("/")[0])
    relay = Relay(("127.0.0.1", port))
    url = f"https://127.0.0.1:{relay.port}/ovirt-engine/api"
    try:
        with EngineClient(url, lab.user, lab.password, lab.ca_file, timeout=20) as c:
            before = {v.id for v in c.vms()}
            relay.down()
            threading.Timer(1.5, relay.up).start()
            t0 = time.monotonic()
            assert {v.id for v in c.vms()} == before  # retried until the engine answered again
            assert time.monotonic() - t0 > 1.0
            relay.down()
            try:
                # A creating call is not repeated blindly: a lost answer could mean it was created.
                with pytest.raises(EngineUnreachable):
                    c.create_snapshot(next(iter(before)), [], "never")
            finally:
                relay.up()
    finally:
        relay.down()


def test_one_vm_request_brings_its_ovf_and_disks(lab: Lab) -> None:
    """What the backup flow's prepare step asks in one round trip equals what it used to ask in 2 + 1 per disk."""
    vm = lab.create_vm("eng-follow", disks=[{"size": 16 * 2**20, "fill": 0.1, "backup": "incremental"},
                                            {"size": 16 * 2**20, "fill": 0.1, "format": "raw", "sparse": False}],
                       start=False, guest_agent=False)
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        full = c.find_vm(vm["id"], all_content=True, follow="disk_attachments.disk")
        plain = c.find_vm(vm["id"])
        assert ovf_in(full) == c.vm_ovf(vm["id"]) and ovf_in(plain) is None
        inline = c.vm_disks(vm["id"], vm=full)
        assert [d.id for d in inline] == vm["disks"]
        assert inline == c.vm_disks(vm["id"]) == c.vm_disks(vm["id"], vm=plain)  # no inline disks: asked for
        assert [d.incremental for d in inline] == [True, False]
        # By name (a search) the same: what the control plane's trigger hands to the backup flow.
        by_name = c.find_vm("eng-follow", all_content=True, follow="disk_attachments.disk")
        assert by_name.id == vm["id"] and ovf_in(by_name) == ovf_in(full)
        assert c.vm_disks(vm["id"], vm=by_name) == inline


def test_finalize_without_a_look_first(lab: Lab) -> None:
    """finalize_transfer sends finalize at once; a transfer that ended anyway still gives its end phase."""
    vm = lab.create_vm("eng-final", disks=[{"size": 16 * 2**20, "fill": 0.1}], start=False, guest_agent=False)
    with EngineClient(lab.url, lab.user, lab.password, lab.ca_file) as c:
        t = c.start_transfer(vm["disks"][0], "download")
        assert c.finalize_transfer(t.id) == "finished_success"
        assert c.finalize_transfer(t.id) == "finished_success"  # ended already: the refusal is not an error
        t = c.start_transfer(vm["disks"][0], "download")
        assert c.cancel_transfer(t.id) == "cancelled_user"
        assert c.finalize_transfer(t.id) in ("cancelled_user", "finished_failure")  # its end, not an error
