"""Facts about one request -> the decision (pure, no I/O): the table of docs/design.md."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

from ..mcp.jsonrpc import (
    INVALID_REQUEST,
    Body,
    ToolCall,
    UnknownToolAnswer,
    UnknownToolReply,
    error_reply,
    read_tool_calls,
    refusal_reply,
    unknown_tool_reply,
)
from .config import DEFAULT_TOOL, Config, McpSettings, OAuth2Settings, RoutingSettings
from .network import (
    NO_IDENTITY,
    NOWHERE,
    ClientIP,
    Identity,
    NetworkMap,
    NetworkSet,
    Placement,
    parse_address,
    resolve_client_ip,
)
from .registry import entry, registry_body
from .routing import KIND_EXTENSION, NO_SERVER, Route, route

Reason = Literal[
    "allowed",
    "tool_hidden",
    "registry",
    "not_found",
    "tool_not_found",
    "batch_refused",
    "bad_mcp_request",
    "body_too_large",
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
    # A hidden tool's call goes on to the server under a fresh name, and the server answers
    # it as the unknown tool it then is (unknown_tool_reply: server, through ext_proc).
    "tool_hidden": (GRPC_OK, 200),
    # The registry, answered in Envoy's place (a denial only in gRPC terms): the servers
    # this caller may see.
    "registry": (GRPC_PERMISSION_DENIED, 200),
    "not_found": (GRPC_PERMISSION_DENIED, 404),
    # A hidden tool gets what the server says of a tool it lacks: a JSON-RPC answer, 200
    # (202 with no body for a notification, as the MCP Python SDK answers one).
    "tool_not_found": (GRPC_PERMISSION_DENIED, 200),
    "batch_refused": (GRPC_PERMISSION_DENIED, 400),
    "bad_mcp_request": (GRPC_INVALID_ARGUMENT, 400),
    "body_too_large": (GRPC_INVALID_ARGUMENT, 413),
    "upstream_credentials_unavailable": (GRPC_UNAVAILABLE, 503),
    "bad_request": (GRPC_INVALID_ARGUMENT, 400),
    "internal_error": (GRPC_INTERNAL, 500),
}


def denial_body(reason: Reason) -> bytes:
    """The body of a denial that has no per-request answer: a constant per reason, so that a
    hidden server and an unknown one answer the same bytes."""
    return json.dumps({"error": reason}).encode()


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a CheckRequest says, as plain values (service.py extracts them)."""

    peer: str
    x_forwarded_for: str | None
    path: str
    authority: str
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    has_http: bool = True
    method: str = ""  # "" when not known (a dry run): the registry answers it as a GET
    identity: Identity = NO_IDENTITY  # from Envoy's mTLS and jwt_authn, never a header


@dataclass(frozen=True, slots=True)
class Visibility:
    """Who sees a server or a tool, and the config key that says so."""

    public: bool
    visible_to: frozenset[str]
    key: str  # e.g. "servers.github" or "servers.github.tools.delete_repo"

    def judge(self, placement: Placement) -> tuple[bool, str]:
        """Whether a caller so placed sees it, and the config key that decided."""
        if self.public:
            return True, f"{self.key}.available_on_public_internet"
        if placement.internal:
            return True, "network.internal_ranges"
        if not self.visible_to.isdisjoint(placement.members):
            return True, f"{self.key}.visible_to"
        setting = "visible_to" if self.visible_to else "available_on_public_internet"
        return False, f"{self.key}.{setting}"


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """One configured server, as the hot path needs it."""

    name: str
    visibility: Visibility
    oauth2: OAuth2Settings | None
    tools: Mapping[str, Visibility] = field(default_factory=dict)  # "*": the tools unlisted
    unknown_tool_reply: UnknownToolAnswer = "server"
    server_info: tuple[str, str] = ("", "")  # the name and version the MCP server reports
    listed: Mapping[str, str] = field(default_factory=dict)  # its registry entry

    @property
    def public(self) -> bool:
        return self.visibility.public

    def tool_rule(self, name: str) -> tuple[str, Visibility] | None:
        """The rule of a tool, and its key: its own, else the default "*", else none (the
        server's own rule holds)."""
        if name in self.tools and name != DEFAULT_TOOL:
            return name, self.tools[name]
        default = self.tools.get(DEFAULT_TOOL)
        return (DEFAULT_TOOL, default) if default is not None else None

    def tool_visible(self, name: str, placement: Placement) -> bool:
        """Whether a caller so placed may call (and see listed) the tool of this name."""
        rule = self.tool_rule(name)
        return rule is None or rule[1].judge(placement)[0]

    @classmethod
    def from_config(cls, name: str, config: Config) -> ServerPolicy:
        server = config.servers[name]
        key = f"servers.{name}"
        tools = {tool: Visibility(rule.available_on_public_internet,
                                  frozenset(rule.visible_to), f"{key}.tools.{tool}")
                 for tool, rule in server.tools.items()}
        info = server.server_info
        return cls(name, Visibility(server.available_on_public_internet,
                                    frozenset(server.visible_to), key),
                   server.oauth2, tools, server.unknown_tool_reply,
                   (info.name, info.version) if info is not None else (name, ""),
                   entry(name, server, config.routing))


