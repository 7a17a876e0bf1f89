"""A disk served by ovirt-imageio over HTTPS as a backup source.

The job gives a ``transfer_url`` (the host's daemon, port 54322) and a ``proxy_url`` (the engine's proxy,
54323), both ``https://.../images/<ticket>``, and the engine CA as PEM. We try the transfer URL first and fall
back to the proxy when the host cannot be reached, as ovirt-imageio's own client does.

Protocol used (ovirt-imageio's images API): ``OPTIONS`` (features, ``max_readers``/``max_writers``),
``GET /extents?context=zero|dirty``, ranged ``GET`` (``Range: bytes=a-b``, answer 206). One
``http.client`` connection per reader: imageio serves one request at a time per connection, so parallel
readers need connections of their own, up to the server's ``max_readers``.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from mover.errors import SourceError
from mover.sources.base import Extent

log = logging.getLogger(__name__)

# Eight is imageio's own default (its client's max_connections, and the nbd backend's max_readers): more
# connections than that gains nothing on one disk and loads the host.
MAX_CONNECTIONS = 8
# Long enough for a slow storage read of one request (a few MiB), short enough that a hung host is noticed.
TIMEOUT = 60.0


def redact(url: str) -> str:
    """The URL with its ticket cut to 8 characters: tickets are secrets and never logged in full."""
    parts = urlsplit(url)
    path = parts.path
    head, _, ticket = path.rpartition("/")
    if ticket:
        path = f"{head}/{ticket[:8]}..."
    return f"{parts.scheme}://{parts.netloc}{path}"


class Endpoint:
    """One imageio URL with the TLS context to reach it; makes connections and speaks the small requests."""

    def __init__(self, url: str, ca_pem: str | None, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SourceError("not an imageio URL", path=redact(url))
        self.url = url
        self.name = redact(url)
        self.path = parts.path
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self.context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            # Verified against the engine CA from the job (never the system store: the engine CA signs hosts).
            self.context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()

    def connect(self) -> http.client.HTTPConnection:
        if self.context is not None:
            con: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.context
            )
        else:
            con = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        con.connect()
        return con

    def request_json(self, con: http.client.HTTPConnection, method: str, suffix: str = "") -> Any:
        """Send a small request, return its JSON body (None for an empty 200/204)."""
        con.request(method, self.path + suffix)
        res = con.getresponse()
        body = res.read()
        if res.status == http.client.NO_CONTENT or (res.status == http.client.OK and not body):
            return None
        if res.status != http.client.OK:
            raise http_error(self, method + suffix, res.status, body)
        try:
            return json.loads(body)
        except ValueError:
            raise SourceError(f"{method}{suffix}: answer is not JSON", path=self.name) from None

    def options(self, con: http.client.HTTPConnection) -> dict[str, Any]:
        """Server options with features flattened: ``{"extents": True, "max_readers": 8, ...}``."""
        try:
            opts = self.request_json(con, "OPTIONS") or {}
        except SourceError as e:
            # Old daemons answer 405 to OPTIONS: no features, one connection.
            if getattr(e, "status", 0) == http.client.METHOD_NOT_ALLOWED:
                return {}
            raise
        for feature in opts.pop("features", []):
            opts[feature] = True
        return dict(opts)


def http_error(ep: Endpoint, what: str, status: int, body: bytes) -> SourceError:
    """One line from an imageio error answer (its body is a short text message)."""
    text = body[:300].decode("utf-8", errors="replace").strip().replace("\n", " ")
    err = SourceError(f"{what}: HTTP {status} {text}", path=ep.name, status=status)
    # A ticket that expired or was removed does not come back; 5xx and timeouts might.
    err.retryable = status >= 500
    return err


def open_endpoint(
    urls: list[str], ca_pem: str | None, timeout: float = TIMEOUT
) -> tuple[Endpoint, http.client.HTTPConnection, dict[str, Any]]:
    """Connect to the first reachable URL (transfer_url, then proxy_url); return it with its options."""
    errors: list[str] = []
    for url in urls:
        ep = Endpoint(url, ca_pem, timeout)
        try:
            con = ep.connect()
        except ssl.SSLCertVerificationError as e:
            errors.append(f"{ep.name}: TLS verification failed ({e.verify_message})")
            continue
        except OSError as e:
            errors.append(f"{ep.name}: {e.strerror or e}")
            continue
        try:
            opts = ep.options(con)
        except BaseException:
            con.close()
            raise
        log.debug("Connected url=%s options=%s", ep.name, opts)
        return ep, con, opts
    err = SourceError("cannot connect: " + "; ".join(errors), path=redact(urls[0]) if urls else "imageio")
    err.retryable = True  # the host or proxy may come back; the worker's bounded redelivery limits this
    raise err


class ImageioReader:
    """One connection doing ranged GETs; used by one thread at a time."""

    def __init__(self, ep: Endpoint, size: int, con: http.client.HTTPConnection | None = None) -> None:
        self._ep = ep
        self._size = size
        self._con: http.client.HTTPConnection | None = con

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; short only at the end of the disk."""
        length = min(len(buf), self._size - offset)
        if length <= 0:
            return 0
        for attempt in (1, 2):
            try:
                return self._get(offset, buf[:length])
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A keep-alive connection the server closed while idle: reconnect once.
                self.close()
                if attempt == 2:
                    raise SourceError(f"read at offset {offset}: {e}", path=self._ep.name, retryable=True) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise SourceError(f"read at offset {offset}: {e}", path=self._ep.name, retryable=True) from None
        raise AssertionError("unreachable")

    def _get(self, offset: int, view: memoryview) -> int:
        if self._con is None:
            self._con = self._ep.connect()
        length = len(view)
        self._con.request("GET", self._ep.path, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        res = self._con.getresponse()
        if res.status != http.client.PARTIAL_CONTENT:
            raise http_error(self._ep, f"GET at offset {offset}", res.status, res.read())
        got = int(res.getheader("content-length") or -1)
        if got != length:
            res.read()
            raise SourceError(f"asked {length} bytes at {offset}, server sends {got}", path=self._ep.name)
        pos = 0
        while pos < length:
            n = res.readinto(view[pos:])
            if not n:
                raise SourceError(f"connection closed at {offset + pos} of {offset + length}", path=self._ep.name)
            pos += n
        return length

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class ImageioSource:
    """A disk behind an imageio ticket, read by several connections at once.

    ``spec`` is the job's source description (see ``mover.jobs.ExportJob``). ``dirty`` asks for the dirty
    extents of the backup (``/extents?context=dirty``); without it, ``extents("dirty")`` marks everything.
    ``shallow`` (snapshot method): the transfer serves one qcow2 layer, so its holes (``"hole": true``,
    clusters the layer does not hold) are unchanged since the base and everything else is dirty.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        dirty: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = TIMEOUT,
        shallow: bool = False,
    ) -> None:
        if spec.get("format", "raw") != "raw":
            # A cow transfer hands out qcow2 bytes, not the guest's view of the disk.
            raise SourceError("the mover reads raw transfers only (format=raw)", path=redact(spec["transfer_url"]))
        urls = [spec["transfer_url"]] + ([spec["proxy_url"]] if spec.get("proxy_url") else [])
        self._ep, con, opts = open_endpoint(urls, spec.get("ca_pem"), timeout)
        self._size = int(spec["size"])
        self._dirty = dirty
        self._shallow = shallow
        self._can_extents = bool(opts.get("extents"))
        self._max_readers = max(1, min(int(opts.get("max_readers", 1)), max_connections))
        # The connection that read OPTIONS becomes the first reader, so a one-reader server is not asked twice.
        self._spare: ImageioReader | None = ImageioReader(self._ep, self._size, con)
        self._lock = threading.Lock()
        self._extents: dict[str, list[Extent]] = {}
        log.info("Open imageio source url=%s size=%d max_readers=%d", self._ep.name, self._size, self._max_readers)

    @property
    def name(self) -> str:
        return self._ep.name

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_readers(self) -> int:
        return self._max_readers

    @property
    def url(self) -> str:
        """The URL in use (transfer or proxy), redacted."""
        return self._ep.name

    def extents(self, context: str = "zero") -> Iterator[Extent]:
        """Extents covering the disk; ``dirty`` marks changed ranges (all dirty unless the job asked for them)."""
        if context not in ("zero", "dirty"):
            raise SourceError(f"unknown extents context {context!r}", path=self.name)
        if context == "dirty" and self._shallow:
            if "shallow" not in self._extents:
                self._extents["shallow"] = self._fetch("zero", shallow=True)
            yield from self._extents["shallow"]
            return
        if context == "dirty" and not self._dirty:
            # A full read: every range counts as changed, zeros still known from the zero extents.
            yield from self.extents("zero")
            return
        if context not in self._extents:
            self._extents[context] = self._fetch(context)
        yield from self._extents[context]

    def _fetch(self, context: str, shallow: bool = False) -> list[Extent]:
        if not self._can_extents:
            if shallow:
                raise SourceError("server has no extents: a shallow read cannot tell the layer's clusters",
                                  path=self.name)  # fmt: skip
            if context == "dirty":
                raise SourceError("server has no extents: dirty extents unavailable", path=self.name)
            return [Extent(0, self._size)]
        with self._lock:
            con = self._ep.connect()
        try:
            items = self._ep.request_json(con, "GET", f"/extents?context={context}")
        finally:
            con.close()
        return _parse_extents(items, context, self._size, self.name, shallow)

    def reader(self) -> ImageioReader:
        with self._lock:
            spare, self._spare = self._spare, None
        return spare or ImageioReader(self._ep, self._size)

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare:
            spare.close()


def _parse_extents(items: Any, context: str, size: int, name: str, shallow: bool = False) -> list[Extent]:
    """Check imageio's extents answer: a list covering [0, size) in order.

    ``shallow``: zero extents of one layer, where ``hole`` marks clusters the layer does not hold: those
    are unchanged (``dirty=False``), the rest changed.
    """
    if not isinstance(items, list):
        raise SourceError(f"extents ({context}): expected a list", path=name)
    out: list[Extent] = []
    pos = 0
    for item in items:
        try:
            start, length = int(item["start"]), int(item["length"])
            zero = bool(item.get("zero", False))
            if context == "dirty":
                dirty = bool(item.get("dirty", True))
            else:
                dirty = not bool(item.get("hole", False)) if shallow else True
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"extents ({context}): bad item {str(item)[:80]}", path=name) from None
        if start != pos or length <= 0:
            raise SourceError(f"extents ({context}): gap or overlap at {pos}", path=name)
        out.append(Extent(start, length, zero=zero, dirty=dirty))
        pos += length
    if pos != size:
        raise SourceError(f"extents ({context}) end at {pos}, disk size is {size}", path=name)
    return out


def open_imageio(spec: dict[str, Any], **options: Any) -> ImageioSource:
    """Open an imageio source from a job's source description (its ``dirty`` and ``shallow`` flags)."""
    return ImageioSource(spec, dirty=bool(spec.get("dirty")), shallow=bool(spec.get("shallow")), **options)
