"""Engine sessions the control plane keeps: one logged-in SDK connection per engine, shared by its flows.

Logging in (SSO) and out costs a few round trips per connection; a backup used to pay it twice (VM lookup,
then the flow). ``EngineSessions`` keeps one ``EngineSession`` per engine for the life of the control plane:
clients made with ``session=`` borrow its connection instead of logging in. The SDK itself logs in again
when the token expires (a 401 triggers a new token and one retry), so a session outlives token expiry and
engine restarts. An auth error drops the session's connection (the next call logs in afresh); an engine
whose URL, user, password or CA changed (re-added) or that left the catalog gets a new session, and the
old one is closed (logged out) once no client uses it any more. ``close()`` at shutdown logs every one out.

``SerialConnection`` is the SDK connection with one request in flight at a time: the SDK's own locking lets
a thread read another thread's transfer failure (and raise it) while the thread that owned it then waits
forever, so requests of the threads sharing a connection are serialised (each takes milliseconds; waits
on engine state sleep between requests, outside the lock).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import ovirtsdk4 as sdk

log = logging.getLogger(__name__)


class SerialConnection(sdk.Connection):
    """An ``ovirtsdk4.Connection`` safe to share between threads: one request (send + wait) at a time.

    Not for the SDK's ``wait=False`` calls: a request sent holds the connection until it is waited for.
    """

    def __init__(self, **kwargs: Any) -> None:
        # RLock: the SDK's wait may send again (re-login after a 401) in the same thread.
        self._request_lock = threading.RLock()
        super().__init__(**kwargs)

    def send(self, request: Any) -> Any:
        # Held from the send to the end of its wait (the SDK's services always wait right after sending).
        self._request_lock.acquire()
        try:
            return super().send(request)
        except BaseException:
            self._request_lock.release()
            raise

    def wait(self, context: Any, failed_auth: bool = False) -> Any:
        try:
            return super().wait(context, failed_auth)
        finally:
            self._request_lock.release()

    def close(self, logout: bool = True) -> None:
        with self._request_lock:  # never under a request in flight
            super().close(logout=logout)


def open_connection(url: str, user: str, password: str, ca_file: str | None) -> SerialConnection:
    """A logged-in connection (raises the SDK's errors: the caller maps them)."""
    conn = SerialConnection(url=url, username=user, password=password, ca_file=ca_file, insecure=False,
                            timeout=60, connections=2, pipeline=0)
    try:
        conn.authenticate()
    except BaseException:
        close_quietly(conn, logout=False, url=url)
        raise
    return conn


def close_quietly(conn: sdk.Connection, logout: bool, url: str) -> None:
    try:
        conn.close(logout=logout)
    except Exception as e:  # logging out is a courtesy; a dead engine must not hide the real error
        log.debug("engine logout failed url=%s error=%s", url, e)


class EngineSession:
    """One engine's shared, logged-in connection (made on first use, again after ``drop``). Thread-safe."""

    def __init__(self, url: str, user: str, password: str, ca_file: str | None) -> None:
        self.url = url
        self.user = user
        self._password = password
        self.ca_file = ca_file
        self._lock = threading.Lock()
        self._conn: SerialConnection | None = None
        self._version: tuple[int, int] | None = None
        self._users = 0
        self._retired = False
        self._old: list[SerialConnection] = []  # dropped connections, logged out when nobody uses them
        self.logins = 0  # connections made (observability and tests)

    def connection(self) -> tuple[SerialConnection, bool]:
        """The live connection, logging in if there is none; and whether it was made by this call."""
        with self._lock:
            if self._conn is not None:
                return self._conn, False
            # Logging in under the lock: the threads that want the engine at once share one login.
            self._conn = open_connection(self.url, self.user, self._password, self.ca_file)
            self.logins += 1
            log.info("engine session opened url=%s user=%s", self.url, self.user)
            return self._conn, True

    @property
    def version(self) -> tuple[int, int] | None:
        return self._version

    def set_version(self, conn: sdk.Connection, version: tuple[int, int]) -> None:
        with self._lock:
            if conn is self._conn:
                self._version = version

    def drop(self, conn: sdk.Connection | None) -> None:
        """Forget ``conn`` after an auth error (if it is still the live one): the next use logs in again.
        Clients may still hold services of it: it is logged out only when the last of them is done."""
        with self._lock:
            if conn is None or conn is not self._conn:
                return
            self._old.append(self._conn)
            self._conn, self._version = None, None
        log.info("engine session dropped url=%s user=%s", self.url, self.user)
        self._close_idle()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
        self._close_idle()

    def retire(self) -> None:
        """The engine changed or left: no new client gets this session; close it once it is idle."""
        with self._lock:
            self._retired = True
            if self._conn is not None:
                self._old.append(self._conn)
                self._conn = None
        self._close_idle()

    def close(self) -> None:
        """Log out now (shutdown), whoever still uses it."""
        with self._lock:
            conns = self._old + ([self._conn] if self._conn is not None else [])
            self._old, self._conn, self._version = [], None, None
        for c in conns:
            close_quietly(c, logout=True, url=self.url)
        if conns:
            log.info("engine session closed url=%s user=%s", self.url, self.user)

    def _close_idle(self) -> None:
        with self._lock:
            if self._users:
                return
            conns, self._old = self._old, []
            if self._retired and self._conn is not None:
                conns.append(self._conn)
                self._conn = None
        for c in conns:
            close_quietly(c, logout=True, url=self.url)


def _key(engine_id: str, url: str, user: str, password: str, ca_file: str | None) -> tuple[str, ...]:
    # The password only as a digest: the key is kept in memory for the process's life.
    return (engine_id, url, user, hashlib.sha256(password.encode()).hexdigest(), ca_file or "")


class EngineSessions:
    """The control plane's sessions, one per engine (keyed by its catalog id). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_engine: dict[str, tuple[tuple[str, ...], EngineSession]] = {}
        self._closed = False

    def get(self, engine_id: str, url: str, user: str, password: str, ca_file: str | None) -> EngineSession:
        """The session of this engine; a new one if its URL, user, password or CA changed since."""
        key = _key(engine_id, url, user, password, ca_file)
        old = None
        with self._lock:
            cur = self._by_engine.get(engine_id)
            if cur is not None and cur[0] == key and not self._closed:
                return cur[1]
            session = EngineSession(url, user, password, ca_file)
            if self._closed:
                session.retire()  # after shutdown: unshared, logged out when its client is done
            else:
                self._by_engine[engine_id] = (key, session)
                old = cur[1] if cur is not None else None
        if old is not None:
            log.info("engine changed, new session url=%s user=%s", url, user)
            old.retire()
        return session

    def retain(self, engine_ids: set[str]) -> None:
        """Retire the sessions of engines no longer in the catalog (removed)."""
        with self._lock:
            gone = [k for k in self._by_engine if k not in engine_ids]
            sessions = [self._by_engine.pop(k)[1] for k in gone]
        for s in sessions:
            log.info("engine removed, session retired url=%s", s.url)
            s.retire()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_engine)

    def close(self) -> None:
        """Log every session out (control plane shutdown); later ``get`` calls give unshared sessions."""
        with self._lock:
            self._closed = True
            sessions = [s for _, s in self._by_engine.values()]
            self._by_engine.clear()
        for s in sessions:
            s.close()
