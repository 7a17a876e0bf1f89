"""Tests of lab.pki: certificates the lab CA issues are accepted by a real TLS handshake."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from lab.errors import LabError
from lab.pki import CA


def _handshake(ca: CA, cert: Path, key: Path, server_hostname: str) -> str:
    """Serve TLS with cert/key on loopback and connect trusting only the CA; return the peer's CN."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = lsock.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")
        except (OSError, ssl.SSLError) as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        cctx = ssl.create_default_context(cafile=str(ca.cert_path))
        with socket.create_connection(("127.0.0.1", port)) as raw, cctx.wrap_socket(
            raw, server_hostname=server_hostname
        ) as s:
            assert s.recv(2) == b"ok"
            peer: Any = s.getpeercert()
            return str(dict(x[0] for x in peer["subject"])["commonName"])
    finally:
        t.join(5)
        lsock.close()


def test_issue_and_verify(tmp_path: Path) -> None:
    ca = CA.create(tmp_path / "ca")
    cert, key = ca.issue("engine", tmp_path / "certs")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert _handshake(ca, cert, key, "127.0.0.1") == "127.0.0.1"
    assert _handshake(ca, cert, key, "localhost") == "127.0.0.1"


def test_wrong_hostname_rejected(tmp_path: Path) -> None:
    ca = CA.create(tmp_path / "ca")
    cert, key = ca.issue("host1", tmp_path, hosts=("127.0.0.1",))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca, cert, key, "engine.example.com")


def test_other_ca_rejected(tmp_path: Path) -> None:
    ca = CA.create(tmp_path / "ca")
    other = CA.create(tmp_path / "other")
    cert, key = other.issue("x", tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca, cert, key, "127.0.0.1")


def test_load_roundtrip(tmp_path: Path) -> None:
    ca = CA.create(tmp_path)
    again = CA.load(tmp_path)
    assert again.cert == ca.cert
    cert, key = again.issue("later", tmp_path / "c")
    assert _handshake(ca, cert, key, "127.0.0.1") == "127.0.0.1"


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="cannot load CA"):
        CA.load(tmp_path / "nope")
