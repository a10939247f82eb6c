"""The subject of a token exchange, and the key its exchanged token is cached under (pure)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .config import TokenExchangeSettings


@dataclass(frozen=True, slots=True)
class Subject:
    """The caller, as Envoy's jwt_authn vouched for it: its bearer token, and the verified
    payload's `iss`, `sub` and `exp` (seconds since the epoch)."""

    token: str = field(repr=False)
    issuer: str
    subject: str
    expires_at: float


def exchange_key(settings: TokenExchangeSettings, subject: Subject) -> str:
    """The cache key of a subject's exchanged token: a digest of who (iss, sub) and of every
    setting that shapes the token. Neither token nor secret is in it, or recoverable."""
    parts = (subject.issuer, subject.subject, *settings.exchange_parts)
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
