"""The native data path: Envoy enforces visibility (RBAC) and injects tokens itself, and
the sidecar is its control plane.

Everything this data path renders differently lives here: `ByEnvoy` (RBAC on each route,
the sidecar asked only where it must read a body or answer for the caller, token
injection with a watchdog, Envoy's own replies made the sidecar's), and `Snapshots`, what
the control plane serves each Envoy (go-control-plane's snapshot: built here, streamed by
edges/xds.py, which computes nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    AndFilter,
    ResponseFlagFilter,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterCommonLbConfig
from envoy_data_plane.envoy.config.core.v3 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    HealthCheck,
    HealthCheckHttpHealthCheck,
    SubstitutionFormatString,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import EndpointHealthCheckConfig
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3 import (
    CredentialInjector,
)
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3 import Generic
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    GenericSecret,
    SdsSecretConfig,
    Secret,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ..contract import (
    EXT_AUTHZ_FILTER,
    NODE_KEY,
    RBAC_FILTER,
    ROUTE_NAMESPACE,
    TOKENS_PATH,
    token_secret_name,
)
from ..policy.config import Config
from ..policy.outcomes import denial_body
from ..policy.routing import RouteKind
from . import clusters, data_plane
from .enforcement import BySidecar, mark_local_reply, status_is
from .filters import rbac
from .options import DataPlane, HostPort, SidecarAddress, is_ip, watchdog_address
from .plan import Plan, ServerPlan

# The watchdog: each oauth2 server's endpoint is health-checked at the sidecar's admin
# listener (GET /tokens/NAME), 200 while it holds a usable token. A dead sidecar, or a token
# expired without a successor, makes the endpoint unhealthy within WATCHDOG_INTERVAL x
# WATCHDOG_THRESHOLD: no request goes out with a stale token after that.
WATCHDOG_INTERVAL = timedelta(seconds=1)
WATCHDOG_THRESHOLD = 2
WATCHDOG_RECHECK = timedelta(milliseconds=200)
ADS_SOURCE = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


class ByEnvoy(BySidecar):
    """The native data path: Envoy decides visibility and sets tokens itself."""

    # Only on the routes that name it (tool rules, the registry, discovery documents).
    authz_disabled = True
    # The listener may arrive while a cluster it names still warms (its first health
    # check): not a reason to refuse the listener; such a route answers 503.
    validate_clusters = False
    def __init__(self, watchdog: SidecarAddress) -> None:
        self.watchdog = watchdog

    def check(self) -> None:
        if isinstance(self.watchdog, HostPort) and not is_ip(self.watchdog.host):
            # Envoy 1.40 aborts (not a NACK: the process) on a name in an endpoint's
            # health_check_config address.
            raise ValueError(f"the watchdog's address {self.watchdog.host!r} is a name, not"
                             " an IP")

    def route_filters(self, plan: Plan, server: str, kind: RouteKind,
                      common: dict[str, AnyMessage]) -> dict[str, AnyMessage]:
        per_filter = {}
        if kind != "registry":
            # Envoy decides visibility itself: the same 404 (the listener's mapper) for a
            # hidden server as for the catch-all, which no one may pass.
            rules = rbac.per_route(plan.policy, server)
            if rules is not None:
                per_filter[RBAC_FILTER] = rules
        per_filter.update(common)
        known = plan.server(server)
        if kind == "mcp" and not (known is not None and (known.has_item_rules
                                                         or known.exchanges)):
            # Envoy alone: RBAC above, the token from the upstream cluster's injector. The
            # sidecar is asked only where it must read a body, exchange a caller's token
            # (per user: no static secret can hold it), or answer for the caller (the
            # registry, a discovery document naming the gateway).
            del per_filter[EXT_AUTHZ_FILTER]
        return per_filter

    def route_metadata(self, server: str) -> dict[str, Struct]:
        # The access log names a request's server from its route (no sidecar to say).
        return {ROUTE_NAMESPACE: Struct.from_dict({"server": server})}

    def log_fields(self, fields: dict[str, str]) -> dict[str, str]:
        # Most requests never reach the sidecar, so its decision log misses them: Envoy
        # says who it took for the client (the XFF walk), the route's server, what RBAC
        # did, and why it answered so (rbac_access_denied_matched_policy[none], a failed
        # credential injection, or via_upstream).
        return {**fields,
                "client_ip": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                "server": f"%METADATA(ROUTE:{ROUTE_NAMESPACE}:server)%",
                "rbac": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_engine_result)%",
                "details": "%RESPONSE_CODE_DETAILS%"}

    def filters_before_authz(self) -> list[HttpFilter]:
        return [rbac.http_filter()]

    def local_replies(self) -> LocalReplyConfig:
        """Envoy's own answers, made to be the sidecar's.

        RBAC's denial (a hidden server, or the catch-all) becomes the unknown server's 404;
        the credential injector's 401 (no token to inject) and the watchdog's "no healthy
        upstream" become the sidecar's 503.
        """
        # Keyed on the status: RBAC's dynamic metadata is set only after its local reply has
        # been sent (and mapped), and its response flag is not one a filter may name. No
        # other local reply of this listener is a 403 (ext_authz's failures are 503s).
        denied, no_token = status_is(403, "denied"), status_is(401, "no_token")
        # Only the oauth2 servers' endpoints are health-checked (the watchdog).
        watchdog = AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["UH"]))
        # A 401 of the sidecar's (ext_authz, flag UAEX: a caller's token that cannot be
        # exchanged) stays one, with its challenge: the first mapper that matches is the one.
        refused = AccessLogFilter(and_filter=AndFilter(filters=[
            no_token, AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["UAEX"]))]))
        return LocalReplyConfig(mappers=[
            ResponseMapper(filter=refused),
            ResponseMapper(filter=denied, status_code=404,
                           body_format_override=_json_reply("not_found"),
                           headers_to_add=[mark_local_reply()]),
            *(ResponseMapper(filter=failed, status_code=503,
                             body_format_override=_json_reply("upstream_credentials_unavailable"))
              for failed in (no_token, watchdog)),
        ])

    def upstream_cluster(self, cluster: Cluster, server: ServerPlan) -> Cluster:
        """Envoy sets the server's token itself, and stops when it may no longer be good.

        The token is the secret the sidecar serves (SDS over the ADS stream) and replaces
        as it refreshes; without one (none fetched, or expired without a successor) the
        injector fails the request with a local 401, answered as the sidecar's 503. Envoy
        keeps the last secret while the sidecar is gone, so the endpoint is also
        health-checked at the sidecar's admin listener (the watchdog): unhealthy, no
        request is sent at all (503).
        """
        if server.caller_brings_token or server.exchanges:
            return cluster  # no token of the gateway's own: the caller's, or the sidecar's
        assert server.upstream is not None
        options = clusters.protocol("alpn" if server.upstream.tls else "h1")
        injector = CredentialInjector(
            overwrite=True,  # never the caller's own Authorization
            allow_request_without_credential=False,
            credential=TypedExtensionConfig(
                name="envoy.http.injected_credentials.generic",
                typed_config=AnyMessage.pack(Generic(
                    credential=SdsSecretConfig(name=token_secret_name(server.name),
                                               sds_config=ADS_SOURCE),
                    header="Authorization", header_value_prefix="Bearer "))))
        options.http_filters = [
            HttpFilter(name="envoy.filters.http.credential_injector",
                       typed_config=AnyMessage.pack(injector)),
            HttpFilter(name="envoy.filters.http.upstream_codec",
                       typed_config=AnyMessage.pack(UpstreamCodec())),
        ]
        cluster.typed_extension_protocol_options[clusters.PROTOCOL_OPTIONS] = (
            AnyMessage.pack(options))
        assert cluster.load_assignment is not None
        for locality in cluster.load_assignment.endpoints:
            for lb_endpoint in locality.lb_endpoints:
                assert lb_endpoint.endpoint is not None
                lb_endpoint.endpoint.health_check_config = EndpointHealthCheckConfig(
                    address=clusters.address(self.watchdog))
        cluster.health_checks = [HealthCheck(
            timeout=WATCHDOG_INTERVAL, interval=WATCHDOG_INTERVAL,
            no_traffic_interval=WATCHDOG_INTERVAL,  # not Envoy's 60 s while the route is idle
            # Unhealthy (a new Envoy before it took its token, or one that came back), it is
            # asked again soon: serving a moment after its token is in.
            unhealthy_interval=WATCHDOG_RECHECK,
            unhealthy_threshold=WATCHDOG_THRESHOLD, healthy_threshold=1,
            http_health_check=HealthCheckHttpHealthCheck(path=f"{TOKENS_PATH}{server.name}"))]
        # No healthy endpoint means no request: never Envoy's panic mode, which sends anyway.
        cluster.common_lb_config = ClusterCommonLbConfig(
            healthy_panic_threshold=Percent(value=0))
        return cluster


def _json_reply(reason: Literal["not_found", "upstream_credentials_unavailable"]
                ) -> SubstitutionFormatString:
    # The sidecar's own denial, byte for byte: its body and content-type.
    return SubstitutionFormatString(
        text_format_source=DataSource(inline_string=denial_body(reason).decode()),
        content_type="application/json")


def snapshot(config: Config, plane: DataPlane, watchdog: SidecarAddress | None = None
             ) -> tuple[Listener, list[Cluster]]:
    """The listener and clusters an Envoy with these flags is served; a ValueError if there
    are none (`watchdog`: the admin listener's address as resolved, else as configured)."""
    return data_plane.resources(data_plane.resolved_plan(config, plane), plane,
                                ByEnvoy(watchdog or watchdog_address(config, plane)))


Resources = tuple[tuple[str, bytes], ...]  # (name, serialized message), in a fixed order


# Renders run here, one at a time, never on the event loop.
_RENDERER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")


def _rendered(config: Config, plane: DataPlane, watchdog: SidecarAddress
              ) -> tuple[Resources, list[Cluster]]:
    built_listener, built_clusters = snapshot(config, plane, watchdog)
    return ((built_listener.name, bytes(built_listener)),), built_clusters


def _for_node(clusters: list[Cluster], node_id: str) -> Resources:
    """The clusters as one Envoy is sent them: its watchdog asks for it by node id (is the
    token in *this* Envoy?), not only for the sidecar."""
    served = []
    for cluster in clusters:
        checks = [check.http_health_check for check in cluster.health_checks
                  if check.http_health_check is not None
                  and check.http_health_check.path.startswith(TOKENS_PATH)]
        paths = [check.path for check in checks]
        for check in checks:
            check.path = f"{check.path}?node={urllib.parse.quote(node_id, safe='')}"
        served.append((cluster.name, bytes(cluster)))
        for check, path in zip(checks, paths, strict=True):
            check.path = path
    return tuple(served)


class RenderError(ValueError):
    """The config cannot be turned into this Envoy's listener and clusters."""


async def _resolve(host: str) -> str:
    """An IP for a host name (an IP stays as it is), IPv4 first as Envoy's sidecar cluster
    prefers: Envoy takes no name in a health check's address."""
    if is_ip(host):
        return host
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RenderError(f"cannot resolve {host!r}, where Envoy reaches the sidecar's"
                         f" admin listener for the watchdog ({exc})") from None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    return str(found[0][4][0])


class Snapshots:
    """What the control plane serves an Envoy: its listener and clusters for the current
    config and the flags in its node metadata, serialized; built once per config and node
    shape (Envoys with the same flags share one), off the event loop, and dropped with the
    config."""

    def __init__(self) -> None:
        # betterproto2 builds each message class's schema on first use, and not safely from
        # two threads at once: the secrets (built here) are warmed up first, and the
        # renders go to one thread of their own.
        self.secret("warm-up", "")
        self._config: Config | None = None
        self._built: dict[str, asyncio.Future[tuple[Resources, list[Cluster]]]] = {}
        self._served: dict[tuple[str, str], Resources] = {}  # the clusters, per node id

    async def resources(self, config: Config, node: Mapping[str, Any]
                        ) -> tuple[Resources, Resources]:
        """The listener and the clusters; a RenderError saying why there are none."""
        plane_data = node.get(NODE_KEY)
        if not isinstance(plane_data, Mapping):
            raise RenderError(f"its node metadata has no {NODE_KEY!r} (a bootstrap written"
                             " by `envoy-config --data-path native` has)")
        try:
            plane = DataPlane.from_struct(plane_data)
            watchdog = watchdog_address(config, plane)
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        if isinstance(watchdog, HostPort):
            watchdog = HostPort(await _resolve(watchdog.host), watchdog.port)
        if config is not self._config:  # one config is served at a time
            self._config, self._built, self._served = config, {}, {}
        key = repr((sorted(plane_data.items()), watchdog))
        built = self._built.get(key)
        if built is None:
            # Rendered once for every Envoy of this shape, in a thread: the event loop goes
            # on answering checks and the watchdog's health checks meanwhile.
            built = self._built[key] = asyncio.get_running_loop().run_in_executor(
                _RENDERER, _rendered, config, plane, watchdog)
        try:
            listener, clusters = await asyncio.shield(built)
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        node_id = str(node.get("_id", ""))
        served = self._served.get((key, node_id))
        if served is None:
            served = self._served[(key, node_id)] = _for_node(clusters, node_id)
        return listener, served

    @staticmethod
    def secret(name: str, token: str) -> bytes:
        """A token as the SDS secret Envoy's credential injector reads ("" : none)."""
        return bytes(Secret(name=name, generic_secret=GenericSecret(
            secret=DataSource(inline_string=token))))
