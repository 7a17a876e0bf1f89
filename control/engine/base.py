"""The engine client's base: connection, error mapping, waiting, inventory.

It wraps the calls the flows need (inventory, OVF, snapshots, VM backups and checkpoints, image transfers,
freeze/thaw, disks and VMs for restore) and turns SDK failures into ``control.errors``: a wrong password is an
``AuthError``, a refused connection or TLS failure ``EngineUnreachable``, a missing object ``NotFound``, a
409 ``EngineConflict`` (retryable). TLS is verified with the engine's CA file; the SDK itself logs in again
when the SSO token expires (a 401 on a request triggers a new token and one retry).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pycurl

from control.engine.session import EngineSession, close_quietly, open_connection
from control.errors import AuthError, EngineConflict, EngineError, EngineUnreachable, NotFound, UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# user@domain, as the engine's SSO expects (admin@internal, jane@example.com@ldap-profile is not valid).
_USER_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
# Seconds between polls of an entity whose state we wait for. Most waits (backup ready, transfer
# transferring, finalize) end within a second or two, and a phase change seen late is time lost on every
# backup: for the first _POLL_FAST_FOR seconds polls are _POLL_FIRST apart (a phase step of a fraction of a
# second is seen within ~50 ms instead of ~150 ms with a growing delay); then they stay at most _POLL_SHORT
# apart for the first _POLL_SHORT_FOR seconds (a few light GETs a second); only a wait that lasts longer (a
# snapshot of a big VM, a merge) backs off towards _POLL_MAX. The fast phase is bounded on purpose: at most
# ~20 GETs of one entity, once per wait, so even many flows at once do not hammer a real engine for long.
_POLL_FIRST, _POLL_FAST_FOR = 0.05, 1.0
_POLL_SHORT, _POLL_SHORT_FOR, _POLL_MAX = 0.25, 20.0, 2.0
# Calls (by the ``what`` they are made with) that can be repeated without harm after a lost connection.
# Creating calls (snapshot, backup, transfer, disk, VM) are not: a retry could create a second one.
_RETRYABLE = ("get ", "list ", "search ", "finalize ", "cancel ", "remove ", "thaw ", "api")
# libcurl's (code, message) inside an SDK error: "(7, 'Failed to connect ...')" when sending, and
# "[(<pycurl.Curl object ...>, 7, 'Failed to connect ...')]" when reading a response.
_CURL_RE = re.compile(r"[(,]\s*(\d+), '([^']*)'\)")


def validate_user(user: str) -> str:
    if not _USER_RE.match(user):
        raise UsageError(f"engine user {user!r} must be in user@domain form, for example admin@internal")
    return user


def api_url(url: str) -> str:
    """The API URL of an engine given as a host, a base URL or the API URL itself."""
    url = url.rstrip("/")
    if "://" not in url:
        url = "https://" + url
    if not url.endswith("/ovirt-engine/api"):
        url += "/ovirt-engine/api"
    return url


@dataclass
class DiskInfo:
    """A disk of a VM as the flows need it."""

    id: str
    alias: str
    size: int  # provisioned (virtual) size
    format: str  # raw | cow
    sparse: bool
    incremental: bool  # backup=incremental enabled (the checkpoint method needs it)
    storage_domain: str | None
    interface: str
    bootable: bool
    image_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Transfer:
    id: str
    transfer_url: str | None
    proxy_url: str | None
    phase: str


class EngineBase:
    """One client of one engine. Its calls may come from several threads once connected (the connection
    serialises requests). With ``session`` it borrows the session's shared, logged-in connection (the
    control plane's, see ``control.engine.session``) and ``close`` only gives it back; without, it logs in
    on ``connect`` and out on ``close``."""

    def __init__(self, url: str, user: str, password: str, ca_file: str | None, timeout: float = 600,
                 session: EngineSession | None = None) -> None:
        self.url = api_url(url)
        self.user = validate_user(user)
        self._password = password
        self.ca_file = ca_file
        self.timeout = timeout  # for one wait on an engine entity
        self._conn: sdk.Connection | None = None
        self._session = session
        self._acquired = False

    # connection

    def connect(self) -> Self:
        """Log in (or borrow the session's connection) and check the API answers (raises AuthError,
        EngineUnreachable)."""
        if self._session is not None:
            return self._connect_shared(self._session)
        with self._errors("login"):
            self._conn = open_connection(self.url, self.user, self._password, self.ca_file)
            self.version()
        log.info("engine connected url=%s user=%s", self.url, self.user)
        return self

    def _connect_shared(self, session: EngineSession) -> Self:
        if not self._acquired:
            session.acquire()  # before the login: a retired session is not closed under us
            self._acquired = True
        with self._errors("login"):
            self._conn, new = session.connection()
        if new or session.version is None:
            # A new login is checked as a private one is; a live session answered moments ago.
            session.set_version(self._conn, self.version())
            log.info("engine connected url=%s user=%s shared=yes", self.url, self.user)
        return self

    def close(self) -> None:
        if self._session is not None:
            self._conn = None
            if self._acquired:
                self._acquired = False
                self._session.release()
            return
        if self._conn is not None:
            close_quietly(self._conn, logout=True, url=self.url)
            self._conn = None

    def _auth_failed(self) -> None:
        """A 401 the SDK's own re-login did not cure: a shared connection is dropped (the next use logs in)."""
        if self._session is not None:
            self._session.drop(self._conn)
            self._conn = None

    def __enter__(self) -> Self:
        return self.connect() if self._conn is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def system(self) -> Any:
        if self._conn is None:
            self.connect()
        assert self._conn is not None
        return self._conn.system_service()

    @contextmanager
    def _errors(self, what: str, kind: str = "object", name: str = "") -> Iterator[None]:
        try:
            yield
        except sdk.AuthError as e:
            self._auth_failed()
            raise AuthError(_short(e), url=self.url, user=self.user) from None
        except sdk.NotFoundError:
            raise NotFound(kind=kind, name=name or what) from None
        except (sdk.ConnectionError, sdk.TimeoutError) as e:
            raise EngineUnreachable(_short(e), url=self.url) from None
        except pycurl.error as e:
            raise EngineUnreachable(_curl_reason(e), url=self.url) from None
        except sdk.Error as e:
            curl = _CURL_RE.search(str(e)) if e.code is None else None
            if curl:
                # The SDK wraps libcurl failures (refused, DNS, TLS) in a plain Error with the curl code.
                raise EngineUnreachable(_curl_text(int(curl.group(1)), curl.group(2)), url=self.url) from None
            if e.code == 409:
                raise EngineConflict(f"{what}: {_short(e)}", url=self.url) from None
            if e.code == 404:
                raise NotFound(kind=kind, name=name or what) from None
            if e.code == 401:
                self._auth_failed()
                raise AuthError(_short(e), url=self.url, user=self.user) from None
            raise EngineError(f"{what}: {_short(e)}", url=self.url) from None

    def call(self, what: str, fn: Callable[[], T], kind: str = "object", name: str = "") -> T:
        """Run one SDK call with errors mapped. Calls that are safe to repeat (reads, finalize, cancel, remove:
        see ``_RETRYABLE``) ride out an engine restart: retried while it is unreachable, up to ``timeout``."""
        deadline = time.monotonic() + self.timeout
        delay = 0.5
        while True:
            try:
                with self._errors(what, kind, name):
                    return fn()
            except EngineUnreachable as e:
                if not what.startswith(_RETRYABLE) or time.monotonic() > deadline:
                    raise
                log.info("engine unreachable, retrying url=%s call=%r reason=%s", self.url, what, e.reason)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def version(self) -> tuple[int, int]:
        if self._session is not None and self._session.version is not None and self._conn is not None:
            return self._session.version
        with self._errors("api"):
            api = self.system.get()
        v = api.product_info.version if api.product_info else None
        if v is None:
            return (4, 0)
        return (int(v.major or 4), int(v.minor or 0))

    # inventory

    def vms(self) -> list[Any]:
        return self.call("list vms", lambda: self.system.vms_service().list())

    def find_vm(self, name_or_id: str, all_content: bool = False, follow: str | None = None) -> Any:
        """The VM with this id or name (NotFound otherwise). It can come with more in the same round trip:
        ``all_content`` its OVF (``ovf_in``), ``follow`` linked objects inlined (the engine's ``follow``, e.g.
        ``disk_attachments.disk`` for ``vm_disks(vm=...)``); a search by name (an exact name: one match as a
        rule) brings them for each match."""
        vms = self.system.vms_service()
        if re.fullmatch(r"[0-9a-fA-F-]{36}", name_or_id):
            try:
                return self.call("get vm", lambda: vms.vm_service(name_or_id).get(all_content=all_content or None,
                                                                                   follow=follow),
                                 "VM", name_or_id)
            except NotFound:
                pass
        found = self.call("search vm", lambda: vms.list(search=f"name={name_or_id}", all_content=all_content or None,
                                                        follow=follow))
        found = [v for v in found if v.name == name_or_id]
        if not found:
            raise NotFound(kind="VM", name=name_or_id)
        return found[0]

    def vm(self, vm_id: str) -> Any:
        return self.call("get vm", lambda: self.system.vms_service().vm_service(vm_id).get(), "VM", vm_id)

    def vm_service(self, vm_id: str) -> Any:
        return self.system.vms_service().vm_service(vm_id)

    def vm_disks(self, vm_id: str, vm: Any = None) -> list[DiskInfo]:
        """The VM's disks with their attachment details, in attachment order. ``vm``: the VM got with
        ``follow="disk_attachments.disk"``, whose inlined attachments and disks save a request per disk and
        one for the list; what it lacks (an engine that did not inline them) is asked for."""
        # Without follow the SDK leaves an empty list with only a link: an empty list is asked for again.
        atts = list(vm.disk_attachments or []) if vm is not None else []
        if not atts:
            atts = self.call("list disk attachments",
                             lambda: self.vm_service(vm_id).disk_attachments_service().list(), "VM", vm_id)
        out = []
        for att in atts:
            inline = att.disk is not None and att.disk.provisioned_size is not None
            d = att.disk if inline else self.disk(att.disk.id)
            out.append(_disk_info(d, att))
        return out

    def disk(self, disk_id: str) -> Any:
        return self.call("get disk", lambda: self.system.disks_service().disk_service(disk_id).get(), "disk", disk_id)

    def clusters(self) -> list[Any]:
        return self.call("list clusters", lambda: self.system.clusters_service().list())

    def hosts(self) -> list[Any]:
        return self.call("list hosts", lambda: self.system.hosts_service().list())

    def storage_domains(self) -> list[Any]:
        return self.call("list storage domains", lambda: self.system.storage_domains_service().list())

    def find_cluster(self, name_or_id: str) -> Any:
        for c in self.clusters():
            if name_or_id in (c.id, c.name):
                return c
        raise NotFound(kind="cluster", name=name_or_id)

    def find_storage_domain(self, name_or_id: str) -> Any:
        for s in self.storage_domains():
            if name_or_id in (s.id, s.name):
                return s
        raise NotFound(kind="storage domain", name=name_or_id)

    def vm_ovf(self, vm_id: str) -> str:
        """The VM's OVF (``all_content`` brings it in ``initialization.configuration``)."""
        vm = self.call("get vm ovf", lambda: self.vm_service(vm_id).get(all_content=True), "VM", vm_id)
        ovf = ovf_in(vm)
        if ovf is None:
            raise EngineError(f"VM {vm.name} has no OVF configuration", url=self.url)
        return ovf

    def has_guest_agent(self, vm: Any) -> bool:
        """A running VM whose guest agent reports itself (the engine fills guest_operating_system then)."""
        return bool(vm.status == types.VmStatus.UP and vm.guest_operating_system is not None)

    # freeze / thaw

    def freeze(self, vm_id: str) -> None:
        self.call("freeze filesystems", lambda: self.vm_service(vm_id).freeze_filesystems(), "VM", vm_id)

    def thaw(self, vm_id: str) -> None:
        self.call("thaw filesystems", lambda: self.vm_service(vm_id).thaw_filesystems(), "VM", vm_id)

    # waiting

    def wait(self, what: str, probe: Callable[[], T], done: Callable[[T], bool],
             failed: Callable[[T], str | None] = lambda _: None, timeout: float | None = None) -> T:
        """Poll ``probe`` until ``done``; EngineError if ``failed`` names a reason or the time runs out."""
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)
        delay = _POLL_FIRST
        while True:
            value = probe()
            reason = failed(value)
            if reason:
                raise EngineError(f"{what}: {reason}", url=self.url)
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise EngineError(f"{what}: timed out after {timeout or self.timeout:.0f}s", url=self.url)
            time.sleep(delay)
            delay = poll_delay(delay, time.monotonic() - start)


