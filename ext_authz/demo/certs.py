"""Certificates made where they are used (never committed keys): a CA, and the leaf
certificates it signs, written as PEM files. The compose stack's mTLS between Envoy and the
sidecar comes from here (`python -m ext_authz.demo certs`), and so do the tests'.

Needs `cryptography` (the `mcp` extra brings it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str) -> x509.GeneralName:
    if name.startswith("spiffe://"):
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


class Authority:
    """A CA that issues leaf certificates into a folder; its own key stays in memory."""

    def __init__(self, directory: Path, name: str = "test ca",
                 lifetime: datetime.timedelta = datetime.timedelta(days=1)) -> None:
        self.directory = directory
        self.now = datetime.datetime.now(datetime.UTC)
        self.lifetime = lifetime
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.pem())

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, stem: str, names: tuple[str, ...], *, client: bool,
              directory: Path | None = None) -> tuple[Path, Path]:
        """A certificate naming `names` (DNS, IP or spiffe:// URI SANs): (cert, key) paths,
        `stem.pem` and `stem.key` (the key readable by its owner only)."""
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stem)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + self.lifetime)
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        folder = directory or self.directory
        paths = folder / f"{stem}.pem", folder / f"{stem}.key"
        paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, paths[1])
        return paths


def parse_party(text: str) -> tuple[str, int | None]:
    """`NAME` or `NAME:UID` (the uid that will own NAME's folder)."""
    name, _, uid = text.partition(":")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{text!r}: expected NAME or NAME:UID")
    try:
        return name, int(uid) if uid else None
    except ValueError:
        raise ValueError(f"{text!r}: the uid after ':' is not a number") from None


def make_pair(directory: Path, server: tuple[str, int | None],
              client: tuple[str, int | None], days: int, admin_token: bool = False) -> bool:
    """A fresh CA, a server certificate naming `server` and a client one for `client`, each
    in a folder of its own with the CA (`NAME/ca.pem`, `NAME/NAME.pem`, `NAME/NAME.key`),
    owned by the uid given: each party reads its own key and no other. With `admin_token`,
    the server's folder also holds `admin-token` (its status page's). False, and nothing
    written, if both folders are already there (a restarted stack keeps its certificates)."""
    folders = [directory / name for name, _ in (server, client)]
    if all((folder / f"{folder.name}.key").is_file() for folder in folders):
        return False
    authority = Authority(directory, "mcp-ext-authz demo ca", datetime.timedelta(days=days))
    authority.path.unlink()  # each party's folder holds its own copy
    for (name, uid), folder, is_client in zip((server, client), folders, (False, True),
                                              strict=True):
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / "ca.pem").write_bytes(authority.pem())
        authority.issue(name, (name,), client=is_client, directory=folder)
        if admin_token and not is_client:
            descriptor = os.open(folder / "admin-token", os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
        if uid is not None:
            for path in (folder, *folder.iterdir()):
                os.chown(path, uid, uid)
    return True