# Decisions are remembered per (peer, X-Forwarded-For, route inputs): the same few callers
# ask about the same few servers again and again, and a Policy never changes (a reload
# builds a new one). Bounded: cleared when full; requests with long inputs are not kept.
DECISION_CACHE_SIZE = 16384
DECISION_CACHE_MAX_INPUT = 512


@dataclass(frozen=True, slots=True)
class Policy:
    """A config compiled once for the hot path: network sets built, servers in a dict."""

    networks: NetworkMap
    trusted_proxies: NetworkSet
    routing: RoutingSettings
    servers: Mapping[str, ServerPolicy]
    max_xff_entries: int
    max_xff_bytes: int
    mcp: McpSettings = field(default_factory=McpSettings)
    decision_cache: dict[tuple[str, str | None, str | None, str | None, str, str, str,
                               Identity],
                         Decision] = field(default_factory=dict, compare=False, repr=False)
    # Where Envoy's jwt_authn leaves the verified payload (None: no claim rules).
    claims_key: str | None = None
    # The identity read from a principal and a serialized jwt_authn payload, remembered: a
    # caller sends the same token again and again (bounded like the decision cache).
    identities: dict[tuple[str, bytes], Identity] = field(
        default_factory=dict, compare=False, repr=False)
    # The registry answer per set of networks a caller is in (see registry).
    registries: dict[frozenset[str], bytes] = field(
        default_factory=dict, compare=False, repr=False)
    # ext_authz's decisions as ext_proc takes them up, by what ext_authz said (see resume).
    resumed: dict[tuple[str, str, str, str], Decision] = field(
        default_factory=dict, compare=False, repr=False)
    # Per configured tool: a server decision -> the same decision naming the tool, remembered
    # so that an allowed tools/call keeps the identity PerDecision looks values up by.
    tool_decisions: Mapping[str, PerDecision[Decision]] = field(
        default_factory=dict, compare=False, repr=False)
    # A server decision -> the same for a body that calls tools (and no configured one), or
    # that lists them: what ext_proc needs to know of the answer it is to rewrite.
    calling: PerDecision[Decision] = field(
        default_factory=lambda: PerDecision(lambda d: replace(d, calls_tools=True),
                                            DECISION_CACHE_SIZE), compare=False, repr=False)
    listing: PerDecision[Decision] = field(
        default_factory=lambda: PerDecision(lambda d: replace(d, lists_tools=True),
                                            DECISION_CACHE_SIZE), compare=False, repr=False)

    def registry(self, placement: Placement) -> bytes:
        """The registry a caller so placed gets: the servers it may see, and only those."""
        body = self.registries.get(placement.members)
        if body is None:
            body = registry_body(server.listed for server in self.servers.values()
                                 if server.visibility.judge(placement)[0])
            self.registries[placement.members] = body
        return body

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(
            networks=NetworkMap(config.network.named(), config.network.identities()),
            claims_key=(config.jwt.payload_in_metadata
                        if config.jwt is not None and config.network.uses_claims else None),
            trusted_proxies=NetworkSet(config.network.trusted_proxies),
            routing=config.routing,
            servers={name: ServerPolicy.from_config(name, config) for name in config.servers},
            max_xff_entries=config.network.max_xff_entries,
            max_xff_bytes=config.network.max_xff_bytes,
            mcp=config.mcp,
            tool_decisions={tool: PerDecision(_naming(tool), DECISION_CACHE_SIZE)
                            for server in config.servers.values() for tool in server.tools},
        )


