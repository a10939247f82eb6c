"""The last decisions, for the status page: the decision log's own lines, kept in memory.

Kept as the decisions themselves (a reference each: the hot path only appends) and written
as the log writes them when the page asks, so that the page shows the log's fields and
nothing more.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from ..policy.decision import Decision, RequestFacts
from .decision_log import decision_line, stamp

RECENT_DECISIONS = 200
FILTERS = ("server", "network", "reason")


class RecentDecisions:
    """The last `size` decisions, newest last."""

    def __init__(self, size: int = RECENT_DECISIONS) -> None:
        self._entries: deque[tuple[float, Decision, str, RequestFacts, float, str, str]] = deque(
            maxlen=size)

    def add(self, decision: Decision, decision_id: str, facts: RequestFacts,
            latency_s: float, phase: str, subject: str = "") -> None:
        self._entries.append((time.time(), decision, decision_id, facts, latency_s, phase,
                              subject))

    def records(self, **wanted: str) -> list[dict[str, Any]]:
        """The decisions as log records, newest first, those whose `server`, `network` and
        `reason` equal the values given (an empty value matches any)."""
        found = []
        for at, decision, decision_id, facts, latency_s, phase, subject in reversed(
                self._entries):
            record = json.loads(decision_line(stamp(at), decision, decision_id, facts,
                                              latency_s, phase, subject=subject))
            if all(not value or str(record.get(key) or "") == value
                   for key, value in wanted.items() if key in FILTERS):
                found.append(record)
        return found
