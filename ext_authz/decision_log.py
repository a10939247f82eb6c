"""One JSON line per check: what was decided and why; never a token, header value or secret."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import TextIO

from .config import DecisionLogSettings
from .decision import Decision, RequestFacts


class DecisionLog:
    """Write sampled decisions as JSON lines to a stream.

    Denials are always written; allowed checks are written with probability
    `sample_allowed`, so a busy gateway can keep the log to what needs a look.
    """

    def __init__(self, stream: TextIO | None = None, *, sample_allowed: float = 1.0) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._owned = False
        self._sample_allowed = sample_allowed

    @classmethod
    def from_settings(cls, settings: DecisionLogSettings) -> DecisionLog | None:
        """Open the configured log (None when disabled); a file is appended to."""
        if not settings.enabled:
            return None
        if settings.path is None:
            return cls(sample_allowed=settings.sample_allowed)
        log = cls(settings.path.open("a", buffering=1), sample_allowed=settings.sample_allowed)
        log._owned = True
        return log

    def close(self) -> None:
        if self._owned:
            self._stream.close()

    def wants(self, decision: Decision) -> bool:
        if not decision.allowed or self._sample_allowed >= 1.0:
            return True
        return self._sample_allowed > 0 and random.random() < self._sample_allowed

    def write(
        self, decision: Decision, decision_id: str, facts: RequestFacts, latency_s: float
    ) -> None:
        client = decision.client.address
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "decision_id": decision_id,
            "server": decision.server_name,
            "client_ip": str(client) if client is not None else None,
            "client_ip_source": decision.client.source,
            "network": decision.network,
            # Capped: these are the free-form fields (XFF is whatever the client sent).
            "peer": facts.peer[:64],
            "x_forwarded_for": facts.x_forwarded_for[:256] if facts.x_forwarded_for else None,
            "path": facts.path.split("?", 1)[0][:256],
            "reason": decision.reason,
            "allowed": decision.allowed,
            "http_status": decision.http_status,
            "latency_ms": round(latency_s * 1000, 3),
        }
        if decision.detail:
            record["detail"] = decision.detail
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()