_NO_CLIENT = ClientIP(None, "no_peer")
_NO_ROUTE = Route(None, "none")


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check, with every fact that led to it."""

    reason: Reason
    client: ClientIP = _NO_CLIENT
    placement: Placement = NOWHERE
    route: Route = _NO_ROUTE
    server: ServerPolicy | None = None
    detail: str = ""
    peer: str = ""
    rule: str = ""  # the config key that decided visibility
    tool: str = ""  # the configured tool the request calls (never a name a client made up)
    reply: bytes = b""  # the body of a per-request answer (JSON-RPC), when not the reason's
    hidden: tuple[ToolCall, ...] = ()  # tool_hidden: the calls to rename
    lists_tools: bool = False  # the body asks for tools/list: its answer is filtered
    calls_tools: bool = False  # the body calls tools (an answer that may name a hidden one)

    @property
    def network(self) -> str:
        """The name of the caller's network (the most specific one holding it)."""
        return self.placement.name

    @property
    def allowed(self) -> bool:
        """Whether the request goes on to the server (a hidden tool's renamed call too)."""
        return self.reason in ("allowed", "tool_hidden")

    @property
    def grpc_code(self) -> int:
        return OUTCOMES[self.reason][0]

    @property
    def http_status(self) -> int:
        if self.reason == "tool_not_found" and not self.reply:
            return 202  # a notification: MCP servers accept it with no body
        return OUTCOMES[self.reason][1]

    @property
    def reads_body(self) -> bool:
        """Whether tool rules apply: the request's body decides what is allowed (decide_tools)."""
        return (self.allowed and self.route.kind == "mcp" and self.server is not None
                and bool(self.server.tools))

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
    """Apply the decision table: client IP, network, server, visibility.

    When the decision `reads_body`, `decide_tools` finishes it with the request's body: only
    requests to servers with tool rules have their body extracted at all.
    """
    if not facts.has_http:
        return Decision("bad_request", detail="CheckRequest has no HTTP request attributes",
                        peer=facts.peer)
    named = facts.context_extensions.get(policy.routing.context_extension_key)
    kind = facts.context_extensions.get(KIND_EXTENSION)
    key = (facts.peer, facts.x_forwarded_for, named, kind, facts.method, facts.path,
           facts.authority, facts.identity)
    decision = policy.decision_cache.get(key)
    if decision is None:
        decision = _decide(facts, policy)
        size = len(facts.x_forwarded_for or "") + len(facts.path) + len(facts.authority)
        if facts.identity:
            size += len(facts.identity.principal) + sum(
                len(name) + sum(map(len, values)) for name, values in facts.identity.claims)
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
    placement = policy.networks.place(client.address, facts.identity)
    target = route(policy.routing, facts.context_extensions, facts.path, facts.authority)
    peer = facts.peer
    if target.kind == "registry":
        if facts.method not in ("GET", ""):
            return Decision("not_found", client, placement, target, peer=peer,
                            detail="the registry answers GET only")
        return Decision("registry", client, placement, target, peer=peer,
                        rule="routing.registry_path", reply=policy.registry(placement))
    server = policy.servers.get(target.name) if target.name is not None else None
    if server is None:
        return Decision("not_found", client, placement, target, peer=peer)
    visible, rule = server.visibility.judge(placement)
    if not visible:
        # Same reason, status and body as an unknown server: a hidden server does not leak.
        return Decision("not_found", client, placement, target, server, peer=peer, rule=rule)
    if target.kind == "discovery" and server.oauth2 is not None:
        # The gateway brings this server's credential: a client has nothing to discover,
        # and gets what an unknown server's metadata path gets.
        return Decision("not_found", client, placement, target, server, peer=peer,
                        rule=f"servers.{server.name}.oauth2",
                        detail="the gateway injects this server's token: no discovery")
    return Decision("allowed", client, placement, target, server, peer=peer, rule=rule)


