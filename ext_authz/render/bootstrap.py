"""Render an Envoy bootstrap for a sidecar config, from typed envoy-data-plane messages.

Built as typed messages (so a misspelt field fails here, not in Envoy), then written as
YAML. envoy-data-plane is imported only by this module: the serving hot path never
touches its betterproto2 messages.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ResponseFlagFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.accesslog.v3 import (
    ComparisonFilter as Comparison,
)
from envoy_data_plane.envoy.config.accesslog.v3 import (
    ComparisonFilterOp as ComparisonOp,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as MutationRule,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutationRemoveOnMatch,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    CidrRange,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    JsonFormatOptions,
    Metadata,
    Node,
    Pipe,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CommonProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    EndpointHealthCheckConfig,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Principal,
    PrincipalAuthenticated,
    PrincipalSet,
    Rbac,
    RbacAction,
    SourcedMetadata,
)
from envoy_data_plane.envoy.config.rbac.v3 import Policy as RbacPolicy
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3 import (
    CredentialInjector,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    CheckSettings,
    ExtAuthz,
    ExtAuthzPerRoute,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation,
    Mutations,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3 import Generic
from envoy_data_plane.envoy.extensions.http.original_ip_detection.xff.v3 import (
    XffConfig,
    XffTrustedCidrs,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsAutoHttpConfig,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Empty, Struct

from ..edges.authz import EXT_AUTHZ_NAMESPACE, JWT_AUTHN_NAMESPACE, SERVICE_NAME
from ..edges.ext_proc import EXT_PROC_NAMESPACE
from ..ops.admin import TOKENS_PATH
from ..policy.config import Config, NetworkDefinition, UpstreamAddress
from ..policy.decision import denial_body
from ..policy.routing import (
    KIND_EXTENSION,
    NO_SERVER,
    PROTECTED_RESOURCE,
    TOOL_RULES_BY_EXT_PROC,
    TOOL_RULES_EXTENSION,
    RouteKind,
)

AUTHZ_CLUSTER = "mcp_ext_authz"
# The same sidecar, for the request ext_proc filter alone: its streams (headers to judged
# body) are cut at --receive-timeout, which no other stream to the sidecar may be.
BODIES_CLUSTER = "mcp_ext_authz_bodies"
EXT_AUTHZ_FILTER = EXT_AUTHZ_NAMESPACE
EXT_PROC_FILTER = EXT_PROC_NAMESPACE
ANSWERS_FILTER = "mcp_ext_authz.answers"  # a second ext_proc filter, for the answers
CHALLENGE_FILTER = "mcp_ext_authz.challenge"  # Lua: an upstream's 401 names the gateway
# An upstream that wants the caller's own token answers 401 with a challenge naming its
# metadata URL (RFC 9728 section 5.1), which a client behind the gateway cannot use: the URL
# becomes the gateway's, from the origin the caller used (its Host and X-Forwarded-Proto,
# read as the sidecar reads them for the discovery document) and the route's metadata
# path. Every other parameter of the challenge stays. Without an origin, the upstream's URL
# is dropped rather than shown.
CHALLENGE_LUA = """\
function envoy_on_request(handle)
  -- The origin the caller addressed, as the sidecar's request_origin says it.
  local headers = handle:headers()
  local authority = headers:get(":authority") or ""
  local scheme = (headers:get("x-forwarded-proto") or ""):match("^%s*([^,]-)%s*$") or ""
  if scheme == "" then scheme = headers:get(":scheme") or "http" end
  scheme = scheme:lower()
  if (scheme == "http" or scheme == "https") and #authority <= 255
      and authority:match("^[%w%.%-_~:%[%]]+$") then
    handle:streamInfo():dynamicMetadata():set("mcp_ext_authz.challenge", "origin",
                                              scheme .. "://" .. authority)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local count = headers:getNumValues("www-authenticate")
  if count == 0 then return end
  local mine = handle:streamInfo():dynamicMetadata():get("mcp_ext_authz.challenge")
  local path = handle:metadata():get("metadata_path")
  local replacement = ""
  if mine ~= nil and mine["origin"] ~= nil and path ~= nil then
    local url = mine["origin"] .. path
    replacement = 'resource_metadata="' .. url:gsub("%%", "%%%%") .. '"'
  end
  local challenges = {}
  for i = 0, count - 1 do
    local value = headers:getAtIndex("www-authenticate", i)
    challenges[#challenges + 1] = (value:gsub('resource_metadata="[^"]*"', replacement))
  end
  headers:remove("www-authenticate")
  for _, value in ipairs(challenges) do
    headers:add("www-authenticate", value)
  end
end
"""
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
RBAC_FILTER = "envoy.filters.http.rbac"
JWT_FILTER = JWT_AUTHN_NAMESPACE  # also the namespace of its verified payloads
JWT_PROVIDER = "mcp_ext_authz"
JWKS_CLUSTER = "mcp_ext_authz_jwks"
ROUTE_NAMESPACE = "mcp_ext_authz"  # route metadata: the server a route is for
# The native data path: Envoy's node metadata carries envoy-config's flags (DataPlane) under
# this key; listener, clusters and token secrets come from the sidecar on one ADS stream.
NODE_KEY = "mcp_ext_authz"
XDS_CLUSTER = "mcp_ext_authz_xds"
TOKEN_SECRET_PREFIX = "mcp_ext_authz_token/"
# The watchdog: each oauth2 server's endpoint is health-checked at the sidecar's admin
# listener (GET /tokens/NAME), 200 while it holds a usable token. A dead sidecar, or a token
# expired without a successor, makes the endpoint unhealthy within WATCHDOG_INTERVAL x
# WATCHDOG_THRESHOLD: no request goes out with a stale token after that.
WATCHDOG_INTERVAL = timedelta(seconds=1)
WATCHDOG_THRESHOLD = 2
DataPath = Literal["ext_authz", "native"]
DATA_PATHS: tuple[DataPath, ...] = ("ext_authz", "native")
_ADS_SOURCE = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
# Reading a body of mcp.max_body_bytes takes milliseconds; past this the sidecar is in trouble
# and Envoy answers the request itself (504), never forwarding it unjudged.
EXT_PROC_TIMEOUT = timedelta(seconds=2)
# Envoy must wait longer than one whole cold token fetch, or its generic 403 wins the race
# against the sidecar's own 503.
AUTHZ_TIMEOUT_MARGIN_S = 0.5
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300  # Envoy's own default, for the routes that are not MCP's
DEFAULT_RECEIVE_TIMEOUT_S = 30.0
DISCOVERY_TIMEOUT_S = 15  # a metadata document: Envoy's default route timeout
# An ext_proc filter that is off by default, turned on for one route: Envoy turns on a
# filter that a route configures (here with nothing to override). FilterConfig's own way,
# an empty Any, has no JSON or YAML spelling.
_ENABLED = AnyMessage.pack(ExtProcPerRoute(overrides=ExtProcOverrides()))
# The system's CAs where Envoy runs: Debian, Ubuntu and the envoyproxy/envoy image keep them
# here. Elsewhere, give --upstream-ca.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_TIMEOUT_S = 86400 * 365


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """A sidecar listening on `unix:PATH` (`grpc.listen`), worker i on PATH.i."""

    path: str


SidecarAddress = HostPort | UnixSocket


def parse_sidecar(text: str) -> SidecarAddress:
    """`host:port` or `unix:/path`, as `grpc.listen` spells it."""
    if text.startswith("unix:"):
        if len(text) <= len("unix:"):
            raise ValueError(f"{text!r}: unix: needs a path")
        return UnixSocket(text[len("unix:"):])
    return HostPort.parse(text)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long Envoy lets an MCP request run, and sit silent (0: no limit).

    MCP needs both unlimited by default: a tool call may run for minutes before it answers,
    and a server-to-client GET stream may carry nothing for hours. Envoy's own defaults
    (a 15 s route timeout, a 300 s stream idle timeout) cut both.

    The request itself, though, must arrive in `receive_s` (408 past it, HCM
    request_timeout), and be judged in as long again (500, the bodies cluster's
    max_stream_duration): ext_proc reads the body in FULL_DUPLEX_STREAMED mode, to which
    Envoy 1.40 applies no message_timeout, so a sidecar that took the stream and never
    answered would hold the request for ever (never forwarding it). The sidecar ends each
    such stream as soon as it has judged the request.
    """

    request_s: float = 0  # the whole request and its answer (RouteAction.timeout)
    idle_s: float = 0  # no bytes either way (RouteAction.idle_timeout)
    # Until the request is sent upstream whole (HCM request_timeout). None: 30 s, or longer
    # when a cold token fetch may take longer (its 503 must beat Envoy's 408).
    receive_s: float | None = None

    def receive(self, config: Config) -> float:
        """The receive limit for this config; a ValueError if it would cut a token fetch."""
        fetch = config.tokens.timeout_s + AUTHZ_TIMEOUT_MARGIN_S
        if self.receive_s is None:
            return max(DEFAULT_RECEIVE_TIMEOUT_S, fetch + AUTHZ_TIMEOUT_MARGIN_S)
        if 0 < self.receive_s <= fetch:
            raise ValueError(f"--receive-timeout {self.receive_s:g} must be longer than"
                             f" tokens.timeout_s + {AUTHZ_TIMEOUT_MARGIN_S:g} ({fetch:g}), or"
                             " a slow token fetch ends in Envoy's 408 rather than the"
                             " sidecar's 503")
        return self.receive_s

    def __post_init__(self) -> None:
        for name, value in (("request", self.request_s), ("idle", self.idle_s),
                            ("receive", self.receive_s or 0)):
            if not 0 <= value <= MAX_TIMEOUT_S:
                raise ValueError(f"--{name}-timeout {value:g}: give 0 (no limit) or up to"
                                 f" {MAX_TIMEOUT_S} seconds")


@dataclass(frozen=True, slots=True)
class SidecarTLS:
    """How Envoy reaches a sidecar that serves TLS (`grpc.tls`): CA, and a client cert for mTLS."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    sni: str = ""


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """The listener's TLS, for callers who present certificates (principals in rules)."""

    cert_file: str
    key_file: str
    client_ca_file: str  # the CA whose certificates name callers (their URI SANs)


def _check_tls(config: Config, tls: SidecarTLS | None) -> None:
    served = config.grpc.tls
    if served is None:
        if tls is not None:
            raise ValueError("--sidecar-ca given, but the sidecar serves plaintext (no grpc.tls)")
        return
    if tls is None:
        raise ValueError("grpc.tls is set, so Envoy must speak TLS to the sidecar:"
                         " give --sidecar-ca (and --sidecar-cert/--sidecar-key for mTLS)")
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("give both --sidecar-cert and --sidecar-key, or neither")
    if served.client_ca_file is not None and tls.cert_file is None:
        raise ValueError("grpc.tls.client_ca_file requires a client certificate:"
                         " give --sidecar-cert and --sidecar-key")


def _transport_socket(tls: SidecarTLS) -> TransportSocket:
    certificates = []
    if tls.cert_file is not None and tls.key_file is not None:
        certificates = [TlsCertificate(certificate_chain=DataSource(filename=tls.cert_file),
                                       private_key=DataSource(filename=tls.key_file))]
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificates=certificates,
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.ca_file)),
        ),
        sni=tls.sni,
    )
    return TransportSocket(name="envoy.transport_sockets.tls",
                           typed_config=AnyMessage.pack(context))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _protocol(kind: str) -> HttpProtocolOptions:
    if kind == "alpn":
        # A TLS upstream: HTTP/2 when the server offers it in ALPN, else HTTP/1.1.
        return HttpProtocolOptions(auto_config=HttpProtocolOptionsAutoHttpConfig(
            http_protocol_options=Http1ProtocolOptions(),
            http2_protocol_options=Http2ProtocolOptions()))
    return HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions() if kind == "h2" else None,
        http_protocol_options=Http1ProtocolOptions() if kind == "h1" else None))


