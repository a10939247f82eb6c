"""The subject of a token exchange: the caller's bearer token, only if it is the very token
Envoy's jwt_authn verified.

Envoy leaves the verified payload in dynamic metadata, where no header reaches; the token
itself comes in the Authorization header, which a caller writes. So the token is exchanged
only when its own payload is the verified one, claim for claim: a second token smuggled in
beside the verified one, or a token Envoy never saw, is refused, never exchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping

from ..policy.subject import Subject


class NoSubject(ValueError):
    """Why the caller's token cannot be exchanged (said to the caller as a 401)."""


def subject_of(authorization: str | None, verified: Mapping[str, object] | None) -> Subject:
    """The exchange's subject: the bearer in `authorization` (the header's value, once), if
    its payload is `verified` (jwt_authn's), with an issuer, a subject and an expiry."""
    if verified is None:
        raise NoSubject("no token verified by Envoy")
    if authorization is None or "," in authorization:
        raise NoSubject("one Authorization header with a bearer token is needed")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise NoSubject("the Authorization header does not carry a bearer token")
    payload = token_payload(token)
    if payload is None:
        raise NoSubject("the bearer token is not a JWT whose payload decodes")
    if not _same(payload, verified):
        raise NoSubject("the bearer token is not the one Envoy verified")
    issuer, subject, expires = payload.get("iss"), payload.get("sub"), payload.get("exp")
    if not isinstance(issuer, str) or not issuer or not isinstance(subject, str) or not subject:
        raise NoSubject("the verified token names no issuer or no subject")
    if isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(
            expires):
        raise NoSubject("the verified token has no expiry")
    return Subject(token, issuer, subject, float(expires))


def token_payload(token: str) -> dict[str, object] | None:
    """A JWT's payload as JSON (its signature unchecked: that is Envoy's), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _same(token: object, verified: object) -> bool:
    """Equal as JSON, numbers by value: Envoy's metadata (a protobuf Struct) holds every
    number as a double, where the token's own JSON has integers."""
    if isinstance(token, bool) or isinstance(verified, bool):
        return token is verified
    if isinstance(token, int | float) and isinstance(verified, int | float):
        return float(token) == float(verified)
    if isinstance(token, dict) and isinstance(verified, Mapping):
        return token.keys() == verified.keys() and all(
            _same(token[k], verified[k]) for k in token)
    if isinstance(token, list) and isinstance(verified, list | tuple):
        return len(token) == len(verified) and all(
            _same(a, b) for a, b in zip(token, verified, strict=True))
    return type(token) is type(verified) and token == verified
