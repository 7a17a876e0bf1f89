"""The engine's HTTPS server: a threaded ``http.server`` with TLS per connection and a small router.

Handlers take ``(request, **path_params)`` and return a :class:`Reply`; they raise :class:`HttpError` for
faults, which become ``<fault>`` bodies as the real engine sends them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("lab.engine.http")

API_PREFIX = "/ovirt-engine/api"


@dataclass
class Request:
    """One HTTP request, as handlers see it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    user: str = ""

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query parameter (``all_content=true``) or its header form (``All-Content: true``)."""
        v = self.query.get(name)
        if v is None:
            v = self.headers.get(name.replace("_", "-").lower())
        if v is None:
            return default
        return v.lower() == "true"


@dataclass
class Reply:
    """What a handler answers: status, body and content type."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/xml;charset=UTF-8"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """A fault answer: 404 for unknown ids, 409 for conflicts, 400 for bad input."""

    def __init__(self, status: int, detail: str, reason: str = "Operation Failed") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(obj).encode(), "application/json")


Handler = Callable[..., Reply]


class Router:
    """Routes ``(method, path)`` to handlers; patterns use ``{name}`` for one path segment."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern.strip("/")) + "$"
        self._routes.append((method, re.compile(regex), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The handler and path params; HttpError 405 when the path exists for another method."""
        path = path.strip("/")
        other = False
        for m, regex, handler in self._routes:
            match = regex.match(path)
            if match:
                if m == method:
                    return handler, match.groupdict()
                other = True
        if other:
            raise HttpError(405, f"Method {method} not allowed on {path}")
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on, the body waited for the client's
    # delayed ACK, ~40 ms per request on a kept-alive connection. A real engine's front end (Apache httpd)
    # sets TCP_NODELAY; so does the lab.
    disable_nagle_algorithm = True
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP client=%s %s", self.client_address[0], format % args)

    def _serve(self) -> None:
        url = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        req = Request(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            reply = self.server.dispatch(req)
        except HttpError as e:
            reply = self.server.fault(e)
        except Exception as e:  # a bug in the lab must not kill the connection silently
            log.exception("Handler failed method=%s path=%s", req.method, req.path)
            reply = self.server.fault(HttpError(500, f"lab engine error: {e}"))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


class Server(ThreadingHTTPServer):
    """Threaded HTTPS server; the TLS handshake runs in the connection's thread, not in accept()."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        dispatch: Callable[[Request], Reply],
        fault: Callable[[HttpError], Reply],
    ) -> None:
        self._context = context
        self.dispatch = dispatch
        self.fault = fault
        super().__init__(("127.0.0.1", port), _Handler)
        self._thread: threading.Thread | None = None
        # Open connections, cut on stop: a restarted engine must not keep serving old keep-alive
        # connections (a real engine restart drops them, and clients must log in again).
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(60)
        try:
            tls = self._context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake failed client=%s error=%s", client_address[0], e)
            return
        with self._conns_lock:
            self._conns.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            with self._conns_lock:
                self._conns.discard(tls)
            try:
                tls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tls.close()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="engine-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(5)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