def _cluster(name: str, addresses: list[SidecarAddress], *, protocol: str) -> Cluster:
    static = all(isinstance(a, UnixSocket) or _is_ip(a.host) for a in addresses)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if static else ClusterDiscoveryType.STRICT_DNS,
        # Envoy's default (AUTO) takes the AAAA record whenever a name has one, as Docker's
        # DNS gives on an IPv6-enabled network, and a service listening on 0.0.0.0 is then
        # unreachable (every check a 503). Prefer IPv4; IPv6 still serves v6-only names.
        dns_lookup_family=(
            ClusterDnsLookupFamily.AUTO if static else ClusterDnsLookupFamily.V4_PREFERRED),
        connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions":
                AnyMessage.pack(_protocol(protocol))
        },
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[
                LbEndpoint(endpoint=Endpoint(address=_address(a))) for a in addresses])],
        ),
    )


def _address(address: SidecarAddress) -> Address:
    if isinstance(address, UnixSocket):
        return Address(pipe=Pipe(path=address.path))
    return Address(socket_address=SocketAddress(address=address.host,
                                                port_value=address.port))


def _authz_cluster(name: str, sidecars: list[SidecarAddress], tls: SidecarTLS | None,
                   max_stream_s: float = 0) -> Cluster:
    cluster = _cluster(name, sidecars, protocol="h2")
    if max_stream_s:
        options = _protocol("h2")
        options.common_http_protocol_options = CommonProtocolOptions(
            max_stream_duration=timedelta(seconds=max_stream_s))
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] = AnyMessage.pack(options)
    if tls is not None:
        cluster.transport_socket = _transport_socket(tls)
    # Envoy sends no checks to a sidecar until its tokens are warm (health SERVING).
    cluster.health_checks = [HealthCheck(
        timeout=timedelta(seconds=1),
        interval=timedelta(seconds=2),
        unhealthy_threshold=2,
        healthy_threshold=1,
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=SERVICE_NAME),
    )]
    return cluster


