"""Which MCP server a request targets (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .config import RoutingSettings

RouteSource = Literal["context_extension", "path", "host", "none"]
# What a request asks for: an MCP server's endpoint, the registry of servers, or a server's
# OAuth protected-resource metadata (RFC 9728).
RouteKind = Literal["mcp", "registry", "discovery"]

# A context extension with this value names no server: `envoy-config` puts it on the
# catch-all route, so whatever Envoy itself would not route is answered not_found.
NO_SERVER = ""

# `envoy-config` marks the routes whose tool rules its ext_proc filter judges: ext_authz then
# decides the server alone, before Envoy buffers any body, so a hidden server answers exactly
# as an unknown one whatever the body. Without the mark, ext_authz needs the body itself.
TOOL_RULES_EXTENSION = "mcp_tool_rules"
TOOL_RULES_BY_EXT_PROC = "ext_proc"

# `envoy-config` marks its registry and discovery routes with this context extension; without
# it (Istio), the path says.
KIND_EXTENSION = "mcp_route"
# RFC 9728's well-known prefix: the metadata of `https://host/mcp/x` is at
# `https://host/.well-known/oauth-protected-resource/mcp/x` (or, for `https://host`, at
# the prefix itself).
PROTECTED_RESOURCE = "/.well-known/oauth-protected-resource"


@dataclass(frozen=True, slots=True)
class Route:
    """The server name a request asked for (not yet checked against the config) and where from."""

    name: str | None
    source: RouteSource
    kind: RouteKind = "mcp"


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
    kind = _kind(settings, context_extensions.get(KIND_EXTENSION), path)
    named = context_extensions.get(settings.context_extension_key)
    if named is not None:
        return Route(named, "context_extension", kind)
    if kind == "registry":
        return Route(None, "none", kind)
    if kind == "discovery":
        path = path[len(PROTECTED_RESOURCE):] or "/"
    prefix = settings.path_prefix
    if prefix is not None and path.startswith(prefix):
        rest = path[len(prefix):]
        end = len(rest)
        for separator in "/?#;":
            position = rest.find(separator)
            if 0 <= position < end:
                end = position
        if end:
            return Route(rest[:end], "path", kind)
    suffix = settings.host_suffix
    if suffix is not None and authority:
        host = _host_without_port(authority).lower()
        if host.endswith(suffix) and len(host) > len(suffix):
            return Route(host[: -len(suffix)], "host", kind)
    return Route(None, "none", kind)


def _kind(settings: RoutingSettings, marked: str | None, path: str) -> RouteKind:
    if marked in ("registry", "discovery"):
        return marked  # type: ignore[return-value]
    if marked is not None:
        return "mcp"
    bare = path.partition("?")[0]
    if settings.registry_path is not None and bare == settings.registry_path:
        return "registry"
    if bare == PROTECTED_RESOURCE or bare.startswith(PROTECTED_RESOURCE + "/"):
        return "discovery"
    return "mcp"
