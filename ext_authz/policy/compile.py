"""A config compiled once for the hot path: the Policy every edge and the renderer read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..mcp.jsonrpc import UnknownToolAnswer
from .config import (
    Config,
    ItemKind,
    McpSettings,
    OAuth2Settings,
    RoutingSettings,
    TokenExchangeSettings,
)
from .memo import Memo, PerDecision
from .network import Identity, NetworkMap, NetworkSet, Placement, identity_from_claims
from .registry import entry, registry_body
from .routing import ServerAddress
from .visibility import ItemRules, Visibility, hidden_detail, naming

if TYPE_CHECKING:
    from .decision import Decision

NO_TOOL_RULES, NO_PROMPT_RULES = ItemRules("tool"), ItemRules("prompt")
NO_RESOURCE_RULES = ItemRules("resource")


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """One configured server, as the hot path needs it."""

    name: str
    visibility: Visibility
    oauth2: OAuth2Settings | None
    tools: ItemRules = NO_TOOL_RULES
    prompts: ItemRules = NO_PROMPT_RULES
    resources: ItemRules = NO_RESOURCE_RULES  # resource templates' rules too
    unknown_tool_reply: UnknownToolAnswer = "server"
    server_info: tuple[str, str] = ("", "")  # the name and version the MCP server reports
    listed: Mapping[str, str] = field(default_factory=dict)  # its registry entry
    address: ServerAddress | None = None  # where callers reach it at the gateway
    # The caller's own token exchanged for the upstream's, per user (RFC 8693).
    exchange: TokenExchangeSettings | None = None

    @property
    def public(self) -> bool:
        return self.visibility.public

    @property
    def has_item_rules(self) -> bool:
        """Whether a request's body decides what it may use (the server has rules for its
        tools, prompts or resources)."""
        return bool(self.tools or self.prompts or self.resources)

    @property
    def caller_brings_token(self) -> bool:
        """Whether callers bring their own token (no oauth2 nor token exchange: the gateway
        injects none, and OAuth discovery and the upstream's challenges are passed on,
        naming the gateway)."""
        return self.credential == "caller"

    @property
    def credential(self) -> str:
        """What goes upstream as its Authorization: `gateway` (oauth2), `exchanged`
        (token_exchange: each caller's, exchanged) or `caller` (the caller's own)."""
        if self.oauth2 is not None:
            return "gateway"
        return "exchanged" if self.exchange is not None else "caller"

    def rules(self, kind: ItemKind) -> ItemRules:
        return self.tools if kind == "tool" else (
            self.prompts if kind == "prompt" else self.resources)

    def item_visible(self, kind: ItemKind, name: str, placement: Placement) -> bool:
        """Whether a caller so placed sees (listed) and may use the item of this kind and
        name (a resource's URI, a template)."""
        return self.rules(kind).visible(name, placement)

    @classmethod
    def from_config(cls, name: str, config: Config) -> ServerPolicy:
        server = config.servers[name]
        key = f"servers.{name}"
        address = ServerAddress.of(config.routing, name)
        info = server.server_info
        tools, prompts, resources = (ItemRules.compile(kind, key, items)
                                     for kind, items in server.item_rules())
        return cls(name, Visibility.of(key, server.available_on_public_internet,
                                       server.visible_to),
                   server.oauth2, tools, prompts, resources,
                   server.unknown_tool_reply,
                   (info.name, info.version) if info is not None else (name, ""),
                   entry(name, server, address), address, server.token_exchange)

# Decisions are remembered per (peer, X-Forwarded-For, route inputs): the same few callers
# ask about the same few servers again and again, and a Policy never changes (a reload
# builds a new one). Bounded: cleared when full; requests with long inputs are not kept.
DECISION_CACHE_SIZE = 16384
DECISION_CACHE_MAX_INPUT = 512
IDENTITY_CACHE_MAX_INPUT = 4096  # a principal and a verified payload, serialized


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
    # Where Envoy's jwt_authn leaves the verified payload (None: neither a claim rule nor a
    # token exchange reads it).
    claims_key: str | None = None
    # The issuer of the callers' tokens a token exchange takes (its servers' RFC 9728
    # metadata names it as their authorization server).
    subject_issuer: str | None = None
    # Per configured tool, prompt and resource (kind, key): a server decision -> the same
    # decision naming the item, remembered so that an allowed use keeps the identity
    # PerDecision looks values up by.
    item_decisions: Mapping[tuple[str, str], PerDecision[Decision]] = field(
        default_factory=dict, compare=False, repr=False)
    # The same for a use of the item hidden from the caller, going on renamed (the uses
    # themselves are added per request).
    hiding: Mapping[tuple[str, str], PerDecision[Decision]] = field(
        default_factory=dict, compare=False, repr=False)
    # What the hot path derives, remembered per Policy (a reload builds a new one): each a
    # bounded memo (see memo.py).
    decision_cache: Memo[tuple[str, str | None, str | None, str | None, str, str, str,
                               Identity, str, str], Decision] = field(
        default_factory=lambda: Memo(DECISION_CACHE_SIZE), compare=False, repr=False)
    # The identity read from a principal and a serialized jwt_authn payload: a caller sends
    # the same token again and again.
    identities: Memo[tuple[str, bytes], Identity] = field(
        default_factory=lambda: Memo(DECISION_CACHE_SIZE), compare=False, repr=False)
    # The registry answer per set of networks a caller is in (see registry).
    registries: Memo[frozenset[str], bytes] = field(
        default_factory=lambda: Memo(DECISION_CACHE_SIZE), compare=False, repr=False)
    # ext_authz's decisions as ext_proc takes them up, by what ext_authz said (see resume).
    resumed: Memo[tuple[str, str, str, str], Decision] = field(
        default_factory=lambda: Memo(DECISION_CACHE_SIZE), compare=False, repr=False)
    # A server decision -> the same for a body that uses items (and no configured one), or
    # that lists them: what ext_proc needs to know of the answer it is to rewrite.
    using: PerDecision[Decision] = field(
        default_factory=lambda: PerDecision(lambda d: replace(d, uses_items=True),
                                            DECISION_CACHE_SIZE), compare=False, repr=False)
    listing: PerDecision[Decision] = field(
        default_factory=lambda: PerDecision(lambda d: replace(d, lists_items=True),
                                            DECISION_CACHE_SIZE), compare=False, repr=False)

    @property
    def exchanges_tokens(self) -> bool:
        """Whether any server exchanges its callers' tokens (the edges then read who the
        caller is)."""
        return self.subject_issuer is not None

    def registry(self, placement: Placement) -> bytes:
        """The registry a caller so placed gets: the servers it may see, and only those."""
        body = self.registries.get(placement.members)
        if body is None:
            body = self.registries.keep(placement.members, registry_body(
                server.listed for server in self.servers.values()
                if server.visibility.judge(placement)[0]))
        return body

    def identity(self, principal: str, verified: bytes,
                 payload: Callable[[], Mapping[str, object] | None]) -> Identity:
        """Who a caller is: its principal, and the claims a rule names of the JWT payload
        Envoy verified (`verified`, its serialized form, keys the memo; `payload` reads it
        only when it is not remembered). Callers whose inputs are huge are not remembered."""
        key = (principal, verified)
        identity = self.identities.get(key)
        if identity is None:
            identity = identity_from_claims(principal, payload(), self.networks.claim_names)
            if len(principal) + len(verified) <= IDENTITY_CACHE_MAX_INPUT:
                self.identities.keep(key, identity)
        return identity

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(
            networks=NetworkMap(config.network.named(), config.network.identities()),
            claims_key=(config.jwt.payload_in_metadata if config.jwt is not None and (
                config.network.uses_claims or config.exchanges()) else None),
            subject_issuer=(config.jwt.issuer if config.jwt is not None and config.exchanges()
                            else None),
            trusted_proxies=NetworkSet(config.network.trusted_proxies),
            routing=config.routing,
            servers={name: ServerPolicy.from_config(name, config) for name in config.servers},
            max_xff_entries=config.network.max_xff_entries,
            max_xff_bytes=config.network.max_xff_bytes,
            mcp=config.mcp,
            item_decisions={(kind, key): PerDecision(_naming(kind, key), DECISION_CACHE_SIZE)
                            for server in config.servers.values()
                            for kind, items in server.item_rules() for key in items},
            hiding={(kind, key): PerDecision(_hiding(kind, key), DECISION_CACHE_SIZE)
                    for server in config.servers.values()
                    for kind, items in server.item_rules() for key in items},
        )


def _naming(kind: ItemKind, key: str) -> Callable[[Decision], Decision]:
    def derive(decision: Decision) -> Decision:
        assert decision.server is not None
        _, rule = decision.server.rules(kind)[key].judge(decision.placement)
        tool, item = naming(kind, key)
        return replace(decision, rule=rule, uses_items=True, tool=tool, item=item)

    return derive


def _hiding(kind: ItemKind, key: str) -> Callable[[Decision], Decision]:
    def derive(decision: Decision) -> Decision:
        assert decision.server is not None
        _, rule = decision.server.rules(kind)[key].judge(decision.placement)
        tool, item = naming(kind, key)
        return replace(decision, reason="tool_hidden" if kind == "tool" else "item_hidden",
                       rule=rule, detail=hidden_detail(kind, key, decision.network),
                       tool=tool, item=item, uses_items=True)

    return derive