def _upstream_cluster(name: str, upstream: UpstreamAddress, ca_file: str | None) -> Cluster:
    """A cluster for an upstream named by URL or host:port (TLS checked against its host)."""
    cluster = _cluster(name, [HostPort(upstream.host, upstream.port)],
                       protocol="alpn" if upstream.tls else "h1")
    if upstream.tls:
        # The certificate must name the host we dial: Envoy checks no name unless told to.
        san = SubjectAltNameMatcher(
            san_type=(SubjectAltNameMatcherSanType.IP_ADDRESS if upstream.is_ip
                      else SubjectAltNameMatcherSanType.DNS),
            matcher=StringMatcher(exact=upstream.host))
        # The system's CA bundle by path: Envoy 1.40 refuses `system_root_certs` beside a
        # SAN check ("SAN-based verification without trusted CA is insecure").
        validation = CertificateValidationContext(
            match_typed_subject_alt_names=[san],
            trusted_ca=DataSource(filename=ca_file or SYSTEM_CA_BUNDLE))
        context = UpstreamTlsContext(
            common_tls_context=CommonTlsContext(alpn_protocols=["h2", "http/1.1"],
                                                validation_context=validation),
            sni="" if upstream.is_ip else upstream.host)
        cluster.transport_socket = TransportSocket(name="envoy.transport_sockets.tls",
                                                   typed_config=AnyMessage.pack(context))
    return cluster


def _inject_token(cluster: Cluster, name: str, upstream: UpstreamAddress,
                  watchdog: SidecarAddress) -> None:
    """The native data path: Envoy sets the server's token itself, and stops when it may
    no longer be good.

    The token is the secret the sidecar serves (SDS over the ADS stream) and replaces as
    it refreshes; without one (none fetched, or expired without a successor) the injector
    fails the request with a local 401, answered as the sidecar's 503. Envoy keeps the last
    secret while the sidecar is gone, so the endpoint is also health-checked at the
    sidecar's admin listener (the watchdog): unhealthy, no request is sent at all (503).
    """
    options = _protocol("alpn" if upstream.tls else "h1")
    injector = CredentialInjector(
        overwrite=True,  # never the caller's own Authorization
        allow_request_without_credential=False,
        credential=TypedExtensionConfig(
            name="envoy.http.injected_credentials.generic",
            typed_config=AnyMessage.pack(Generic(
                credential=SdsSecretConfig(name=token_secret_name(name), sds_config=_ADS_SOURCE),
                header="Authorization", header_value_prefix="Bearer "))))
    options.http_filters = [
        HttpFilter(name="envoy.filters.http.credential_injector",
                   typed_config=AnyMessage.pack(injector)),
        HttpFilter(name="envoy.filters.http.upstream_codec",
                   typed_config=AnyMessage.pack(UpstreamCodec())),
    ]
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] = AnyMessage.pack(options)
    assert cluster.load_assignment is not None
    for locality in cluster.load_assignment.endpoints:
        for lb_endpoint in locality.lb_endpoints:
            assert lb_endpoint.endpoint is not None
            lb_endpoint.endpoint.health_check_config = EndpointHealthCheckConfig(
                address=_address(watchdog))
    cluster.health_checks = [HealthCheck(
        timeout=WATCHDOG_INTERVAL, interval=WATCHDOG_INTERVAL,
        no_traffic_interval=WATCHDOG_INTERVAL,  # not Envoy's 60 s while the route is idle
        unhealthy_threshold=WATCHDOG_THRESHOLD, healthy_threshold=1,
        http_health_check=HealthCheckHttpHealthCheck(path=f"{TOKENS_PATH}{name}"))]
    # No healthy endpoint means no request: never Envoy's panic mode, which sends anyway.
    cluster.common_lb_config = ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0))


def _reads_bodies(config: Config) -> bool:
    return any(server.tools for server in config.servers.values())


def _discovers(config: Config) -> bool:
    """Whether a server's callers bring their own token (and may need OAuth discovery)."""
    return any(server.oauth2 is None for server in config.servers.values())


def _has_tool_rules(config: Config, server: str) -> bool:
    return server in config.servers and bool(config.servers[server].tools)


def _per_route(config: Config, server: str, kind: RouteKind = "mcp",
               native: bool = False) -> dict[str, AnyMessage]:
    # The route names its server and what it is: the sidecar then never reads the
    # client-chosen path.
    extensions = {config.routing.context_extension_key: server, KIND_EXTENSION: kind}
    per_filter = {}
    if native and kind != "registry":
        # Envoy decides visibility itself: the same 404 (the listener's mapper) for a hidden
        # server as for the catch-all, which no one may pass.
        rbac = _visibility_rbac(config, server)
        if rbac is not None:
            per_filter[RBAC_FILTER] = AnyMessage.pack(RbacPerRoute(rbac=RbacFilter(rules=rbac)))
    if kind == "discovery":
        per_filter[ANSWERS_FILTER] = _ENABLED  # names the gateway in the metadata document
    elif kind == "mcp" and server in config.servers and config.servers[server].oauth2 is None:
        per_filter[CHALLENGE_FILTER] = AnyMessage.pack(LuaPerRoute(name="challenge"))
    if kind == "mcp" and _has_tool_rules(config, server):
        # ext_authz decides the server from the headers alone, before any body is buffered
        # (a hidden server then answers exactly as an unknown one, whatever the body); the
        # ext_proc filters after it, off everywhere else, read the body for the tool rules
        # and rewrite the answer.
        extensions[TOOL_RULES_EXTENSION] = TOOL_RULES_BY_EXT_PROC
        for name in (EXT_PROC_FILTER, ANSWERS_FILTER):
            per_filter[name] = _ENABLED
    elif native and kind == "mcp":
        # Envoy alone: RBAC above, the token from the upstream cluster's injector. The
        # sidecar is asked only where it must read a body, or answer for the caller (the
        # registry, a discovery document naming the gateway).
        return per_filter
    settings = CheckSettings(context_extensions=extensions)
    per_filter[EXT_AUTHZ_FILTER] = AnyMessage.pack(ExtAuthzPerRoute(check_settings=settings))
    return per_filter


