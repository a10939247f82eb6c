"""One JSON line per check: what was decided and why; never a token, header value or secret."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import TextIO

from ..policy.config import DecisionLogSettings
from ..policy.decision import Decision, RequestFacts
from ..policy.memo import PerDecision

# Lines are buffered and flushed at most this long after they were written (the sidecar
# also flushes on a timer and at shutdown): one write syscall per check would cost more
# than the rest of the check.
FLUSH_INTERVAL_S = 0.25
_quote = json.encoder.encode_basestring_ascii


def _fragment(decision: Decision) -> str:
    # The fields that repeat from check to check, encoded once per decision.
    client = decision.client.address
    return json.dumps({
        "server": decision.server_name,
        "client_ip": str(client) if client is not None else None,
        "client_ip_source": decision.client.source,
        "network": decision.network,
        "peer": decision.peer[:64],
        "reason": decision.reason,
        "allowed": decision.allowed,
        "renamed": decision.renamed,  # a hidden item's use went on under a fresh name
        "http_status": decision.http_status,
        "tool": decision.tool,  # a configured tool, or "": never a name a client made up
        "item": decision.item,  # a configured prompt or resource ("prompts.NAME"), or ""
        "rule": decision.rule,
    }, separators=(",", ":"))[1:-1]


def stamp(at: float) -> str:
    """A decision's time as the log writes it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def decision_line(at: str, decision: Decision, decision_id: str, facts: RequestFacts,
                  latency_s: float, phase: str, fragment: str | None = None,
                  subject: str = "") -> str:
    """One decision as the log's JSON line (without its newline): the only place its fields
    are chosen, for the log and the status page's recent decisions alike."""
    # Capped: X-Forwarded-For and the path are whatever the client sent; the query string
    # is dropped because it may carry credentials.
    xff = facts.x_forwarded_for
    path = facts.path.split("?", 1)[0][:256]
    line = (
        f'{{"time":"{at}","decision_id":"{decision_id}","phase":"{phase}",'
        f"{_fragment(decision) if fragment is None else fragment},"
        f'"x_forwarded_for":{_quote(xff[:256]) if xff else "null"},'
        f'"path":{_quote(path)},"latency_ms":{latency_s * 1000:.3f}'
    )
    if decision.detail:
        line += f',"detail":{_quote(decision.detail)}'
    if decision.placement.matched:
        # What placed the caller by who it is ("agents by principal spiffe://..."): a claim
        # is named with the value that matched the rule, no other claim is logged.
        line += f',"principal":{_quote(facts.identity.principal[:256])}'
        line += f',"identity":{_quote("; ".join(decision.placement.matched))}'
    if subject:  # the exchanged token's user, where decision_log.include_subject says so
        line += f',"sub":{_quote(subject[:256])}'
    return line + "}"


class DecisionLog:
    """Write sampled decisions as JSON lines to a stream.

    Denials are always written; allowed checks are written with probability
    `sample_allowed`, so a busy gateway can keep the log to what needs a look.
    """

    def __init__(self, stream: TextIO | None = None, *, sample_allowed: float = 1.0) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._owned = False
        self._sample_allowed = sample_allowed
        self._second = -1
        self._stamp = ""
        self._last_flush = time.monotonic()
        self._fragments = PerDecision(_fragment)

    @classmethod
    def from_settings(cls, settings: DecisionLogSettings) -> DecisionLog | None:
        """Open the configured log (None when disabled); a file is appended to."""
        if not settings.enabled:
            return None
        if settings.path is None:
            return cls(sample_allowed=settings.sample_allowed)
        log = cls(settings.path.open("a"), sample_allowed=settings.sample_allowed)
        log._owned = True
        return log

    def wants(self, decision: Decision) -> bool:
        if not decision.allowed or self._sample_allowed >= 1.0:
            return True
        return self._sample_allowed > 0 and random.random() < self._sample_allowed

    def write(
        self, decision: Decision, decision_id: str, facts: RequestFacts, latency_s: float,
        phase: str = "check", subject: str = "",
    ) -> None:
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = stamp(now)
        self._stream.write(decision_line(self._stamp, decision, decision_id, facts, latency_s,
                                         phase, self._fragments[decision], subject) + "\n")
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        self._stream.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()
