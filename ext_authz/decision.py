"""Facts about one request -> the decision (pure, no I/O): DESIGN.md's decision table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

from .config import Config, OAuth2Settings, RoutingSettings
from .network import ClientIP, NetworkName, NetworkSet, classify, resolve_client_ip
from .routing import NO_SERVER, Route, route

Reason = Literal[
    "allowed",
    "not_found",
    "upstream_credentials_unavailable",
    "bad_request",
    "internal_error",
]

# gRPC status codes by number (grpc.StatusCode carries tuples, the wire wants ints).
GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_PERMISSION_DENIED = 0, 3, 7
GRPC_INTERNAL, GRPC_UNAVAILABLE = 13, 14

# One table: each stable reason code -> (CheckResponse gRPC status, HTTP status to the client).
# The reason codes double as metric labels, decision-log values and `check` output.
OUTCOMES: dict[Reason, tuple[int, int]] = {
    "allowed": (GRPC_OK, 200),
    "not_found": (GRPC_PERMISSION_DENIED, 404),
    "upstream_credentials_unavailable": (GRPC_UNAVAILABLE, 503),
    "bad_request": (GRPC_INVALID_ARGUMENT, 400),
    "internal_error": (GRPC_INTERNAL, 500),
}


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a CheckRequest says, as plain values (service.py extracts them)."""

    peer: str
    x_forwarded_for: str | None
    path: str
    authority: str
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    has_http: bool = True


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    name: str
    public: bool
    oauth2: OAuth2Settings | None


# Decisions are remembered per (peer, X-Forwarded-For, route inputs): the same few callers
# ask about the same few servers again and again, and a Policy never changes (a reload
# builds a new one). Bounded: cleared when full; requests with long inputs are not kept.
DECISION_CACHE_SIZE = 16384
DECISION_CACHE_MAX_INPUT = 512


@dataclass(frozen=True, slots=True)
class Policy:
    """A config compiled once for the hot path: network sets built, servers in a dict."""

    internal_ranges: NetworkSet
    trusted_proxies: NetworkSet
    routing: RoutingSettings
    servers: Mapping[str, ServerPolicy]
    max_xff_entries: int
    max_xff_bytes: int
    decision_cache: dict[tuple[str, str | None, str | None, str, str], Decision] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(
            internal_ranges=NetworkSet(config.network.internal_ranges),
            trusted_proxies=NetworkSet(config.network.trusted_proxies),
            routing=config.routing,
            servers={
                name: ServerPolicy(name, server.available_on_public_internet, server.oauth2)
                for name, server in config.servers.items()
            },
            max_xff_entries=config.network.max_xff_entries,
            max_xff_bytes=config.network.max_xff_bytes,
        )


_NO_CLIENT = ClientIP(None, "no_peer")
_NO_ROUTE = Route(None, "none")


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check, with every fact that led to it."""

    reason: Reason
    client: ClientIP = _NO_CLIENT
    network: NetworkName = "external"
    route: Route = _NO_ROUTE
    server: ServerPolicy | None = None
    detail: str = ""
    peer: str = ""

    @property
    def allowed(self) -> bool:
        return self.reason == "allowed"

    @property
    def grpc_code(self) -> int:
        return OUTCOMES[self.reason][0]

    @property
    def http_status(self) -> int:
        return OUTCOMES[self.reason][1]

    @property
    def server_name(self) -> str | None:
        return self.server.name if self.server is not None else None

    @property
    def oauth2(self) -> OAuth2Settings | None:
        """The credential to inject, for an allowed request to a server that has one."""
        if self.allowed and self.server is not None:
            return self.server.oauth2
        return None

    def deny(self, reason: Reason, detail: str = "") -> Decision:
        """Turn this decision into a denial, keeping the facts (e.g. a token fetch failed)."""
        return replace(self, reason=reason, detail=detail)


T = TypeVar("T")


class PerDecision(Generic[T]):
    """Values derived from a Decision (its encoded metadata, its log fields), remembered.

    Keyed by identity: decide() hands out the same Decision object for the same inputs, so
    the hot path looks a value up instead of hashing the decision's fields. The decision is
    kept beside its value, so its id cannot be reused while the entry exists. Bounded.
    """

    def __init__(self, derive: Callable[[Decision], T], size: int = 4096) -> None:
        self._derive = derive
        self._size = size
        self._entries: dict[int, tuple[Decision, T]] = {}

    def __getitem__(self, decision: Decision) -> T:
        entry = self._entries.get(id(decision))
        if entry is not None and entry[0] is decision:
            return entry[1]
        value = self._derive(decision)
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(decision)] = (decision, value)
        return value


def decide(facts: RequestFacts, policy: Policy) -> Decision:
    """Apply the decision table: client IP, network, server, visibility."""
    if not facts.has_http:
        return Decision("bad_request", detail="CheckRequest has no HTTP request attributes",
                        peer=facts.peer)
    named = facts.context_extensions.get(policy.routing.context_extension_key)
    key = (facts.peer, facts.x_forwarded_for, named, facts.path, facts.authority)
    decision = policy.decision_cache.get(key)
    if decision is None:
        decision = _decide(facts, policy)
        size = len(facts.x_forwarded_for or "") + len(facts.path) + len(facts.authority)
        if size <= DECISION_CACHE_MAX_INPUT:
            if len(policy.decision_cache) >= DECISION_CACHE_SIZE:
                policy.decision_cache.clear()
            policy.decision_cache[key] = decision
    return decision


def _decide(facts: RequestFacts, policy: Policy) -> Decision:
    client = resolve_client_ip(
        facts.peer,
        facts.x_forwarded_for,
        policy.trusted_proxies,
        max_entries=policy.max_xff_entries,
        max_bytes=policy.max_xff_bytes,
    )
    network = classify(client.address, policy.internal_ranges)
    target = route(policy.routing, facts.context_extensions, facts.path, facts.authority)
    server = policy.servers.get(target.name) if target.name is not None else None
    peer = facts.peer
    if server is None:
        return Decision("not_found", client, network, target, peer=peer)
    if not server.public and network != "internal":
        # Same reason, status and body as an unknown server: a hidden server does not leak.
        return Decision("not_found", client, network, target, server, peer=peer)
    return Decision("allowed", client, network, target, server, peer=peer)


def explain(decision: Decision) -> list[str]:
    """Describe each step of a decision in words, for `check` and for debugging."""
    steps = [decision.client.explain()]
    steps.append(f"network: {decision.network}")
    target = decision.route
    if decision.reason == "bad_request":
        return [decision.detail]
    if target.name is None:
        steps.append("no server named by context extension, path or host")
    elif target.name == NO_SERVER:
        steps.append("the route names no server (Envoy's catch-all route)")
    else:
        steps.append(f"server {target.name!r} named by {target.source.replace('_', ' ')}")
    server = decision.server
    if server is None:
        if target.name:
            steps.append(f"server {target.name!r} is not configured")
    elif server.public:
        steps.append(f"server {server.name!r} is available on the public internet")
    else:
        steps.append(f"server {server.name!r} is internal-only; caller is {decision.network}")
    if decision.oauth2 is not None:
        steps.append(f"token for client_id {decision.oauth2.client_id!r} would be injected")
    elif decision.allowed:
        steps.append("server has no oauth2 settings: nothing injected")
    if decision.detail:
        steps.append(decision.detail)
    steps.append(f"decision: {decision.reason} (HTTP {decision.http_status})")
    return steps