def _cidrs(networks: Any) -> list[Principal]:
    principals = []
    for network in networks:
        principals.append(Principal(remote_ip=CidrRange(
            address_prefix=str(network.network_address), prefix_len=network.prefixlen)))
        if network.version == 4:
            # The sidecar reads ::ffff:a.b.c.d as a.b.c.d (as the kernel routes it); Envoy's
            # CIDR match does not, so an IPv4 range also names its mapped form.
            mapped = ipaddress.IPv6Network(
                f"::ffff:{network.network_address}/{96 + network.prefixlen}")
            principals.append(Principal(remote_ip=CidrRange(
                address_prefix=str(mapped.network_address), prefix_len=mapped.prefixlen)))
    return principals


def _identity_principals(network: NetworkDefinition, claims_key: str) -> list[Principal]:
    """Who is in a network by identity, as RBAC says it: Envoy's own view of the mTLS peer
    (`authenticated`) and jwt_authn's verified payload (dynamic metadata)."""
    principals = []
    for pattern in network.principals:
        if pattern.endswith("/*"):
            # One last path segment, as the sidecar reads the wildcard.
            matcher = StringMatcher(safe_regex=RegexMatcher(
                regex=re.escape(pattern[:-1]) + "[^/]+"))
        else:
            matcher = StringMatcher(exact=pattern)
        principals.append(Principal(authenticated=PrincipalAuthenticated(
            principal_name=matcher)))
    for claim, values in network.jwt_claims.items():
        path = [MetadataMatcherPathSegment(key=claims_key),
                MetadataMatcherPathSegment(key=claim)]
        for value in values:
            exact = ValueMatcher(string_match=StringMatcher(exact=value))
            for held in (exact, ValueMatcher(list_match=ListMatcher(one_of=exact))):
                principals.append(Principal(sourced_metadata=SourcedMetadata(
                    metadata_matcher=MetadataMatcher(filter=JWT_FILTER, path=path,
                                                     value=held))))
    return principals


def _visibility_rbac(config: Config, server: str) -> Rbac | None:
    """Who may reach a server's routes in the native data path: None for everyone.

    The client address is Envoy's (`remote_ip`: the XFF walk through trusted_proxies). Where
    that walk cannot go on (an entry that does not parse, an ip:port entry, too many
    hops), Envoy falls back to the trusted proxy's own address, which the sidecar never
    takes for the client: so no address in trusted_proxies is ever let in here. Unknown
    server names (the catch-all) are let in by no one.
    """
    known = config.servers.get(server)
    if known is not None and known.available_on_public_internet:
        return None
    if known is None:
        return Rbac(action=RbacAction.ALLOW, policies={})  # nobody: the unknown server's 404
    visible = list(config.network.internal_ranges)
    identified: list[Principal] = []
    claims_key = config.jwt.payload_in_metadata if config.jwt is not None else ""
    for name in known.visible_to:
        network = config.network.networks[name]
        visible += network.cidrs
        identified += _identity_principals(network, claims_key)
    principals = identified
    if visible:
        seen = Principal(or_ids=PrincipalSet(ids=_cidrs(visible)))
        if config.network.trusted_proxies:
            proxy = Principal(or_ids=PrincipalSet(ids=_cidrs(config.network.trusted_proxies)))
            seen = Principal(and_ids=PrincipalSet(ids=[seen, Principal(not_id=proxy)]))
        principals = [seen, *identified]
    if not principals:
        return Rbac(action=RbacAction.ALLOW, policies={})
    return Rbac(action=RbacAction.ALLOW, policies={
        f"servers.{server}": RbacPolicy(permissions=[Permission(any=True)],
                                        principals=principals)})


def _answers() -> ExternalProcessor:
    # The answers to tools/call and tools/list: every answer's headers go to the sidecar,
    # which asks for the body of those it rewrites (mode_override: BUFFERED for JSON,
    # STREAMED for SSE) from what the request's stream left in the metadata. A second
    # filter because Envoy 1.40 ignores mode_override on a FULL_DUPLEX_STREAMED filter.
    return ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER)),
        failure_mode_allow=False,  # an answer the sidecar did not see never reaches a caller
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SKIP,
            response_header_mode=ProcessingModeHeaderSendMode.SEND,
            request_body_mode=ProcessingModeBodySendMode.NONE,
            response_body_mode=ProcessingModeBodySendMode.NONE,
            request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
            response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        ),
        allow_mode_override=True,
        message_timeout=EXT_PROC_TIMEOUT,
        metadata_options=MetadataOptions(forwarding_namespaces=MetadataOptionsMetadataNamespaces(
            untyped=[EXT_AUTHZ_FILTER, EXT_PROC_FILTER])),
    )


def _ext_proc(config: Config) -> ExternalProcessor:
    # The request only, never a response (an SSE stream must flow). Its body in full-duplex
    # mode: Envoy passes each piece on and holds the headers; the sidecar sends both back
    # once it has judged the whole body, or refuses (413 past mcp.max_body_bytes). In
    # BUFFERED mode, Envoy 1.40 stalls a request whose body passes its buffer limit.
    return ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=BODIES_CLUSTER)),
        failure_mode_allow=False,  # a body the sidecar did not judge never reaches a server
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SEND,
            response_header_mode=ProcessingModeHeaderSendMode.SKIP,
            request_body_mode=ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED,
            response_body_mode=ProcessingModeBodySendMode.NONE,
            request_trailer_mode=ProcessingModeHeaderSendMode.SEND,
            response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        ),
        # The sidecar sends the headers back after the body, and sets the length when it
        # changes the body (a hidden tool's call renamed).
        allow_content_length_header=True,
        message_timeout=EXT_PROC_TIMEOUT,
        # The caller's place comes from ext_authz's answer, not from a second look.
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ_FILTER]),
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_PROC_FILTER]),
        ),
    )


