"""Mutual TLS for a scheduler on the internet: a cluster CA, its certificates, and the
join token that carries a worker's share of them.

A Dask scheduler reachable without mutual TLS runs code for anyone who connects. Dask's
TLS always verifies both ends against the CA and never checks hostnames, so
``tls://bore.pub:PORT`` works through a tunnel.
One CA per cluster lives in ``batch-router.tls.dir``; rotating it revokes every token
ever printed, since their certificates no longer chain to it.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN_PREFIX = "brt1."
ROLES = ("scheduler", "worker", "client")
VALID_DAYS = 365


class TokenError(ValueError):
    """A join token that is not one, or is damaged."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpu-batch-router"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, ca: bool, hosts: list[str]
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class Credentials:
    """PEM strings: Dask's Security accepts them in place of file paths."""

    ca: str
    cert: str
    key: str


@dataclass
class ClusterCA:
    """The CA and the three role certificates, as files in ``directory`` (keys 0600)."""

    directory: Path

    @classmethod
    def ensure(cls, directory: str | os.PathLike, hosts: list[str] | None = None, rotate: bool = False) -> "ClusterCA":
        """Load the cluster's CA, creating it (or replacing it, with ``rotate``) first."""
        ca = cls(Path(directory).expanduser())
        if rotate or not (ca.directory / "ca.pem").exists():
            ca.create(hosts or [])
        return ca

    def create(self, hosts: list[str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue("batch-router cluster CA", ca_key, _name("batch-router cluster CA"), ca_key, True, [])
        self._write("ca.key", _pem_key(ca_key), private=True)
        self._write("ca.pem", _pem_cert(ca_cert), private=False)
        names = sorted({"localhost", "127.0.0.1", *hosts})
        for role in ROLES:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(f"batch-router {role}", key, ca_cert.subject, ca_key, False, names if role == "scheduler" else [])
            self._write(f"{role}.key", _pem_key(key), private=True)
            self._write(f"{role}.pem", _pem_cert(cert), private=False)

    def _write(self, name: str, text: str, private: bool) -> None:
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def credentials(self, role: str) -> Credentials:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        read = lambda n: (self.directory / n).read_text()  # noqa: E731
        return Credentials(read("ca.pem"), read(f"{role}.pem"), read(f"{role}.key"))

    def security(self, role: str):
        """Dask Security for one role, encryption required (no plaintext peers)."""
        return security_for(role, self.credentials(role))


def security_for(role: str, creds: Credentials):
    from distributed.security import Security

    kw = {f"tls_{role}_cert": creds.cert, f"tls_{role}_key": creds.key}
    return Security(tls_ca_file=creds.ca, require_encryption=True, **kw)


def make_token(address: str, creds: Credentials) -> str:
    """One copy-pasteable string: the public scheduler address and a worker's credentials,
    nothing more (not the CA key, not the scheduler's key)."""
    if not address.startswith("tls://"):
        raise ValueError(f"a join token needs a tls:// address, not {address!r}")
    body = json.dumps({"address": address, "ca": creds.ca, "cert": creds.cert, "key": creds.key}).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip("=")


def read_token(token: str) -> tuple[str, Credentials]:
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise TokenError("not a batch-router join token (it should start with 'brt1.'): copy the whole JOIN_TOKEN= value")
    data = token[len(TOKEN_PREFIX) :]
    try:
        body = json.loads(zlib.decompress(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))))
        return body["address"], Credentials(body["ca"], body["cert"], body["key"])
    except Exception as e:
        raise TokenError(f"damaged join token ({type(e).__name__}): copy it again, whole, from the scheduler's output") from None
