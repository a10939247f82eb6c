"""Prometheus collectors, on a registry of their own (one per running service)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Label values are bounded: `server` and `tool` are configured names or "" (names a client
# sends are never echoed into a label, so a client cannot mint time series); `network` is a
# configured network name or "external", and `reason` comes from a fixed set.
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


# Where a decision was made: an ext_authz Check, or ext_proc's reading of a request body.
Phase = Literal["check", "body"]


class _CheckStats(Collector):
    """Decisions by (server, network, reason, tool) and their latency histogram.

    Counted with plain ints rather than prometheus-client's locked values: every check and
    every scrape runs on the one event loop thread, and this is the hot path.
    """

    def __init__(self, buckets: tuple[float, ...], name: str, what: str) -> None:
        self.name = name
        self.what = what
        self.bounds = buckets
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self.buckets = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        checks = CounterMetricFamily(
            f"mcp_ext_authz_{self.name}s",
            f"{self.what} answered, by server, caller network, reason code and configured tool.",
            labels=["server", "network", "reason", "tool"],
        )
        for labels, count in sorted(self.counts.items()):
            checks.add_metric(list(labels), count)
        yield checks
        cumulative, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        duration = HistogramMetricFamily(
            f"mcp_ext_authz_{self.name}_duration_seconds",
            f"Time from receiving {self.what.lower()} to answering it.",
        )
        duration.add_metric([], cumulative, self.sum)
        yield duration


class Metrics:
    """Every metric the sidecar exports, with cached label children for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._stats = {
            "check": _CheckStats(_CHECK_BUCKETS, "check", "CheckRequests"),
            # ext_proc's tool-rule decisions on request bodies (envoy-config's tool routes).
            "body": _CheckStats(_CHECK_BUCKETS, "body_check", "Request bodies"),
        }
        for stats in self._stats.values():
            self.registry.register(stats)
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
        self.token_exchanges = Counter(
            "mcp_ext_authz_token_exchanges",
            "Requests for an exchanged (per-user) token, by server and outcome: hit (held),"
            " miss (exchanged now) or failure. Never by user.",
            ["server", "outcome"],
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

        self.xds_streams = Gauge(
            "mcp_ext_authz_xds_streams",
            "Envoy xDS streams open to this sidecar (native data path).",
            registry=self.registry,
        )
        self.xds_pushes = Counter(
            "mcp_ext_authz_xds_pushes",
            "xDS responses sent to Envoy, by resource type (listener, cluster, secret).",
            ["type"],
            registry=self.registry,
        )
        self.xds_rejections = Counter(
            "mcp_ext_authz_xds_rejections",
            "xDS responses Envoy rejected (NACK), by resource type; it keeps what it had.",
            ["type"],
            registry=self.registry,
        )

    def count_check(self, server: str, network: str, reason: str, tool: str,
                    seconds: float, phase: Phase = "check") -> None:
        stats = self._stats[phase]
        key = (server, network, reason, tool)
        stats.counts[key] = stats.counts.get(key, 0) + 1
        stats.buckets[bisect_left(stats.bounds, seconds)] += 1
        stats.sum += seconds

    def count_token_fetch(self, server: str, outcome: str, seconds: float) -> None:
        self.token_fetches.labels(server, outcome).inc()
        self.token_fetch_duration.labels(server).observe(seconds)

    def count_token_exchange(self, server: str, outcome: str) -> None:
        self.token_exchanges.labels(server, outcome).inc()

    def watch_token_ages(self, ages: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_TokenAges(ages))