def _server_routes(config: Config, name: str, upstream: UpstreamAddress,
                   timeouts: Timeouts, native: bool = False) -> list[Route]:
    """A server's routes: its path (or host), rewritten to a URL upstream's own."""
    def action(rewrite: str | None) -> RouteAction:
        route = RouteAction(cluster=f"mcp_{name}", timeout=timedelta(seconds=timeouts.request_s),
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

    per_filter = _per_route(config, name, native=native)
    path = upstream.path  # a URL's path replaces the gateway's: /mcp/NAME -> /PATH
    prefix = config.routing.path_prefix
    whole, under = (f"{prefix}{name}", f"{prefix}{name}/") if prefix is not None else ("/", "/")
    matches: list[tuple[RouteMatch, str | None]]
    if path is None or (prefix is None and path == "/"):
        matches = [(RouteMatch(path=whole), None), (RouteMatch(prefix=under), None)]
        if prefix is None:
            matches = [(RouteMatch(prefix="/"), None)]
    else:
        matches = [(RouteMatch(path=whole), path),
                   (RouteMatch(prefix=under), path.rstrip("/") + "/")]
    server = config.servers[name]
    marks = _route_marks(name, native)
    if server.oauth2 is None:
        # Where the challenge filter points a client: this server's metadata at the gateway.
        marks[CHALLENGE_FILTER] = Struct.from_dict(
            {"metadata_path": PROTECTED_RESOURCE + (whole if prefix is not None else "")})
    metadata = Metadata(filter_metadata=marks) if marks else None
    routes = [Route(match=match, route=action(rewrite), typed_per_filter_config=per_filter,
                    metadata=metadata,
                    # The gateway holds this server's credential; the upstream's challenge
                    # (its own metadata URL) is nothing a client can act on.
                    response_headers_to_remove=["www-authenticate"] if server.oauth2 else [])
              for match, rewrite in matches]
    if server.oauth2 is None:
        routes.insert(0, _discovery_route(config, name, upstream, action, native))
    return routes


def _route_marks(server: str, native: bool) -> dict[str, Struct]:
    # The native access log names a request's server from its route (no sidecar to say).
    return {ROUTE_NAMESPACE: Struct.from_dict({"server": server})} if native else {}


def _discovery_route(config: Config, name: str, upstream: UpstreamAddress,
                     action: Callable[[str | None], RouteAction], native: bool) -> Route:
    """RFC 9728 metadata of a server whose caller brings its own token: the upstream's
    document, at the gateway's well-known path for the server, naming the gateway."""
    prefix = config.routing.path_prefix
    # The upstream publishes it for its own endpoint: a URL's path, or the gateway's path.
    own = upstream.path if upstream.path is not None else (
        f"{prefix}{name}" if prefix is not None else None)
    if prefix is not None:
        match = RouteMatch(path=f"{PROTECTED_RESOURCE}{prefix}{name}")
    else:
        match = RouteMatch(prefix=PROTECTED_RESOURCE)  # the server's own host
    rewrite = None if own is None else PROTECTED_RESOURCE + ("" if own == "/" else own)
    if rewrite == match.path:
        rewrite = None  # the upstream's own path already
    route_action = action(rewrite)
    # A short GET, not an MCP stream: Envoy's own request timeout.
    route_action.timeout = timedelta(seconds=DISCOVERY_TIMEOUT_S)
    route_action.idle_timeout = None
    marks = _route_marks(name, native)
    return Route(match=match, route=route_action,
                 metadata=Metadata(filter_metadata=marks) if marks else None,
                 typed_per_filter_config=_per_route(config, name, "discovery", native))


def _routes(config: Config, upstreams: Mapping[str, UpstreamAddress],
            timeouts: Timeouts, native: bool = False) -> list[VirtualHost]:
    # What no server route matches still goes through the sidecar, naming no server: its
    # 404 is then byte for byte the one a hidden server gets. (Left to the sidecar's own
    # path routing, `/mcp/public;x` would be "allowed" only to meet this route's 404.)
    not_found = Route(
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=404),
        typed_per_filter_config=_per_route(config, NO_SERVER, native=native),
    )
    shared = [not_found]
    registry = config.routing.registry_path
    if registry is not None:
        # Answered by the sidecar (ext_authz's local reply), from the same decision as every
        # other request: Envoy never gets this far. Other methods meet the catch-all.
        shared.insert(0, Route(
            match=RouteMatch(path=registry, headers=[HeaderMatcher(
                name=":method", string_match=StringMatcher(exact="GET"))]),
            direct_response=DirectResponseAction(status=404),
            typed_per_filter_config=_per_route(config, NO_SERVER, "registry", native)))
    if config.routing.path_prefix is not None:
        routes = [route for name in sorted(config.servers)
                  for route in _server_routes(config, name, upstreams[name], timeouts, native)]
        return [VirtualHost(name="mcp", domains=["*"], routes=[*routes, *shared])]
    suffix = config.routing.host_suffix or ""
    hosts = [
        VirtualHost(name=f"mcp_{name}", domains=[f"{name}{suffix}", f"{name}{suffix}:*"],
                    routes=_server_routes(config, name, upstreams[name], timeouts, native))
        for name in sorted(config.servers)
    ]
    hosts.append(VirtualHost(name="unknown", domains=["*"], routes=shared))
    return hosts


def _access_log(native: bool) -> AccessLog:
    fields = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "peer": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
        "duration_ms": "%DURATION%",
        "decision_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:decision_id)%",
        "server": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:server)%",
        "network": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:network)%",
        "client_ip": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:client_ip)%",
        "reason": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:reason)%",
        # Set on the routes of servers with tool rules, by the body's reading (ext_proc).
        "tool": f"%DYNAMIC_METADATA({EXT_PROC_FILTER}:tool)%",
        "tool_reason": f"%DYNAMIC_METADATA({EXT_PROC_FILTER}:reason)%",
    }
    if native:
        # Most requests never reach the sidecar, so its decision log misses them: Envoy
        # says who it took for the client (the XFF walk), the route's server, what RBAC
        # did, and why it answered so (rbac_access_denied_matched_policy[none], a failed
        # credential injection, or via_upstream).
        fields.update({
            "client_ip": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            "server": f"%METADATA(ROUTE:{ROUTE_NAMESPACE}:server)%",
            "rbac": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_engine_result)%",
            "details": "%RESPONSE_CODE_DETAILS%",
        })
    stdout = StdoutAccessLog(log_format=SubstitutionFormatString(
        json_format=Struct.from_dict(fields),
        json_format_options=JsonFormatOptions(sort_properties=False),
    ))
    return AccessLog(name="envoy.access_loggers.stdout", typed_config=AnyMessage.pack(stdout))


def _verifies_jwts(config: Config) -> bool:
    return config.jwt is not None and config.network.uses_claims


