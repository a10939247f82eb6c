"""What the renderer needs of a config, computed once from the compiled policy.

Per server: its upstream and cluster, whether its body decides (tool rules), who brings
its token, where callers reach it, who may see it: all read from the `Policy` the edges
decide with, never re-read from raw config, so that both data paths say the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..contract import upstream_cluster
from ..policy.compile import Policy, ServerPolicy
from ..policy.config import Config, JwtSettings, UpstreamAddress
from ..policy.routing import ServerAddress


@dataclass(frozen=True, slots=True)
class ServerPlan:
    """One server, as every resource that concerns it is rendered."""

    name: str
    policy: ServerPolicy
    upstream: UpstreamAddress | None  # None: none given (the bootstrap's native check)

    @property
    def cluster(self) -> str:
        return upstream_cluster(self.name)

    @property
    def address(self) -> ServerAddress:
        assert self.policy.address is not None
        return self.policy.address

    @property
    def has_item_rules(self) -> bool:
        return self.policy.has_item_rules

    @property
    def caller_brings_token(self) -> bool:
        return self.policy.caller_brings_token

    @property
    def exchanges(self) -> bool:
        """Whether its callers' tokens are exchanged for its own (per user: only the
        sidecar can set them, on every request)."""
        return self.policy.exchange is not None


@dataclass(frozen=True, slots=True)
class Plan:
    """A config as the renderer reads it."""

    config: Config
    policy: Policy
    servers: tuple[ServerPlan, ...]  # by name

    @classmethod
    def of(cls, config: Config, upstreams: Mapping[str, UpstreamAddress] | None = None
           ) -> Plan:
        policy = Policy.from_config(config)
        given = upstreams or {}
        return cls(config, policy, tuple(
            ServerPlan(name, policy.servers[name], given.get(name))
            for name in sorted(config.servers)))

    def server(self, name: str) -> ServerPlan | None:
        """The plan of a configured server; None for any other name (the catch-all's)."""
        for server in self.servers:
            if server.name == name:
                return server
        return None

    @property
    def reads_bodies(self) -> bool:
        """Whether any server's body decides (the ext_proc filters are rendered)."""
        return any(server.has_item_rules for server in self.servers)

    @property
    def discovers(self) -> bool:
        """Whether any server's callers bring a token, their own or one to exchange (and
        may need OAuth discovery)."""
        return any(server.caller_brings_token or server.exchanges for server in self.servers)

    @property
    def exchanges(self) -> bool:
        """Whether any server exchanges its callers' tokens."""
        return any(server.exchanges for server in self.servers)

    @property
    def jwt(self) -> JwtSettings | None:
        """The JWT provider Envoy verifies with: only where a network rule names claims, or
        a server exchanges its callers' tokens."""
        return self.config.jwt if self.policy.claims_key is not None else None
