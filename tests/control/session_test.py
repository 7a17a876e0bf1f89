"""Shared engine sessions against the lab engine (real ovirtsdk4 over TLS): one login for many clients and
threads, re-login after the engine forgets tokens, auth errors and engine changes; the wait's poll
interval; flows' concurrent actions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from control import config as configmod
from control.catalog import Catalog
from control.client import bus_options
from control.engine import EngineClient, api_url
from control.engine.base import poll_delay
from control.engine.session import EngineSessions
from control.errors import AuthError
from control.flows.base import run_all
from control.natsd import free_port
from control.service import ControlPlane
from lab.client import Lab


def client(lab: Lab, sessions: EngineSessions, password: str | None = None) -> EngineClient:
    pw = lab.password if password is None else password
    s = sessions.get("e1", api_url(lab.url), lab.user, pw, lab.ca_file)
    return EngineClient(lab.url, lab.user, pw, lab.ca_file, session=s)


def test_one_login_shared_by_clients_and_threads(lab: Lab) -> None:
    sessions = EngineSessions()
    try:
        a = client(lab, sessions).connect()
        b = client(lab, sessions).connect()
        session = sessions.get("e1", api_url(lab.url), lab.user, lab.password, lab.ca_file)
        assert session.logins == 1 and len(sessions) == 1
        assert a.version() >= (4, 4) and b.find_vm("ferry-proxy").name == "ferry-proxy"
        a.close()  # gives the connection back, no logout: b goes on
        errors: list[BaseException] = []

        def reads() -> None:
            try:
                for _ in range(10):
                    assert b.vms()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reads) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        c = client(lab, sessions).connect()
        assert c.vms() and session.logins == 1
        b.close()
        c.close()
    finally:
        sessions.close()
    # Closed at shutdown: the token is revoked on the engine, the connection released.
    assert session._conn is None


def test_session_survives_the_engine_forgetting_its_token(lab: Lab) -> None:
    sessions = EngineSessions()
    try:
        c = client(lab, sessions).connect()
        before = {v.id for v in c.vms()}
        lab.restart_engine(0.5)  # tokens live in memory: the next request gets a 401, the SDK logs in again
        assert {v.id for v in c.vms()} >= before
        c.close()
    finally:
        sessions.close()


def test_wrong_password_then_changed_engine(lab: Lab) -> None:
    sessions = EngineSessions()
    try:
        bad = client(lab, sessions, password="not-the-password")
        with pytest.raises(AuthError, match="refused the login"):
            bad.connect()
        bad.close()
        old = sessions.get("e1", api_url(lab.url), lab.user, "not-the-password", lab.ca_file)
        assert old.logins == 0 and old._conn is None  # nothing cached after a failed login
        # The engine re-added with the right password: a new session, the old one retired.
        good = client(lab, sessions).connect()
        assert good.vms()
        assert sessions.get("e1", api_url(lab.url), lab.user, lab.password, lab.ca_file) is not old
        assert old._retired
        # Removed from the catalog: retired once its client is done, logged out then.
        session = sessions.get("e1", api_url(lab.url), lab.user, lab.password, lab.ca_file)
        sessions.retain(set())
        assert len(sessions) == 0 and session._retired and session._old  # still in use by `good`
        assert good.vms()
        good.close()
        assert not session._old and session._conn is None
    finally:
        sessions.close()


def test_auth_error_drops_the_shared_connection(lab: Lab) -> None:
    sessions = EngineSessions()
    try:
        c = client(lab, sessions).connect()
        session = sessions.get("e1", api_url(lab.url), lab.user, lab.password, lab.ca_file)
        conn = session._conn
        assert conn is not None
        # The password changes under a live session: the SDK's re-login after a 401 fails too.
        session._password = "changed"
        conn._password = "changed"  # type: ignore[attr-defined]
        conn._sso_token = "expired"  # type: ignore[attr-defined]
        with pytest.raises(AuthError):
            c.vms()
        assert session._conn is None  # dropped: the next use logs in again
        session._password = lab.password
        assert c.vms() and session.logins == 2
        c.close()
    finally:
        sessions.close()


def test_poll_interval_short_then_backs_off() -> None:
    delay, waited, seen = 0.05, 0.0, []
    while waited < 60:
        delay = poll_delay(delay, waited)
        seen.append((waited, delay))
        waited += delay
    # Fast in the first second (a phase step of the engine seen within ~50 ms), and never faster than that.
    assert {d for w, d in seen if w < 1.0} == {0.05}
    assert min(d for _, d in seen) == 0.05 and len([w for w, _ in seen if w < 1.0]) <= 21
    assert max(d for w, d in seen if w < 20) <= 0.25
    assert [d for w, d in seen if w < 20][-1] == 0.25
    assert max(d for _, d in seen) == 2.0


def test_run_all_runs_everything_at_once_whatever_fails() -> None:
    ran: list[str] = []

    def slow(name: str, fail: bool = False) -> None:
        time.sleep(0.5)
        ran.append(name)
        if fail:
            raise RuntimeError(f"{name} broke")

    t0 = time.monotonic()
    failures = run_all([("a", lambda: slow("a", fail=True)), ("b", lambda: slow("b")),
                        ("c", lambda: slow("c", fail=True))])
    assert time.monotonic() - t0 < 1.2  # at once, not 1.5 s one after the other
    assert sorted(ran) == ["a", "b", "c"]
    assert [(n, str(e)) for n, e in failures] == [("a", "a broke"), ("c", "c broke")]


def test_control_plane_logs_in_at_start(lab: Lab, tmp_path: Path) -> None:
    """The first backup after a start finds its engine logged in; an engine that does not answer is skipped."""
    cfg = configmod.load(str(tmp_path / "data"), None, "nats://127.0.0.1:1", None)
    cat = Catalog(tmp_path / "catalog.sqlite")
    pw = tmp_path / "pw"
    pw.write_text(lab.password)
    try:
        good = cat.add_engine(api_url(lab.url), lab.user, str(pw), lab.ca_file)
        dead = cat.add_engine(f"https://127.0.0.1:{free_port()}/ovirt-engine/api", lab.user, str(pw), lab.ca_file)
        plane = ControlPlane(cfg, cat, bus_options(cfg, "nats://127.0.0.1:1", "test"))
        plane.warm_sessions()
        session = plane.sessions.get(good.id, api_url(lab.url), lab.user, lab.password, lab.ca_file)
        assert session.logins == 1 and session.version is not None
        with plane._client(good) as c:  # the first flow's client: no second login
            assert c.find_vm("ferry-proxy").name == "ferry-proxy"
        assert session.logins == 1
        assert plane.sessions.get(dead.id, dead.url, lab.user, lab.password, lab.ca_file).logins == 0
        plane.sessions.close()
    finally:
        cat.close()