def _jwt_authn(config: Config) -> JwtAuthentication:
    """Verify a caller's JWT (signature, issuer, audience, expiry) for the claims in rules.

    A missing or failing token is let through without claims (`allow_missing_or_failed`):
    the caller is then placed by address alone, and a token meant for the upstream (a
    server whose callers bring their own) still reaches it (`forward`).
    """
    jwt = config.jwt
    assert jwt is not None
    provider = JwtProvider(issuer=jwt.issuer, audiences=list(jwt.audiences), forward=True,
                           payload_in_metadata=jwt.payload_in_metadata)
    if jwt.jwks_file is not None:
        provider.local_jwks = DataSource(filename=jwt.jwks_file)
    else:
        assert jwt.jwks_uri is not None
        provider.remote_jwks = RemoteJwks(
            http_uri=HttpUri(uri=jwt.jwks_uri, cluster=JWKS_CLUSTER,
                             timeout=timedelta(seconds=5)),
            cache_duration=timedelta(minutes=5))
    if jwt.header != "authorization":
        provider.from_headers = [JwtHeader(name=jwt.header)]
    either = JwtRequirement(requires_any=JwtRequirementOrList(requirements=[
        JwtRequirement(provider_name=JWT_PROVIDER),
        JwtRequirement(allow_missing_or_failed=Empty())]))
    return JwtAuthentication(providers={JWT_PROVIDER: provider},
                             rules=[RequirementRule(match=RouteMatch(prefix="/"),
                                                    requires=either)])


def _json_reply(reason: Literal["not_found", "upstream_credentials_unavailable"]
                ) -> SubstitutionFormatString:
    # The sidecar's own denial, byte for byte: its body and content-type.
    return SubstitutionFormatString(
        text_format_source=DataSource(inline_string=denial_body(reason).decode()),
        content_type="application/json")


def _local_replies() -> LocalReplyConfig:
    """The native data path's answers that Envoy makes, made to be the sidecar's.

    RBAC's denial (a hidden server, or the catch-all) becomes the unknown server's 404; the
    credential injector's 401 (no token to inject) and the watchdog's "no healthy upstream"
    become the sidecar's 503.
    """
    # Keyed on the status: RBAC's dynamic metadata is set only after its local reply has
    # been sent (and mapped), and its response flag is not one a filter may name. No other
    # local reply of this listener is a 403 (ext_authz's failures are 503s).
    denied = AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=Comparison(
        op=ComparisonOp.EQ,
        value=RuntimeUInt32(default_value=403, runtime_key="mcp_ext_authz.denied_status"))))
    no_token = AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=Comparison(
        op=ComparisonOp.EQ,
        value=RuntimeUInt32(default_value=401, runtime_key="mcp_ext_authz.no_token_status"))))
    # Only the oauth2 servers' endpoints are health-checked (the watchdog).
    watchdog = AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["UH"]))
    return LocalReplyConfig(mappers=[
        ResponseMapper(filter=denied, status_code=404,
                       body_format_override=_json_reply("not_found")),
        *(ResponseMapper(filter=failed, status_code=503,
                         body_format_override=_json_reply("upstream_credentials_unavailable"))
          for failed in (no_token, watchdog)),
    ])


def _connection_manager(config: Config, upstreams: Mapping[str, UpstreamAddress],
                        timeouts: Timeouts, native: bool = False) -> HttpConnectionManager:
    authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=timedelta(seconds=config.tokens.timeout_s + AUTHZ_TIMEOUT_MARGIN_S),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,  # never let a request through unchecked
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # The claims of a JWT jwt_authn verified: the only claims the sidecar believes.
        metadata_context_namespaces=[JWT_FILTER] if _verifies_jwts(config) else [],
    )
    filters = [
        # A caller's own x-envoy-* headers would steer Envoy (timeouts, retries) and reach the
        # upstream and the access log as if Envoy had set them: gone before anything reads
        # them. Envoy's own, set later by the router, stay.
        HttpFilter(name=HEADER_MUTATION_FILTER, typed_config=AnyMessage.pack(HeaderMutation(
            mutations=Mutations(request_mutations=[MutationRule(
                remove_on_match=HeaderMutationRemoveOnMatch(
                    key_matcher=StringMatcher(prefix="x-envoy-")))])))),
    ]
    if _verifies_jwts(config):
        filters.append(HttpFilter(name=JWT_FILTER, typed_config=AnyMessage.pack(
            _jwt_authn(config))))
    if native:
        # No rules here: each route that is not for everyone carries its own (RBACPerRoute).
        filters.append(HttpFilter(name=RBAC_FILTER, typed_config=AnyMessage.pack(RbacFilter())))
    # In the native data path, only on the routes that name it (tool rules, the registry,
    # discovery documents).
    filters.append(HttpFilter(name=EXT_AUTHZ_FILTER, disabled=native,
                              typed_config=AnyMessage.pack(authz)))
    # Each off unless a route turns it on (tool-rule, discovery and challenge routes): not
    # "on unless a route turns it off", which would also hold Envoy's own answers that
    # match no route (a 431 for a too-long header) until the sidecar had seen them, and
    # Envoy closes such a connection without waiting: the caller got nothing.
    if _reads_bodies(config):
        filters.append(HttpFilter(name=EXT_PROC_FILTER, disabled=True,
                                  typed_config=AnyMessage.pack(_ext_proc(config))))
    if _reads_bodies(config) or _discovers(config):
        filters.append(HttpFilter(name=ANSWERS_FILTER, disabled=True,
                                  typed_config=AnyMessage.pack(_answers())))
    if _discovers(config):
        filters.append(HttpFilter(name=CHALLENGE_FILTER, disabled=True,
                                  typed_config=AnyMessage.pack(Lua(source_codes={
                                      "challenge": DataSource(inline_string=CHALLENGE_LUA)}))))
    # No x-envoy-upstream-service-time on upstream answers: an answer the sidecar makes (a
    # hidden tool's) must not be told apart from the upstream's by it.
    filters.append(HttpFilter(name="envoy.filters.http.router",
                              typed_config=AnyMessage.pack(Router(suppress_envoy_headers=True))))
    manager = HttpConnectionManager(
        stat_prefix="mcp_ingress",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        # Envoy appends the TCP peer to X-Forwarded-For; the sidecar reads the peer from the
        # connection and walks XFF only through the trusted proxies it is configured with.
        use_remote_address=True,
        xff_num_trusted_hops=0,
        # The path the sidecar judges must be the path Envoy routes.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=(
            HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST),
        # Other routes (the catch-all) keep Envoy's default, said here so it can be seen;
        # the MCP routes set their own (Timeouts).
        stream_idle_timeout=timedelta(seconds=DEFAULT_STREAM_IDLE_TIMEOUT_S),
        request_timeout=timedelta(seconds=timeouts.receive(config)),
        route_config=RouteConfiguration(
            name="mcp", virtual_hosts=_routes(config, upstreams, timeouts, native),
            # Native: the listener may arrive while a cluster it names still warms (its first
            # health check): not a reason to refuse the listener; such a route answers 503.
            validate_clusters=False if native else None,
            # Envoy sets this header only on requests it deems edge requests, and passes a
            # caller's own value on every other one (all of them, once trusted_proxies turns
            # use_remote_address off). The upstream gets Envoy's view of the client instead:
            # the same trusted-hop walk the sidecar does.
            request_headers_to_add=[HeaderValueOption(
                header=HeaderValue(key="x-envoy-external-address",
                                   value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )],
        ),
        http_filters=filters,
        access_log=[_access_log(native)],
        local_reply_config=_local_replies() if native else None,
    )
    if config.network.trusted_proxies:
        # Give Envoy's own idea of the client (access logs, x-envoy-external-address) the
        # same trusted-CIDR walk the sidecar does.
        xff = XffConfig(xff_trusted_cidrs=XffTrustedCidrs(cidrs=[
            CidrRange(address_prefix=str(n.network_address), prefix_len=n.prefixlen)
            for n in config.network.trusted_proxies
        ]))
        manager.original_ip_detection_extensions = [TypedExtensionConfig(
            name="envoy.http.original_ip_detection.xff", typed_config=AnyMessage.pack(xff))]
        manager.use_remote_address = None
    return manager


