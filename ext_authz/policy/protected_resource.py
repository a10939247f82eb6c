"""What the gateway says, as the resource server, of a server whose callers' tokens it
exchanges: its RFC 9728 metadata, and the challenge of a 401 (pure, no I/O).

To its callers such a server is the gateway's: they bring a token of the `jwt` issuer for
it, never one of the upstream's own IdP, so the document names that issuer, and the
challenge points at the document (RFC 9728 5.1).
"""

from __future__ import annotations

import json

from ..contract import PROTECTED_RESOURCE
from .compile import ServerPolicy


def resource_url(origin: str, server: ServerPolicy) -> str:
    """The server's URL at the gateway, as the caller addresses it."""
    assert server.address is not None
    return origin + (server.address.path or "/")


def metadata_url(origin: str, server: ServerPolicy) -> str:
    """Where the server's metadata is at the gateway (RFC 9728 3.1)."""
    assert server.address is not None
    return origin + PROTECTED_RESOURCE + (server.address.path or "")


def metadata_body(origin: str, server: ServerPolicy, issuer: str) -> bytes:
    """The server's protected-resource metadata: the gateway's URL of it, and the issuer
    whose tokens the gateway takes (and exchanges) for it."""
    return json.dumps({"resource": resource_url(origin, server),
                       "authorization_servers": [issuer],
                       "bearer_methods_supported": ["header"]},
                      separators=(",", ":")).encode()


def challenge(origin: str | None, server: ServerPolicy, token_given: bool) -> str:
    """The WWW-Authenticate of a 401 for this server: `invalid_token` where a token came
    (RFC 6750 3.1: none where none did), and the metadata URL where the origin is known."""
    params = []
    if token_given:
        params.append('error="invalid_token"')
    if origin is not None:
        params.append(f'resource_metadata="{metadata_url(origin, server)}"')
    return "Bearer" + (" " + ", ".join(params) if params else "")
