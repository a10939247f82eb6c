"""Clusters: the sidecar's (checks, bodies, xDS), each upstream's, and the JWKS host's."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    Pipe,
    SocketAddress,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CommonProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsAutoHttpConfig,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from ..contract import AUTHZ_SERVICE
from ..policy.config import UpstreamAddress
from . import tls
from .options import HostPort, SidecarAddress, SidecarTLS, UnixSocket, is_ip

PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def protocol(kind: str) -> HttpProtocolOptions:
    """HTTP/2 (`h2`), HTTP/1.1 (`h1`), or whichever a TLS upstream offers (`alpn`)."""
    if kind == "alpn":
        # A TLS upstream: HTTP/2 when the server offers it in ALPN, else HTTP/1.1.
        return HttpProtocolOptions(auto_config=HttpProtocolOptionsAutoHttpConfig(
            http_protocol_options=Http1ProtocolOptions(),
            http2_protocol_options=Http2ProtocolOptions()))
    return HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions() if kind == "h2" else None,
        http_protocol_options=Http1ProtocolOptions() if kind == "h1" else None))


def address(where: SidecarAddress) -> Address:
    """An Envoy address: a socket, or a unix pipe."""
    if isinstance(where, UnixSocket):
        return Address(pipe=Pipe(path=where.path))
    return Address(socket_address=SocketAddress(address=where.host, port_value=where.port))


def cluster(name: str, addresses: list[SidecarAddress], *, protocol_kind: str) -> Cluster:
    """A cluster of fixed endpoints, by IP (static) or by name (DNS)."""
    static = all(isinstance(a, UnixSocket) or is_ip(a.host) for a in addresses)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if static else ClusterDiscoveryType.STRICT_DNS,
        # Envoy's default (AUTO) takes the AAAA record whenever a name has one, as Docker's
        # DNS gives on an IPv6-enabled network, and a service listening on 0.0.0.0 is then
        # unreachable (every check a 503). Prefer IPv4; IPv6 still serves v6-only names.
        dns_lookup_family=(
            ClusterDnsLookupFamily.AUTO if static else ClusterDnsLookupFamily.V4_PREFERRED),
        connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={PROTOCOL_OPTIONS:
                                          AnyMessage.pack(protocol(protocol_kind))},
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[
                LbEndpoint(endpoint=Endpoint(address=address(a))) for a in addresses])],
        ),
    )


def sidecar(name: str, sidecars: list[SidecarAddress], sidecar_tls: SidecarTLS | None,
            max_stream_s: float = 0) -> Cluster:
    """The sidecar's gRPC cluster, health-checked: no check goes to a sidecar whose tokens
    are not warm."""
    built = cluster(name, sidecars, protocol_kind="h2")
    if max_stream_s:
        options = protocol("h2")
        options.common_http_protocol_options = CommonProtocolOptions(
            max_stream_duration=timedelta(seconds=max_stream_s))
        built.typed_extension_protocol_options[PROTOCOL_OPTIONS] = AnyMessage.pack(options)
    if sidecar_tls is not None:
        built.transport_socket = tls.to_sidecar(sidecar_tls)
    # A worker whose tokens are not warm (health NOT_SERVING) is passed over while at least
    # half are healthy. A lone sidecar, or most of them, unhealthy: Envoy's panic routing
    # asks them anyway, and each answers for itself (503 for a server without its token,
    # the decision for the others), rather than Envoy failing every server. Checked every
    # 2 s from the start: Envoy's default for a cluster with no traffic yet is 60 s, and a
    # sidecar back to health was only noticed a minute later.
    built.health_checks = [HealthCheck(
        timeout=timedelta(seconds=1),
        interval=timedelta(seconds=2),
        no_traffic_interval=timedelta(seconds=2),
        unhealthy_threshold=2,
        healthy_threshold=1,
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=AUTHZ_SERVICE),
    )]
    return built


def upstream(name: str, where: UpstreamAddress, ca_file: str | None) -> Cluster:
    """A cluster for an upstream named by URL or host:port (TLS checked against its host)."""
    built = cluster(name, [HostPort(where.host, where.port)],
                    protocol_kind="alpn" if where.tls else "h1")
    if where.tls:
        built.transport_socket = tls.to_upstream(where, ca_file)
    return built