def resume(policy: Policy, server_name: str, network: str, members: str,
           client_ip: str) -> Decision:
    """Take up the server decision that ext_authz made for this request, for its tool rules.

    From what ext_authz left in Envoy's dynamic metadata (`members`: its comma-joined
    `networks`): the caller is placed where that check placed it, never placed again.
    Visibility is judged again against this policy, so a reload in between can only narrow
    (a server now hidden or gone is not_found). Remembered, like `decide`'s decisions.
    """
    key = (server_name, network, members, client_ip)
    decision = policy.resumed.get(key)
    if decision is None:
        decision = _resume(policy, server_name, network, members, client_ip)
        if len(policy.resumed) >= DECISION_CACHE_SIZE:
            policy.resumed.clear()
        policy.resumed[key] = decision
    return decision


def _resume(policy: Policy, server_name: str, network: str, members: str,
            client_ip: str) -> Decision:
    placement = Placement(network, frozenset(filter(None, members.split(","))))
    client = ClientIP(parse_address(client_ip), "ext_authz")
    target = Route(server_name, "context_extension")
    server = policy.servers.get(server_name)
    if server is None:
        return Decision("not_found", client, placement, target)
    visible, rule = server.visibility.judge(placement)
    return Decision("allowed" if visible else "not_found", client, placement, target, server,
                    rule=rule)


def decide_tools(decision: Decision, body: Body, policy: Policy, *,
                 can_rename: bool = False) -> Decision:
    """Narrow an allowed request to a server with tool rules by the tools its body calls.

    `can_rename`: the edge can send a hidden tool's call on under a fresh name (ext_proc
    can, a Check cannot), so the server answers it itself (unknown_tool_reply: server).
    """
    server = decision.server
    if not decision.reads_body or server is None:
        return decision
    read = read_tool_calls(body, policy.mcp.max_body_bytes, policy.mcp.max_batch_messages)
    if read.problem:
        return replace(decision, reason="body_too_large" if read.too_large else
                       "bad_mcp_request", detail=read.problem, reply=refusal_reply(read))
    allowed_tool = ""
    hidden: list[tuple[ToolCall, str, str]] = []
    for call in read.calls:
        found = server.tool_rule(call.name)
        if found is None:
            continue  # no rule for it: its server's rule holds
        key, visibility = found
        visible, rule = visibility.judge(decision.placement)
        if not visible:
            hidden.append((call, key, rule))
        elif not allowed_tool:
            allowed_tool = key
    if hidden:
        return replace(_hidden_tools(decision, server, hidden, read.batch, can_rename),
                       lists_tools=read.lists_tools, calls_tools=True)
    # Remembered per decision (PerDecision), so that the same call by the same caller is the
    # same Decision object, whose encodings are built once.
    if read.calls:
        narrowed = (policy.tool_decisions[allowed_tool] if allowed_tool
                    else policy.calling)[decision]
        return replace(narrowed, lists_tools=True) if read.lists_tools else narrowed
    return policy.listing[decision] if read.lists_tools else decision


