"""Routes: each server's (its path or host, and its discovery document), the registry's,
and the catch-all that answers every other request as an unknown server."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import Metadata
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from ..contract import (
    ANSWERS_FILTER,
    CHALLENGE_FILTER,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    KIND_EXTENSION,
    NO_SERVER,
    PROTECTED_RESOURCE,
    REFUSALS_FILTER,
    TOOL_RULES_BY_EXT_PROC,
    TOOL_RULES_EXTENSION,
)
from ..policy.routing import RouteKind
from .enforcement import BySidecar
from .filters import challenge, ext_authz, ext_proc
from .options import Timeouts
from .plan import Plan, ServerPlan

DISCOVERY_TIMEOUT_S = 15  # a metadata document: Envoy's default route timeout


def per_route(plan: Plan, server: str, kind: RouteKind, by: BySidecar) -> dict[str, AnyMessage]:
    """The per-filter configs of one route, for a server (or NO_SERVER) and a kind."""
    # The route names its server and what it is: the sidecar then never reads the
    # client-chosen path.
    extensions = {plan.config.routing.context_extension_key: server, KIND_EXTENSION: kind}
    per_filter = {}
    known = plan.server(server)
    if kind == "discovery":
        per_filter[ANSWERS_FILTER] = ext_proc.ENABLED  # names the gateway in the document
    elif kind == "mcp" and known is not None and known.caller_brings_token:
        per_filter[CHALLENGE_FILTER] = challenge.per_route()
    elif kind == "mcp" and known is not None and known.exchanges and not known.has_item_rules:
        # The upstream's 401 to an exchanged token evicts it (the sidecar's metadata names
        # the token's cache key). Where item rules turn the answers filter on, it does.
        per_filter[REFUSALS_FILTER] = ext_proc.ENABLED
    if kind == "mcp" and known is not None and known.has_item_rules:
        # ext_authz decides the server from the headers alone, before any body is buffered
        # (a hidden server then answers exactly as an unknown one, whatever the body); the
        # ext_proc filters after it, off everywhere else, read the body for the tool rules
        # and rewrite the answer.
        extensions[TOOL_RULES_EXTENSION] = TOOL_RULES_BY_EXT_PROC
        for name in (EXT_PROC_FILTER, ANSWERS_FILTER):
            per_filter[name] = ext_proc.ENABLED
    per_filter[EXT_AUTHZ_FILTER] = ext_authz.per_route(extensions)
    return by.route_filters(plan, server, kind, per_filter)


def _server_routes(plan: Plan, server: ServerPlan, timeouts: Timeouts,
                   by: BySidecar) -> list[Route]:
    """A server's routes: its path (or host), rewritten to a URL upstream's own."""
    upstream = server.upstream
    assert upstream is not None

    def action(rewrite: str | None) -> RouteAction:
        route = RouteAction(cluster=server.cluster, timeout=timedelta(seconds=timeouts.request_s),
                            idle_timeout=timedelta(seconds=timeouts.idle_s))
        if rewrite is not None:
            route.prefix_rewrite = rewrite
        if upstream.scheme is not None:
            # A URL: the server is addressed by its own name, as a client calling it directly
            # would (RFC 9110: with the port when it is not the scheme's). Not
            # auto_host_rewrite, which drops the port, and which an SDK server's
            # DNS-rebinding check (Host must be localhost:PORT) then refuses.
            host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
            default = 443 if upstream.tls else 80
            route.host_rewrite_literal = (host if upstream.port == default
                                          else f"{host}:{upstream.port}")
        return route

    per_filter = per_route(plan, server.name, "mcp", by)
    path = upstream.path  # a URL's path replaces the gateway's: /mcp/NAME -> /PATH
    gateway_path = server.address.path
    whole, under = (gateway_path, f"{gateway_path}/") if gateway_path is not None else ("/", "/")
    matches: list[tuple[RouteMatch, str | None]]
    if path is None or (gateway_path is None and path == "/"):
        matches = [(RouteMatch(path=whole), None), (RouteMatch(prefix=under), None)]
        if gateway_path is None:
            matches = [(RouteMatch(prefix="/"), None)]
    else:
        matches = [(RouteMatch(path=whole), path),
                   (RouteMatch(prefix=under), path.rstrip("/") + "/")]
    marks = by.route_metadata(server.name)
    if server.caller_brings_token:
        marks[CHALLENGE_FILTER] = challenge.route_mark(server.address)
    metadata = Metadata(filter_metadata=marks) if marks else None
    removed = [] if server.caller_brings_token else [
        # The gateway holds this server's credential; the upstream's challenge (its own
        # metadata URL) is nothing a client can act on.
        "www-authenticate"]
    if by.local_reply_marker is not None:
        removed.append(by.local_reply_marker)  # only Envoy's own answers carry it
    routes = [Route(match=match, route=action(rewrite), typed_per_filter_config=per_filter,
                    metadata=metadata, response_headers_to_remove=removed)
              for match, rewrite in matches]
    if server.caller_brings_token:
        routes.insert(0, _discovery_route(plan, server, action, by))
    elif server.exchanges:
        routes.insert(0, _gateway_discovery_route(plan, server, by))
    return routes


def _gateway_discovery_route(plan: Plan, server: ServerPlan, by: BySidecar) -> Route:
    """RFC 9728 metadata of a server whose callers' tokens the gateway exchanges: the
    sidecar's own document (its callers' tokens are for the gateway), never the upstream's.
    Envoy's 404 stands only where the sidecar let it by, as for the catch-all."""
    gateway_path = server.address.path
    match = (RouteMatch(path=f"{PROTECTED_RESOURCE}{gateway_path}") if gateway_path is not None
             else RouteMatch(prefix=PROTECTED_RESOURCE))
    marks = by.route_metadata(server.name)
    return Route(match=match, direct_response=DirectResponseAction(status=404),
                 metadata=Metadata(filter_metadata=marks) if marks else None,
                 typed_per_filter_config=per_route(plan, server.name, "discovery", by))


