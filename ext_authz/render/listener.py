"""The listener: its filter chain (TLS for callers, if any), the HTTP connection manager
with its filters, access log and routes."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as MutationRule,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutationRemoveOnMatch,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    CidrRange,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    JsonFormatOptions,
    SocketAddress,
    SubstitutionFormatString,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation,
    Mutations,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.http.original_ip_detection.xff.v3 import (
    XffConfig,
    XffTrustedCidrs,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ..contract import (
    CLIENT_IP,
    DECISION_ID,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    HEADER_MUTATION_FILTER,
    NETWORK,
    REASON,
    SERVER,
    TOOL,
)
from . import tls
from .enforcement import BySidecar
from .filters import challenge, ext_authz, ext_proc, jwt
from .options import HostPort, ListenerTLS, Timeouts
from .plan import Plan
from .routes import virtual_hosts

LISTENER = "mcp_ingress"
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300  # Envoy's own default, for the routes that are not MCP's
ANSWER_HEADROOM = 64 * 1024  # an answer's headers, and Envoy's framing


def _access_log(by: BySidecar) -> AccessLog:
    fields = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "peer": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
        "duration_ms": "%DURATION%",
        "decision_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{DECISION_ID})%",
        "server": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{SERVER})%",
        "network": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{NETWORK})%",
        "client_ip": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{CLIENT_IP})%",
        "reason": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:{REASON})%",
        # Set on the routes of servers with tool rules, by the body's reading (ext_proc).
        "tool": f"%DYNAMIC_METADATA({EXT_PROC_FILTER}:{TOOL})%",
        "tool_reason": f"%DYNAMIC_METADATA({EXT_PROC_FILTER}:{REASON})%",
    }
    stdout = StdoutAccessLog(log_format=SubstitutionFormatString(
        json_format=Struct.from_dict(by.log_fields(fields)),
        json_format_options=JsonFormatOptions(sort_properties=False),
    ))
    return AccessLog(name="envoy.access_loggers.stdout", typed_config=AnyMessage.pack(stdout))


def _http_filters(plan: Plan, by: BySidecar) -> list[HttpFilter]:
    filters = [
        # A caller's own x-envoy-* headers would steer Envoy (timeouts, retries) and reach the
        # upstream and the access log as if Envoy had set them: gone before anything reads
        # them. Envoy's own, set later by the router, stay.
        HttpFilter(name=HEADER_MUTATION_FILTER, typed_config=AnyMessage.pack(HeaderMutation(
            mutations=Mutations(
                request_mutations=[MutationRule(remove_on_match=HeaderMutationRemoveOnMatch(
                    key_matcher=StringMatcher(prefix="x-envoy-")))],
                # The mark of Envoy's own answers is for the answers filter alone.
                response_mutations=([MutationRule(remove=by.local_reply_marker)]
                                    if by.local_reply_marker is not None else []))))),
    ]
    if plan.jwt is not None:
        filters.append(jwt.http_filter(plan.jwt))
    filters += by.filters_before_authz()
    filters.append(ext_authz.http_filter(plan, disabled=by.authz_disabled))
    # Each off unless a route turns it on (tool-rule, discovery and challenge routes): not
    # "on unless a route turns it off", which would also hold Envoy's own answers that
    # match no route (a 431 for a too-long header) until the sidecar had seen them, and
    # Envoy closes such a connection without waiting: the caller got nothing.
    if plan.reads_bodies:
        filters.append(ext_proc.bodies())
    if plan.reads_bodies or plan.discovers:
        filters.append(ext_proc.answers(skip_marked=by.local_reply_marker))
    if plan.exchanges:
        filters.append(ext_proc.refusals())
    if plan.discovers:
        filters.append(challenge.http_filter())
    # No x-envoy-upstream-service-time on upstream answers: an answer the sidecar makes (a
    # hidden tool's) must not be told apart from the upstream's by it.
    filters.append(HttpFilter(name="envoy.filters.http.router",
                              typed_config=AnyMessage.pack(Router(suppress_envoy_headers=True))))
    return filters


def connection_manager(plan: Plan, timeouts: Timeouts, by: BySidecar) -> HttpConnectionManager:
    """The HTTP connection manager: filters, routes, access log, the XFF walk."""
    filters = _http_filters(plan, by)
    config = plan.config
    manager = HttpConnectionManager(
        stat_prefix=LISTENER,
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
            name="mcp", virtual_hosts=virtual_hosts(plan, timeouts, by),
            validate_clusters=by.validate_clusters,
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
        access_log=[_access_log(by)],
        local_reply_config=by.local_replies(),
    )
    proxies = plan.policy.trusted_proxies.networks
    if proxies:
        # Give Envoy's own idea of the client (access logs, x-envoy-external-address) the
        # same trusted-CIDR walk the sidecar does.
        xff = XffConfig(xff_trusted_cidrs=XffTrustedCidrs(cidrs=[
            CidrRange(address_prefix=str(n.network_address), prefix_len=n.prefixlen)
            for n in proxies
        ]))
        manager.original_ip_detection_extensions = [TypedExtensionConfig(
            name="envoy.http.original_ip_detection.xff", typed_config=AnyMessage.pack(xff))]
        manager.use_remote_address = None
    return manager


def buffer_limit(plan: Plan) -> int | None:
    """Envoy's buffer per connection where answers are read whole to be rewritten (tool
    rules): room for the largest the sidecar takes (mcp.max_answer_bytes). Envoy's own 1 MiB
    made a bigger answer a 500, or a hang, by chance. None: Envoy's default."""
    if not plan.reads_bodies:
        return None
    return plan.config.mcp.max_answer_bytes + ANSWER_HEADROOM


def listener(manager: HttpConnectionManager, listen: HostPort,
             listener_tls: ListenerTLS | None, limit: int | None = None) -> Listener:
    """The one listener callers reach."""
    chain = FilterChain(filters=[Filter(
        name="envoy.filters.network.http_connection_manager",
        typed_config=AnyMessage.pack(manager),
    )])
    if listener_tls is not None:
        chain.transport_socket = tls.from_callers(listener_tls)
    return Listener(
        name=LISTENER,
        # `--listen [::]:PORT` serves IPv4 callers too (as IPv4 peers, not v4-mapped ones).
        address=Address(socket_address=SocketAddress(address=listen.host,
                                                     port_value=listen.port,
                                                     ipv4_compat=listen.host == "::")),
        filter_chains=[chain],
        per_connection_buffer_limit_bytes=limit,
    )