def _hidden_tools(decision: Decision, server: ServerPolicy,
                  hidden: list[tuple[ToolCall, str, str]], batch: bool,
                  can_rename: bool) -> Decision:
    call, key, rule = hidden[0]
    detail = f"tool {call.name!r} is hidden from the {decision.network} network"
    if server.unknown_tool_reply == "server" and can_rename:
        return replace(decision, reason="tool_hidden", rule=rule, tool=key, detail=detail,
                       hidden=tuple(c for c, _, _ in hidden))
    if batch:
        # A whole HTTP request gets one answer: a batch cannot be answered message by
        # message, so it is refused whole, with words that do not name the tool.
        return replace(decision, reason="batch_refused", rule=rule, tool=key,
                       detail=detail, reply=error_reply(INVALID_REQUEST, "Batch refused"))
    style: UnknownToolReply = ("tool_error" if server.unknown_tool_reply == "server"
                               else server.unknown_tool_reply)
    return replace(decision, reason="tool_not_found", rule=rule, tool=key, detail=detail,
                   reply=unknown_tool_reply(style, call, server.server_info))


def _naming(tool: str) -> Callable[[Decision], Decision]:
    def derive(decision: Decision) -> Decision:
        assert decision.server is not None
        _, rule = decision.server.tools[tool].judge(decision.placement)
        return replace(decision, tool=tool, rule=rule, calls_tools=True)

    return derive


def _placement(placement: Placement) -> str:
    who = f"; identity: {', '.join(placement.matched)}" if placement.matched else ""
    if not placement.members:
        return "network: external (in no configured network)"
    if len(placement.members) == 1:
        return f"network: {placement.name}{who}"
    others = ", ".join(sorted(placement.members - {placement.name}))
    return f"network: {placement.name} (the most specific; also in {others}){who}"


def _visibility(decision: Decision, visibility: Visibility, what: str) -> str:
    if visibility.public:
        return f"{what} is available on the public internet"
    audience = ", ".join(sorted(visibility.visible_to))
    limited = f"{what} is internal-only" + (f" (also visible to {audience})" if audience else "")
    if decision.placement.internal:
        return f"{limited}; the caller is internal"
    seen_by = sorted(visibility.visible_to & decision.placement.members)
    if seen_by:
        return f"{limited}; the caller is in {', '.join(seen_by)}"
    return f"{limited}; the caller is {decision.network}"


def explain(decision: Decision) -> list[str]:
    """Describe each step of a decision in words, for `check` and for debugging."""
    if decision.reason == "bad_request":
        return [decision.detail]
    steps = [decision.client.explain(), _placement(decision.placement)]
    target = decision.route
    if target.kind == "registry":
        steps.append("the registry (routing.registry_path): it lists the servers this caller"
                     " may see")
    elif target.name is None:
        steps.append("no server named by context extension, path or host")
    elif target.name == NO_SERVER:
        steps.append("the route names no server (Envoy's catch-all route)")
    else:
        steps.append(f"server {target.name!r} named by {target.source.replace('_', ' ')}")
    if target.kind == "discovery":
        steps.append("OAuth protected-resource metadata (RFC 9728) of that server: its"
                     " `resource` is rewritten to the gateway's URL")
    server = decision.server
    if server is None:
        if target.name:
            steps.append(f"server {target.name!r} is not configured")
    else:
        steps.append(_visibility(decision, server.visibility, f"server {server.name!r}"))
        if decision.tool:
            tool = server.tools[decision.tool]
            steps.append(_visibility(decision, tool, f"tool {decision.tool!r}"))
    if decision.reason == "registry":
        listed = json.loads(decision.reply)["servers"]
        steps.append("lists: " + (", ".join(s["name"] for s in listed) or "no server"))
    elif decision.oauth2 is not None:
        steps.append(f"token for client_id {decision.oauth2.client_id!r} would be injected")
    elif decision.allowed:
        steps.append("server has no oauth2 settings: nothing injected")
    if decision.detail:
        steps.append(decision.detail)
    if decision.reason == "tool_hidden":
        steps.append("the call goes on under a fresh name, for the server to answer as the"
                     " unknown tool it then is (unknown_tool_reply: server)")
    if decision.rule:
        steps.append(f"decided by {decision.rule}")
    steps.append(f"decision: {decision.reason} (HTTP {decision.http_status})")
    return steps
