"""Render an Envoy bootstrap for a sidecar config, from typed envoy-data-plane messages.

Built as typed messages (so a misspelt field fails here, not in Envoy), then written as
YAML. envoy-data-plane is imported only under render/: the serving hot path never touches
its betterproto2 messages. This module assembles; each resource has its own builder
(clusters, routes, listener, filters/), and native.py holds the native data path's.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    BackoffStrategy,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Node,
    RetryPolicy,
    SocketAddress,
)
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ..contract import AUTHZ_CLUSTER, BODIES_CLUSTER, NODE_KEY, XDS_CLUSTER
from ..policy.config import Config, UpstreamAddress
from . import clusters, data_plane, tls
from .enforcement import BY_SIDECAR
from .native import ADS_SOURCE, ByEnvoy
from .options import (
    DEFAULT_MAX_CONNECTIONS,
    NO_TIMEOUTS,
    DataPath,
    DataPlane,
    HostPort,
    ListenerTLS,
    SidecarAddress,
    SidecarTLS,
    Timeouts,
    UnixSocket,
    check_tls,
    sidecar_endpoints,
    watchdog_address,
)

# Envoy's reconnection to the control plane: from a quarter second, at most two seconds apart
# (jittered).
XDS_RETRY_BASE, XDS_RETRY_MAX = timedelta(milliseconds=250), timedelta(seconds=2)


def connection_limit(most: int) -> OverloadManager:
    """At most `most` downstream connections open at once, across every listener: past it
    Envoy accepts no more until some close."""
    if most < 1:
        raise ValueError(f"--max-connections {most}: give at least 1")
    monitor = DownstreamConnectionsConfig(max_active_downstream_connections=most)
    return OverloadManager(resource_monitors=[ResourceMonitor(
        name="envoy.resource_monitors.global_downstream_max_connections",
        typed_config=AnyMessage.pack(monitor))])


def build_bootstrap(
    config: Config,
    upstreams: Mapping[str, UpstreamAddress],
    *,
    listen: HostPort,
    admin: HostPort,
    sidecar: SidecarAddress,
    workers: int = 1,
    sidecar_tls: SidecarTLS | None = None,
    upstream_ca: str | None = None,
    timeouts: Timeouts = NO_TIMEOUTS,
    data_path: DataPath = "ext_authz",
    listener_tls: ListenerTLS | None = None,
    node_id: str = "mcp-ext-authz",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Bootstrap:
    """Build the bootstrap: one listener, the filters, a route and a cluster per server.

    `upstreams` overrides the servers' own `upstream` settings (`resolve_upstreams`). In
    the native data path the listener and those clusters are the sidecar's to serve: the
    bootstrap holds the sidecar's clusters and says what to ask it for, as `node_id` (one
    per Envoy: the sidecar's logs, and its watchdog, tell Envoys apart by it).
    """
    check_tls(config, sidecar_tls)
    sidecars = sidecar_endpoints(sidecar, workers)
    first = sidecars[0]
    plane = DataPlane(listen, dict(upstreams), upstream_ca, timeouts,
                      "127.0.0.1" if isinstance(first, UnixSocket) else first.host,
                      listener_tls)
    native = data_path == "native"
    plan = data_plane.resolved_plan(config, plane)
    if native:
        # Rendered by the sidecar when Envoy asks; here what would stop it doing so.
        data_plane.check(plan, plane, ByEnvoy(HostPort("127.0.0.1", 1)))
        watchdog_address(config, plane)
    else:
        listener, upstream_clusters = data_plane.resources(plan, plane, BY_SIDECAR)
    sidecar_clusters = [clusters.sidecar(AUTHZ_CLUSTER, sidecars, sidecar_tls)]
    if plan.reads_bodies or native:  # native: a reload may bring tool rules
        sidecar_clusters.append(clusters.sidecar(BODIES_CLUSTER, sidecars, sidecar_tls,
                                                 timeouts.receive(config)))
    bootstrap = Bootstrap(admin=Admin(address=Address(socket_address=SocketAddress(
        address=admin.host, port_value=admin.port))),
        overload_manager=connection_limit(max_connections))
    if not native:
        bootstrap.static_resources = BootstrapStaticResources(
            listeners=[listener], clusters=[*sidecar_clusters, *upstream_clusters])
        return bootstrap
    # The control plane: no health checks (Envoy must reach it before any token is warm),
    # one stream for listener, clusters and secrets, so that they arrive in order.
    xds = clusters.cluster(XDS_CLUSTER, sidecars, protocol_kind="h2")
    if sidecar_tls is not None:
        xds.transport_socket = tls.to_sidecar(sidecar_tls)
    sidecar_clusters.append(xds)
    bootstrap.node = Node(id=node_id, cluster="mcp-ext-authz",
                          metadata=Struct.from_dict({NODE_KEY: plane.to_struct()}))
    bootstrap.static_resources = BootstrapStaticResources(clusters=sidecar_clusters)
    bootstrap.dynamic_resources = BootstrapDynamicResources(
        ads_config=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC, transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=XDS_CLUSTER,
                # Back soon after the sidecar is: Envoy's default backoff grows to 30 s,
                # and until an Envoy is back its watchdog keeps its oauth2 servers at 503.
                retry_policy=RetryPolicy(retry_back_off=BackoffStrategy(
                    base_interval=XDS_RETRY_BASE, max_interval=XDS_RETRY_MAX))))],
            set_node_on_first_message_only=True),
        lds_config=ADS_SOURCE, cds_config=ADS_SOURCE)
    return bootstrap


def render(bootstrap: Bootstrap) -> str:
    """Write a bootstrap as YAML with proto field names."""
    data: dict[str, Any] = bootstrap.to_dict(casing=_snake_case())
    header = "# Generated by `mcp-ext-authz envoy-config`; edit the sidecar config instead.\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def _snake_case() -> Any:
    import betterproto2

    return betterproto2.Casing.SNAKE
