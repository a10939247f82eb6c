"""Which MCP server a request targets (pure, no I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..contract import KIND_EXTENSION, PROTECTED_RESOURCE
from .config import RoutingSettings

RouteSource = Literal["context_extension", "path", "host", "none"]
# What a request asks for: an MCP server's endpoint, the registry of servers, or a server's
# OAuth protected-resource metadata (RFC 9728).
RouteKind = Literal["mcp", "registry", "discovery"]



# What may stand in an origin echoed into a URL: RFC 3986's host and port characters (no
# quote, space, comma or backslash that would break out of a header parameter or a JSON
# string; no `%` or `@`, which would say another host).
_AUTHORITY = re.compile(r"[A-Za-z0-9.\-_~:\[\]]{1,255}")


def origin(authority: str, forwarded_proto: str, scheme: str) -> str | None:
    """`scheme://authority` as the caller addressed the gateway; None if it cannot be said.

    The caller's own Host and X-Forwarded-Proto (its first value), echoed back to that
    caller only (in the URLs of OAuth discovery): a client that forges them misleads no one
    but itself.
    """
    forwarded = forwarded_proto.partition(",")[0].strip().lower()
    chosen = forwarded or scheme.lower() or "http"
    if chosen not in ("http", "https") or not _AUTHORITY.fullmatch(authority):
        return None
    return f"{chosen}://{authority}"


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where callers reach a server at the gateway: a path, or a host (`routing`)."""

    path: str | None  # path_prefix + name; None when servers are named by host
    host: str  # name + host_suffix (what a host-routed caller addresses)

    @classmethod
    def of(cls, settings: RoutingSettings, name: str) -> ServerAddress:
        prefix = settings.path_prefix
        return cls(None if prefix is None else f"{prefix}{name}",
                   f"{name}{settings.host_suffix or ''}")


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
