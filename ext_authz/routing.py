"""Which MCP server a request targets (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .config import RoutingSettings

RouteSource = Literal["context_extension", "path", "host", "none"]

# A context extension with this value names no server: `envoy-config` puts it on the
# catch-all route, so whatever Envoy itself would not route is answered not_found.
NO_SERVER = ""

# `envoy-config` marks the routes whose tool rules its ext_proc filter judges: ext_authz then
# decides the server alone, before Envoy buffers any body, so a hidden server answers exactly
# as an unknown one whatever the body. Without the mark, ext_authz needs the body itself.
TOOL_RULES_EXTENSION = "mcp_tool_rules"
TOOL_RULES_BY_EXT_PROC = "ext_proc"


@dataclass(frozen=True, slots=True)
class Route:
    """The server name a request asked for (not yet checked against the config) and where from."""

    name: str | None
    source: RouteSource


def _host_without_port(authority: str) -> str:
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.rpartition(":")[0] if ":" in authority else authority


def route(
    settings: RoutingSettings,
    context_extensions: Mapping[str, str],
    path: str,
    authority: str,
) -> Route:
    """Name the server from, in order: the route's context extension, the path, the host.

    A context extension set by Envoy's route config is authoritative: when present, the
    path and host (which the client chooses) are not consulted at all.
    """
    named = context_extensions.get(settings.context_extension_key)
    if named is not None:
        return Route(named, "context_extension")
    prefix = settings.path_prefix
    if prefix is not None and path.startswith(prefix):
        rest = path[len(prefix):]
        end = len(rest)
        for separator in "/?#;":
            position = rest.find(separator)
            if 0 <= position < end:
                end = position
        if end:
            return Route(rest[:end], "path")
    suffix = settings.host_suffix
    if suffix is not None and authority:
        host = _host_without_port(authority).lower()
        if host.endswith(suffix) and len(host) > len(suffix):
            return Route(host[: -len(suffix)], "host")
    return Route(None, "none")
