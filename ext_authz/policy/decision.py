"""Facts about one request -> the decision (pure, no I/O): the table of docs/design.md."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..contract import KIND_EXTENSION
from ..mcp.jsonrpc import (
    INVALID_REQUEST,
    Body,
    ItemUse,
    UnknownToolReply,
    read_item_uses,
)
from ..mcp.replies import error_reply, refusal_reply, unknown_item_reply, unknown_tool_reply
from .compile import DECISION_CACHE_MAX_INPUT, Policy, ServerPolicy
from .config import OAuth2Settings, TokenExchangeSettings
from .network import (
    NO_IDENTITY,
    NOWHERE,
    ClientIP,
    Identity,
    Placement,
    parse_address,
    resolve_client_ip,
)
from .outcomes import OUTCOMES, Reason
from .protected_resource import metadata_body
from .routing import Route, origin, route
from .visibility import hidden_detail, naming


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a CheckRequest says, as plain values (the edges extract them)."""

    peer: str
    x_forwarded_for: str | None
    path: str
    authority: str
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    has_http: bool = True
    method: str = ""  # "" when not known (a dry run): the registry answers it as a GET
    identity: Identity = NO_IDENTITY  # from Envoy's mTLS and jwt_authn, never a header
    # What says the scheme the caller used (the first value counts): for `origin`.
    forwarded_proto: str = ""  # X-Forwarded-Proto
    scheme: str = ""  # the scheme Envoy saw

    @property
    def origin(self) -> str | None:
        """The gateway URL's origin as the caller addressed it (routing.origin); None when it
        cannot be said, and then no discovery document is answered. Derived only where a
        discovery request needs it, never on the hot path of other requests."""
        return origin(self.authority, self.forwarded_proto, self.scheme)


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
    # The configured prompt or resource it uses ("prompts.NAME", "resources.URI"): likewise.
    item: str = ""
    reply: bytes = b""  # the body of a per-request answer (JSON-RPC), when not the reason's
    challenge: str = ""  # a 401's WWW-Authenticate
    # The body lists tools, prompts, resources or templates: its answer is filtered.
    lists_items: bool = False
    # The body uses items (tools/call, prompts/get...): an answer that may name a hidden one.
    uses_items: bool = False

    @property
    def network(self) -> str:
        """The name of the caller's network (the most specific one holding it)."""
        return self.placement.name

    @property
    def allowed(self) -> bool:
        """Whether the caller may do what it asked (a hidden tool's call is not allowed,
        though it goes on renamed: `goes_upstream`)."""
        return self.reason == "allowed"

    @property
    def renamed(self) -> bool:
        """Whether the request goes on with a hidden item's use under a fresh name, for the
        server to answer as the unknown item it then is."""
        return self.reason in ("tool_hidden", "item_hidden")

    @property
    def goes_upstream(self) -> bool:
        """Whether the request goes on to the server (a hidden item's renamed use too)."""
        return self.allowed or self.renamed

    @property
    def grpc_code(self) -> int:
        return OUTCOMES[self.reason][0]

    @property
    def http_status(self) -> int:
        if self.reason in ("tool_not_found", "item_not_found") and not self.reply:
            return 202  # a notification: MCP servers accept it with no body
        return OUTCOMES[self.reason][1]

    @property
    def reads_body(self) -> bool:
        """Whether item rules apply: the request's body decides what is allowed (decide_items)."""
        return (self.goes_upstream and self.route.kind == "mcp" and self.server is not None
                and self.server.has_item_rules)

    @property
    def server_name(self) -> str | None:
        return self.server.name if self.server is not None else None

    @property
    def oauth2(self) -> OAuth2Settings | None:
        """The credential to inject, for an allowed request to a server that has one."""
        if self.goes_upstream and self.server is not None:
            return self.server.oauth2
        return None

    @property
    def token_exchange(self) -> TokenExchangeSettings | None:
        """The exchange of the caller's token for the upstream's, for a request that goes on
        to a server that has one."""
        if self.goes_upstream and self.server is not None:
            return self.server.exchange
        return None

    def deny(self, reason: Reason, detail: str = "", challenge: str = "") -> Decision:
        """Turn this decision into a denial, keeping the facts (e.g. a token fetch failed)."""
        return replace(self, reason=reason, detail=detail, challenge=challenge)


def decide(facts: RequestFacts, policy: Policy) -> Decision:
    """Apply the decision table: client IP, network, server, visibility.

    When the decision `reads_body`, `decide_items` finishes it with the request's body: only
    requests to servers with tool rules have their body extracted at all.
    """
    if not facts.has_http:
        return Decision("bad_request", detail="CheckRequest has no HTTP request attributes",
                        peer=facts.peer)
    named = facts.context_extensions.get(policy.routing.context_extension_key)
    kind = facts.context_extensions.get(KIND_EXTENSION)
    key = (facts.peer, facts.x_forwarded_for, named, kind, facts.method, facts.path,
           facts.authority, facts.identity, facts.forwarded_proto, facts.scheme)
    decision = policy.decision_cache.get(key)
    if decision is None:
        decision = _decide(facts, policy)
        size = len(facts.x_forwarded_for or "") + len(facts.path) + len(facts.authority)
        if facts.identity:
            size += len(facts.identity.principal) + sum(
                len(name) + sum(map(len, values)) for name, values in facts.identity.claims)
        if size <= DECISION_CACHE_MAX_INPUT:
            policy.decision_cache.keep(key, decision)
    return decision


