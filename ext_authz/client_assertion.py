"""RFC 7523 client authentication: the client proves itself with a short-lived JWT signed
by its private key (`auth_method: private_key_jwt`), so no secret travels to the IdP.

The signing needs the `cryptography` package, imported only here and only when a config
asks for private_key_jwt: a sidecar that never does keeps its dependencies as they are.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from typing import Any

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LIFETIME_S = 60  # an assertion is used once, at once


class KeyProblem(ValueError):
    """Why a private key cannot sign client assertions (said at load time)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=16)
def signing_key(pem: str) -> tuple[Any, str]:
    """(the loaded key, its JWS alg): RSA signs RS256, an EC P-256 key ES256. KeyProblem
    for anything else, or where `cryptography` is missing."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise KeyProblem("private_key_jwt needs the `cryptography` package"
                         " (pip install cryptography)") from None
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise KeyProblem(f"an RSA key of {key.key_size} bits; give at least 2048")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise KeyProblem("neither an RSA key nor an EC P-256 key")


def client_assertion(pem: str, client_id: str, audience: str, key_id: str | None,
                     now: float | None = None) -> str:
    """A signed assertion that this client is `client_id`, for the token endpoint
    `audience`: iss and sub the client, a fresh jti, valid LIFETIME_S seconds."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key, alg = signing_key(pem)
    issued = int(time.time() if now is None else now)
    header: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if key_id is not None:
        header["kid"] = key_id
    claims = {"iss": client_id, "sub": client_id, "aud": audience,
              "jti": secrets.token_urlsafe(16), "iat": issued, "exp": issued + LIFETIME_S}
    signing_input = ".".join(_b64(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims)).encode("ascii")
    if alg == "RS256":
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:  # JWS wants ES256's r and s as 32 bytes each, not DER
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode('ascii')}.{_b64(signature)}"
