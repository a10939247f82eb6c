"""Prometheus collectors, on a registry of their own (one per running service)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Label values are bounded: `server` is a configured server name or "" (unknown servers
# are never echoed into a label, so a client cannot mint time series), `network` and
# `reason` come from fixed sets.
_CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _TokenAges(Collector):
    def __init__(self, ages: Callable[[], dict[str, float]]) -> None:
        self._ages = ages

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mcp_ext_authz_token_age_seconds",
            "Seconds since the cached token of each server was fetched.",
            labels=["server"],
        )
        for server, age in sorted(self._ages().items()):
            family.add_metric([server], age)
        yield family


class Metrics:
    """Every metric the sidecar exports, with cached label children for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.checks = Counter(
            "mcp_ext_authz_checks",
            "Checks answered, by server, caller network and reason code.",
            ["server", "network", "reason"],
            registry=self.registry,
        )
        self.check_duration = Histogram(
            "mcp_ext_authz_check_duration_seconds",
            "Time from receiving a CheckRequest to answering it.",
            buckets=_CHECK_BUCKETS,
            registry=self.registry,
        )
        self.token_fetches = Counter(
            "mcp_ext_authz_token_fetches",
            "Token endpoint requests, by server and outcome (ok or the error class).",
            ["server", "outcome"],
            registry=self.registry,
        )
        self.token_fetch_duration = Histogram(
            "mcp_ext_authz_token_fetch_duration_seconds",
            "Duration of token endpoint requests.",
            ["server"],
            registry=self.registry,
        )
        self.config_generation = Gauge(
            "mcp_ext_authz_config_generation",
            "Generation of the config being served; 1 at start, +1 per successful reload.",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "mcp_ext_authz_config_reloads",
            "Config reload attempts, by outcome (ok or rejected).",
            ["outcome"],
            registry=self.registry,
        )
        self.config_last_reload_ok = Gauge(
            "mcp_ext_authz_config_last_reload_success",
            "1 if the last reload attempt was applied, 0 if it was rejected.",
            registry=self.registry,
        )
        self._check_children: dict[tuple[str, str, str], Counter] = {}

    def count_check(self, server: str, network: str, reason: str, seconds: float) -> None:
        key = (server, network, reason)
        child = self._check_children.get(key)
        if child is None:
            child = self._check_children[key] = self.checks.labels(*key)
        child.inc()
        self.check_duration.observe(seconds)

    def count_token_fetch(self, server: str, outcome: str, seconds: float) -> None:
        self.token_fetches.labels(server, outcome).inc()
        self.token_fetch_duration.labels(server).observe(seconds)

    def watch_token_ages(self, ages: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_TokenAges(ages))