def client_placement(peer: str, x_forwarded_for: str | None, identity: Identity,
                     policy: Policy) -> tuple[ClientIP, Placement]:
    """Who the caller is and where it sits: its address through the trusted proxies (within
    the policy's bounds on X-Forwarded-For), and the networks that hold it."""
    client = resolve_client_ip(peer, x_forwarded_for, policy.trusted_proxies,
                               max_entries=policy.max_xff_entries,
                               max_bytes=policy.max_xff_bytes)
    return client, policy.networks.place(client.address, identity)


def _decide(facts: RequestFacts, policy: Policy) -> Decision:
    client, placement = client_placement(facts.peer, facts.x_forwarded_for, facts.identity,
                                          policy)
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
    if target.kind == "discovery" and facts.origin is None:
        # The document must name the gateway, which this request does not say (a Host that
        # cannot be echoed): the upstream's own, with its internal URLs, is never shown.
        return Decision("not_found", client, placement, target, server, peer=peer, rule=rule,
                        detail="the gateway URL the caller used cannot be said: no discovery")
    if target.kind == "discovery" and server.exchange is not None and facts.origin is not None:
        # The caller's token is for the gateway, which exchanges it: the gateway's document,
        # never the upstream's (which names the upstream's own IdP).
        assert policy.subject_issuer is not None
        return Decision("resource_metadata", client, placement, target, server, peer=peer,
                        rule=f"servers.{server.name}.token_exchange",
                        reply=metadata_body(facts.origin, server, policy.subject_issuer))
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
        decision = policy.resumed.keep(
            key, _resume(policy, server_name, network, members, client_ip))
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


def decide_items(decision: Decision, body: Body, policy: Policy, *,
                 can_rename: bool = False) -> Decision:
    """Narrow an allowed request to a server with item rules by the tools, prompts and
    resources its body uses.

    `can_rename`: the edge can send a hidden item's use on under a fresh name (ext_proc
    can, a Check cannot), so the server answers it itself (unknown_tool_reply: server).
    """
    return judge_items(decision, body, policy, can_rename=can_rename).decision


@dataclass(frozen=True, slots=True)
class Judged:
    """A decision on a body, and every use the body makes: for the edge that sends the uses
    of hidden items on renamed, and does the same work for the others."""

    decision: Decision
    uses: tuple[ItemUse, ...] = ()
    hidden: tuple[bool, ...] = ()  # per use: hidden from the caller, to go on renamed


def judge_items(decision: Decision, body: Body, policy: Policy, *,
                can_rename: bool = False) -> Judged:
    """decide_items, with the uses it judged."""
    server = decision.server
    if not decision.reads_body or server is None:
        return Judged(decision)
    read = read_item_uses(body, policy.mcp.max_body_bytes, policy.mcp.max_batch_messages)
    if read.problem:
        return Judged(replace(decision, reason="body_too_large" if read.too_large else
                              "bad_mcp_request", detail=read.problem,
                              reply=refusal_reply(read)))
    allowed: tuple[str, str] | None = None
    hidden: list[tuple[ItemUse, str, str]] = []
    flags = []
    for use in read.uses:
        found = server.rules(use.kind).rule(use.name)  # type: ignore[arg-type]
        visible, rule = found[1].judge(decision.placement) if found is not None else (True, "")
        flags.append(not visible)
        if found is None:
            continue  # no rule for it: its server's rule holds
        if not visible:
            hidden.append((use, found[0], rule))
        elif allowed is None:
            allowed = (use.kind, found[0])
    # Remembered per decision (PerDecision), so that the same use by the same caller is the
    # same Decision object, whose encodings and log fields are built once: a hidden name's
    # as much as any other's.
    if hidden and server.unknown_tool_reply == "server" and can_rename:
        use, key, _ = hidden[0]
        narrowed = policy.hiding[(use.kind, key)][decision]
        return Judged(policy.listing[narrowed] if read.lists else narrowed, read.uses,
                      tuple(flags))
    if hidden:
        return Judged(replace(_hidden_items(decision, server, hidden, read.batch),
                              lists_items=read.lists, uses_items=True))
    if read.uses:
        narrowed = (policy.item_decisions[allowed] if allowed is not None
                    else policy.using)[decision]
        return Judged(policy.listing[narrowed] if read.lists else narrowed, read.uses,
                      tuple(flags))
    return Judged(policy.listing[decision] if read.lists else decision)


def _hidden_items(decision: Decision, server: ServerPolicy,
                  hidden: list[tuple[ItemUse, str, str]], batch: bool) -> Decision:
    """The sidecar's own answer for a body that uses a hidden item (it cannot rename)."""
    use, key, rule = hidden[0]
    detail = hidden_detail(use.kind, key, decision.network)
    tool, item = naming(use.kind, key)
    if batch:
        # A whole HTTP request gets one answer: a batch cannot be answered message by
        # message, so it is refused whole, with words that do not name the item.
        return replace(decision, reason="batch_refused", rule=rule, detail=detail,
                       reply=error_reply(INVALID_REQUEST, "Batch refused"), tool=tool, item=item)
    if use.kind != "tool":
        return replace(decision, reason="item_not_found", rule=rule, detail=detail,
                       reply=unknown_item_reply(use), tool=tool, item=item)
    style: UnknownToolReply = ("tool_error" if server.unknown_tool_reply == "server"
                               else server.unknown_tool_reply)
    return replace(decision, reason="tool_not_found", rule=rule, detail=detail,
                   reply=unknown_tool_reply(style, use, server.server_info), tool=tool, item=item)