def poll_delay(delay: float, waited: float) -> float:
    """The next poll interval after ``delay``, ``waited`` seconds into a wait."""
    if waited < _POLL_FAST_FOR:
        return _POLL_FIRST
    cap = _POLL_SHORT if waited < _POLL_SHORT_FOR else _POLL_MAX
    return min(delay * 1.5, cap) if delay < cap else cap


def ovf_in(vm: Any) -> str | None:
    """The OVF a VM object carries when it was got with ``all_content`` (None otherwise)."""
    conf = vm.initialization.configuration if vm.initialization else None
    return str(conf.data) if conf is not None and conf.data else None


def _disk_info(d: Any, att: Any = None) -> DiskInfo:
    sd = d.storage_domains[0].id if d.storage_domains else None
    return DiskInfo(
        id=d.id, alias=d.alias or d.name or d.id, size=int(d.provisioned_size or 0),
        format=d.format.value if d.format else "raw", sparse=bool(d.sparse),
        incremental=d.backup == types.DiskBackup.INCREMENTAL, storage_domain=sd,
        interface=att.interface.value if att is not None and att.interface else "virtio_scsi",
        bootable=bool(att.bootable) if att is not None else False, image_id=d.image_id)


def _short(e: Exception) -> str:
    """The SDK's message without its multi-line detail (one clear line for the CLI)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _curl_reason(e: pycurl.error) -> str:
    code = e.args[0] if e.args else 0
    msg = e.args[1] if len(e.args) > 1 else str(e)
    return _curl_text(int(code), str(msg))


def _curl_text(code: int, msg: str) -> str:
    if code in (51, 58, 59, 60, 77, 83, 90, 91):  # certificate and TLS set-up failures
        return f"TLS certificate not trusted with the given CA file ({msg})"
    return msg
