"""The lab's certificate authority: a self-signed CA and the server certificates it issues.

A real engine has its own CA (``/etc/pki/ovirt-engine/ca.pem``) that signs the engine's HTTPS certificate and
every host's vdsm and imageio certificates; clients trust that one CA. The lab does the same with
``cryptography`` so the real ``ovirtsdk4`` and ``ovirt_imageio.client`` verify TLS as they would in production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab.errors import LabError

# Long enough for any lab run, short enough that nobody mistakes these for real credentials.
VALIDITY = datetime.timedelta(days=365)
# Clocks of test machines drift; a certificate valid from "now" can be rejected as not yet valid.
BACKDATE = datetime.timedelta(days=1)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Written 0600 from the start: a key must never be readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CA:
    """A certificate authority kept as ``ca.pem`` and ``ca.key`` in a directory."""

    def __init__(self, dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.dir = Path(dir)
        self.cert = cert
        self.key = key

    @property
    def cert_path(self) -> Path:
        """Path of the CA certificate (PEM), the file clients trust."""
        return self.dir / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.dir / "ca.key"

    @classmethod
    def create(cls, dir: Path | str, name: str = "Ferry Lab CA") -> CA:
        """Create a new self-signed CA in ``dir`` (created if missing) and return it."""
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry Lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(d, cert, key)
        _write_key(ca.key_path, key)
        ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    @classmethod
    def load(cls, dir: Path | str) -> CA:
        """Load the CA kept in ``dir``; LabError when it is missing or unreadable."""
        d = Path(dir)
        try:
            cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
            key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise LabError(f"cannot load CA from {d}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise LabError(f"CA key in {d} is not an EC key")
        return cls(d, cert, key)

    def issue(
        self, name: str, dir: Path | str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> tuple[Path, Path]:
        """Issue a server certificate for ``hosts``; write ``<name>.pem`` and ``<name>.key`` in ``dir``.

        Returns (cert_path, key_path). The certificate carries every host as a subjectAltName, since
        Python's ssl and libcurl check the SAN, not the common name.
        """
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry Lab"),
                x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else name),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = d / f"{name}.pem"
        key_path = d / f"{name}.key"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path