def sidecar_endpoints(address: SidecarAddress, workers: int) -> list[SidecarAddress]:
    """One endpoint per worker process (see `serve --workers`): consecutive ports, or the
    socket path with `.i` appended for worker i > 0."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: the sidecar runs at least one worker")
    if isinstance(address, UnixSocket):
        return [UnixSocket(address.path if i == 0 else f"{address.path}.{i}")
                for i in range(workers)]
    if address.port + workers - 1 > 65535:
        raise ValueError(f"--workers {workers} from port {address.port} runs past port 65535")
    return [HostPort(address.host, address.port + i) for i in range(workers)]


def resolve_upstreams(config: Config, given: Mapping[str, UpstreamAddress]
                      ) -> dict[str, UpstreamAddress]:
    """Each server's upstream: `--upstream NAME=...` if given, else `servers.NAME.upstream`."""
    unknown = sorted(set(given) - set(config.servers))
    if unknown:
        raise ValueError("--upstream names unconfigured server(s): " + ", ".join(unknown))
    resolved = {}
    for name, server in config.servers.items():
        if name in given:
            resolved[name] = given[name]
        elif server.upstream is not None:
            resolved[name] = UpstreamAddress.parse(server.upstream)
    missing = sorted(set(config.servers) - set(resolved))
    if missing:
        raise ValueError("no upstream for server(s): " + ", ".join(missing)
                         + " (give --upstream NAME=URL, or servers.NAME.upstream)")
    return resolved


def _upstream_text(upstream: UpstreamAddress) -> str:
    address = str(HostPort(upstream.host, upstream.port))
    return address if upstream.scheme is None else (
        f"{upstream.scheme}://{address}{upstream.path or ''}")


@dataclass(frozen=True, slots=True)
class DataPlane:
    """What shapes the listener and the upstream clusters besides the sidecar's config:
    envoy-config's flags.

    In the native data path the listener and clusters come from the sidecar (LDS and CDS
    over one ADS stream), so that a config reload reaches Envoy without a restart. Envoy
    tells the sidecar these flags in its node metadata, set in the bootstrap.
    """

    listen: HostPort
    upstreams: Mapping[str, UpstreamAddress]  # --upstream: over servers.NAME.upstream
    upstream_ca: str | None = None
    timeouts: Timeouts = Timeouts()
    sidecar_host: str = "127.0.0.1"  # where Envoy reaches the sidecar (--sidecar's host)
    listener_tls: ListenerTLS | None = None

    def to_struct(self) -> dict[str, Any]:
        tls = self.listener_tls
        return {
            "listener_tls": None if tls is None else {
                "cert_file": tls.cert_file, "key_file": tls.key_file,
                "client_ca_file": tls.client_ca_file},
            "sidecar_host": self.sidecar_host,
            "listen": str(self.listen),
            "upstreams": {name: _upstream_text(u) for name, u in sorted(self.upstreams.items())},
            "upstream_ca": self.upstream_ca,
            "request_timeout_s": self.timeouts.request_s,
            "idle_timeout_s": self.timeouts.idle_s,
            "receive_timeout_s": self.timeouts.receive_s,
        }

    @classmethod
    def from_struct(cls, data: Mapping[str, Any]) -> DataPlane:
        """Read node metadata back; ValueError naming what is wrong."""
        try:
            upstreams = data.get("upstreams") or {}
            ca = data.get("upstream_ca")
            receive = data.get("receive_timeout_s")
            if not isinstance(upstreams, Mapping) or not (ca is None or isinstance(ca, str)):
                raise TypeError("upstreams or upstream_ca")
            tls = data.get("listener_tls")
            if not (tls is None or isinstance(tls, Mapping)):
                raise TypeError("listener_tls")
            return cls(
                listen=HostPort.parse(str(data["listen"])),
                upstreams={str(name): UpstreamAddress.parse(str(text))
                           for name, text in upstreams.items()},
                upstream_ca=ca,
                timeouts=Timeouts(float(data.get("request_timeout_s") or 0),
                                  float(data.get("idle_timeout_s") or 0),
                                  None if receive is None else float(receive)),
                sidecar_host=str(data.get("sidecar_host") or "127.0.0.1"),
                listener_tls=None if tls is None else ListenerTLS(
                    str(tls["cert_file"]), str(tls["key_file"]), str(tls["client_ca_file"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"node metadata {NODE_KEY!r} is not what envoy-config writes"
                             f" ({type(exc).__name__}: {exc})") from None


def data_plane_resources(config: Config, plane: DataPlane, *, native: bool = True,
                         watchdog: SidecarAddress | None = None
                         ) -> tuple[Listener, list[Cluster]]:
    """The listener and the upstream clusters for a config: a ValueError if it cannot have
    them (a server without an upstream; in the native data path, a watchdog address that
    is a name, which the sidecar resolves first: `watchdog_address`)."""
    resolved = _resolved_upstreams(config, plane)
    listen = plane.listen
    manager = _connection_manager(config, resolved, plane.timeouts, native)
    if config.network.uses_principals and plane.listener_tls is None:
        raise ValueError("network rules name principals, which only a caller's certificate"
                         " can show: give --listen-cert, --listen-key and --client-ca")
    chain = FilterChain(filters=[Filter(
        name="envoy.filters.network.http_connection_manager",
        typed_config=AnyMessage.pack(manager),
    )])
    if plane.listener_tls is not None:
        chain.transport_socket = _downstream_tls(plane.listener_tls)
    listener = Listener(
        name="mcp_ingress",
        # `--listen [::]:PORT` serves IPv4 callers too (as IPv4 peers, not v4-mapped ones).
        address=Address(socket_address=SocketAddress(address=listen.host,
                                                     port_value=listen.port,
                                                     ipv4_compat=listen.host == "::")),
        filter_chains=[chain],
    )
    if native:
        watchdog = watchdog or watchdog_address(config, plane)
        if isinstance(watchdog, HostPort) and not _is_ip(watchdog.host):
            # Envoy 1.40 aborts (not a NACK: the process) on a name in an endpoint's
            # health_check_config address.
            raise ValueError(f"the watchdog's address {watchdog.host!r} is a name, not an IP")
    else:
        watchdog = None
    clusters = []
    for name in sorted(config.servers):
        cluster = _upstream_cluster(f"mcp_{name}", resolved[name], plane.upstream_ca)
        if watchdog is not None and config.servers[name].oauth2 is not None:
            _inject_token(cluster, name, resolved[name], watchdog)
        clusters.append(cluster)
    jwt = config.jwt if _verifies_jwts(config) else None
    if jwt is not None and jwt.jwks_uri is not None:
        clusters.append(_upstream_cluster(JWKS_CLUSTER, UpstreamAddress.parse(jwt.jwks_uri),
                                          plane.upstream_ca))
    return listener, clusters


def _downstream_tls(tls: ListenerTLS) -> TransportSocket:
    """TLS for callers, each presenting a certificate the CA signed: its URI SAN is the
    principal (`source.principal`, RBAC's `authenticated`); none, and no connection."""
    context = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],
            tls_certificates=[TlsCertificate(
                certificate_chain=DataSource(filename=tls.cert_file),
                private_key=DataSource(filename=tls.key_file))],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.client_ca_file))),
        require_client_certificate=True)
    return TransportSocket(name="envoy.transport_sockets.tls",
                           typed_config=AnyMessage.pack(context))


