"""The config generation every edge serves, and the record of what they decide.

Owned by no servicer: ext_authz, ext_proc and the reload all read or swap the same one, so
that a body decision is one more line of the same record, under the same decision ids.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

from ..ops.decision_log import DecisionLog
from ..ops.metrics import Metrics, Phase
from ..ops.recent import RecentDecisions
from ..policy.compile import Policy
from ..policy.config import Config
from ..policy.decision import Decision, RequestFacts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Generation:
    """One config generation, compiled; swapped whole on reload."""

    config: Config
    policy: Policy
    generation: int  # 1, then one more per reload

    @classmethod
    def build(cls, config: Config, generation: int) -> Generation:
        return cls(config, Policy.from_config(config), generation)


class Serving:
    """The generation being served, the decision ids, and the record of each decision."""

    def __init__(self, state: Generation, metrics: Metrics,
                 decision_log: DecisionLog | None = None) -> None:
        self.state = state
        self.metrics = metrics
        self.decision_log = decision_log
        self.recent = RecentDecisions()  # for the status page: every decision, the last few
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def next_decision_id(self) -> str:
        """A decision id unique to this process: its random prefix and a counter."""
        return f"{self._prefix}-{next(self._ids)}"

    def record(
        self, decision: Decision, decision_id: str, facts: RequestFacts, seconds: float,
        phase: Phase = "check", *, subject: str = "",
    ) -> None:
        """Count a decision in the metrics and write it to the decision log (if sampled);
        `subject`: the `sub` of the caller whose token was exchanged, where the log names it."""
        try:
            self.metrics.count_check(
                decision.server_name or "", decision.network, decision.reason, decision.tool,
                seconds, phase)
            if self.decision_log is not None and self.decision_log.wants(decision):
                self.decision_log.write(decision, decision_id, facts, seconds, phase, subject)
            self.recent.add(decision, decision_id, facts, seconds, phase, subject)
        except Exception:  # observability must never turn an answer into an RPC error
            log.exception("recording check %s failed", decision_id)