def _discovery_route(plan: Plan, server: ServerPlan,
                     action: Callable[[str | None], RouteAction], by: BySidecar) -> Route:
    """RFC 9728 metadata of a server whose caller brings its own token: the upstream's
    document, at the gateway's well-known path for the server, naming the gateway."""
    assert server.upstream is not None
    gateway_path = server.address.path
    # The upstream publishes it for its own endpoint: a URL's path, or the gateway's path.
    own = server.upstream.path if server.upstream.path is not None else gateway_path
    if gateway_path is not None:
        match = RouteMatch(path=f"{PROTECTED_RESOURCE}{gateway_path}")
    else:
        match = RouteMatch(prefix=PROTECTED_RESOURCE)  # the server's own host
    rewrite = None if own is None else PROTECTED_RESOURCE + ("" if own == "/" else own)
    if rewrite == match.path:
        rewrite = None  # the upstream's own path already
    route_action = action(rewrite)
    # A short GET, not an MCP stream: Envoy's own request timeout.
    route_action.timeout = timedelta(seconds=DISCOVERY_TIMEOUT_S)
    route_action.idle_timeout = None
    marks = by.route_metadata(server.name)
    return Route(match=match, route=route_action,
                 metadata=Metadata(filter_metadata=marks) if marks else None,
                 typed_per_filter_config=per_route(plan, server.name, "discovery", by),
                 response_headers_to_remove=([by.local_reply_marker]
                                             if by.local_reply_marker is not None else []))


def virtual_hosts(plan: Plan, timeouts: Timeouts, by: BySidecar) -> list[VirtualHost]:
    """Every route: one virtual host (path routing), or one per server and the rest."""
    # What no server route matches still goes through the sidecar, naming no server: its
    # 404 is then byte for byte the one a hidden server gets. (Left to the sidecar's own
    # path routing, `/mcp/public;x` would be "allowed" only to meet this route's 404.)
    not_found = Route(
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=404),
        typed_per_filter_config=per_route(plan, NO_SERVER, "mcp", by),
    )
    shared = [not_found]
    if plan.discovers:
        # Every metadata path no server's route takes gets what a hidden server's gets, by
        # the same filters: a discovery route's answer passes the answers filter, which sees
        # even a local reply's headers (Envoy has then read the body, and keeps the
        # connection, where the catch-all's 404 would close it).
        shared.insert(0, Route(
            match=RouteMatch(prefix=PROTECTED_RESOURCE),
            direct_response=DirectResponseAction(status=404),
            typed_per_filter_config=per_route(plan, NO_SERVER, "discovery", by)))
    registry = plan.config.routing.registry_path
    if registry is not None:
        # Answered by the sidecar (ext_authz's local reply), from the same decision as every
        # other request: Envoy never gets this far. Other methods meet the catch-all.
        shared.insert(0, Route(
            match=RouteMatch(path=registry, headers=[HeaderMatcher(
                name=":method", string_match=StringMatcher(exact="GET"))]),
            direct_response=DirectResponseAction(status=404),
            typed_per_filter_config=per_route(plan, NO_SERVER, "registry", by)))
    if plan.config.routing.path_prefix is not None:
        routes = [route for server in plan.servers
                  for route in _server_routes(plan, server, timeouts, by)]
        return [VirtualHost(name="mcp", domains=["*"], routes=[*routes, *shared])]
    hosts = [
        VirtualHost(name=f"mcp_{server.name}", domains=[server.address.host,
                                                  f"{server.address.host}:*"],
                    routes=_server_routes(plan, server, timeouts, by))
        for server in plan.servers
    ]
    hosts.append(VirtualHost(name="unknown", domains=["*"], routes=shared))
    return hosts