def _resolved_upstreams(config: Config, plane: DataPlane) -> dict[str, UpstreamAddress]:
    resolved = resolve_upstreams(config, plane.upstreams)
    if plane.upstream_ca is not None and not any(u.tls for u in resolved.values()):
        raise ValueError("--upstream-ca given, but no upstream is an https:// URL")
    return resolved


def watchdog_address(config: Config, plane: DataPlane) -> SidecarAddress:
    """The sidecar's admin listener, as Envoy reaches it: what the watchdog checks (its host
    may be a name, which Envoy cannot take there: the control plane resolves it)."""
    if config.admin is None:
        raise ValueError("the native data path needs admin.listen: Envoy checks there that"
                         " the sidecar still holds each server's token (the watchdog)")
    listen = config.admin.listen
    if listen.startswith("unix:"):
        return UnixSocket(listen[len("unix:"):])
    address = HostPort.parse(listen)
    if address.host in ("0.0.0.0", "::", ""):  # every address: the one Envoy dials
        return HostPort(plane.sidecar_host, address.port)
    return address


def token_secret_name(server: str) -> str:
    """The SDS secret holding a server's bearer token (native data path)."""
    return f"{TOKEN_SECRET_PREFIX}{server}"


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
    timeouts: Timeouts = Timeouts(),
    data_path: DataPath = "ext_authz",
    listener_tls: ListenerTLS | None = None,
) -> Bootstrap:
    """Build the bootstrap: one listener, the filters, a route and a cluster per server.

    `upstreams` overrides the servers' own `upstream` settings (`resolve_upstreams`). In
    the native data path the listener and those clusters are the sidecar's to serve: the
    bootstrap holds the sidecar's clusters and says what to ask it for.
    """
    _check_tls(config, sidecar_tls)
    sidecars = sidecar_endpoints(sidecar, workers)
    first = sidecars[0]
    plane = DataPlane(listen, dict(upstreams), upstream_ca, timeouts,
                      "127.0.0.1" if isinstance(first, UnixSocket) else first.host,
                      listener_tls)
    native = data_path == "native"
    listener: Listener | None = None
    upstream_clusters: list[Cluster] = []
    if native:
        # Rendered by the sidecar when Envoy asks; here what would stop it doing so.
        data_plane_resources(config, plane, watchdog=HostPort("127.0.0.1", 1))
        watchdog_address(config, plane)
    else:
        listener, upstream_clusters = data_plane_resources(config, plane, native=False)
    clusters = [_authz_cluster(AUTHZ_CLUSTER, sidecars, sidecar_tls)]
    if _reads_bodies(config) or native:  # native: a reload may bring tool rules
        clusters.append(_authz_cluster(BODIES_CLUSTER, sidecars, sidecar_tls,
                                       timeouts.receive(config)))
    bootstrap = Bootstrap(admin=Admin(address=Address(socket_address=SocketAddress(
        address=admin.host, port_value=admin.port))))
    if listener is not None:
        bootstrap.static_resources = BootstrapStaticResources(
            listeners=[listener], clusters=[*clusters, *upstream_clusters])
        return bootstrap
    # The control plane: no health checks (Envoy must reach it before any token is warm),
    # one stream for listener, clusters and secrets, so that they arrive in order.
    xds = _cluster(XDS_CLUSTER, sidecars, protocol="h2")
    if sidecar_tls is not None:
        xds.transport_socket = _transport_socket(sidecar_tls)
    clusters.append(xds)
    bootstrap.node = Node(id="mcp-ext-authz", cluster="mcp-ext-authz",
                          metadata=Struct.from_dict({NODE_KEY: plane.to_struct()}))
    bootstrap.static_resources = BootstrapStaticResources(clusters=clusters)
    bootstrap.dynamic_resources = BootstrapDynamicResources(
        ads_config=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC, transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=XDS_CLUSTER))],
            set_node_on_first_message_only=True),
        lds_config=_ADS_SOURCE, cds_config=_ADS_SOURCE)
    return bootstrap


def render(bootstrap: Bootstrap) -> str:
    """Write a bootstrap as YAML with proto field names."""
    data: dict[str, Any] = bootstrap.to_dict(casing=_snake_case())
    header = "# Generated by `mcp-ext-authz envoy-config`; edit the sidecar config instead.\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def _snake_case() -> Any:
    import betterproto2

    return betterproto2.Casing.SNAKE
