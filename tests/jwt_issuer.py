"""A JWT issuer for the tests: an RSA key, its JWKS, RS256 tokens signed on demand (the
callers' tokens Envoy's jwt_authn verifies)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """An RS256 JWT issuer: its key, its JWKS, tokens signed on demand."""

    def __init__(self, kid: str, issuer: str, audience: str) -> None:
        self.kid, self.issuer, self.audience = kid, issuer, audience
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64(numbers.e.to_bytes(3, "big"))}]}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "sub": "someone", "iat": now,
                   "exp": now + 600, **claims}
        head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": self.kid}).encode())
        body = b64(json.dumps(payload).encode())
        signature = self.key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(),
                                  hashes.SHA256())
        return f"{head}.{body}.{b64(signature)}"
