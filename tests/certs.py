"""Test certificates made at test time (never committed keys): a CA, a server, a client."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ext_authz.demo.certs import Authority


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")
               ) -> CertFiles:
    """A CA, and a server and a client certificate it signed, naming `names` (DNS or IP)."""
    authority = Authority(directory)
    server = authority.issue("server", names, client=False)
    client = authority.issue("client", names, client=True)
    return CertFiles(authority.path, *server, *client)
