"""The ext_proc filters: one reads a request's body (tool rules), one its answer, one an
upstream's 401 to an exchanged token."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig as CoreTypedExtensionConfig
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
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
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpResponseHeaderMatchInput,
    HttpResponseStatusCodeMatchInput,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
    StringMatcher,
)

from ...contract import (
    ANSWERS_FILTER,
    AUTHZ_CLUSTER,
    BODIES_CLUSTER,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    REFUSALS_FILTER,
)

# Reading a body of mcp.max_body_bytes takes milliseconds; past this the sidecar is in trouble
# and Envoy answers the request itself (504), never forwarding it unjudged.
EXT_PROC_TIMEOUT = timedelta(seconds=2)
# An ext_proc filter that is off by default, turned on for one route: Envoy turns on a
# filter that a route configures (here with nothing to override). FilterConfig's own way,
# an empty Any, has no JSON or YAML spelling.
ENABLED = AnyMessage.pack(ExtProcPerRoute(overrides=ExtProcOverrides()))


def bodies() -> HttpFilter:
    """The request's body, for the tool rules; off unless a route turns it on."""
    # The request only, never a response (an SSE stream must flow). Its body in full-duplex
    # mode: Envoy passes each piece on and holds the headers; the sidecar sends both back
    # once it has judged the whole body, or refuses (413 past mcp.max_body_bytes). In
    # BUFFERED mode, Envoy 1.40 stalls a request whose body passes its buffer limit.
    processor = ExternalProcessor(
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
    return HttpFilter(name=EXT_PROC_FILTER, disabled=True,
                      typed_config=AnyMessage.pack(processor))


def _answer_headers(forwarded: list[str], *, mode_override: bool) -> ExternalProcessor:
    """The sidecar sees an answer's headers (and, `mode_override`, may ask for its body),
    with what the filters before it left in these metadata namespaces."""
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
        allow_mode_override=mode_override,
        message_timeout=EXT_PROC_TIMEOUT,
        metadata_options=MetadataOptions(forwarding_namespaces=MetadataOptionsMetadataNamespaces(
            untyped=forwarded)),
    )


def _skip_when(predicate: MatcherMatcherListPredicate) -> Matcher:
    return Matcher(matcher_list=MatcherMatcherList(matchers=[MatcherMatcherListFieldMatcher(
        predicate=predicate,
        on_match=MatcherOnMatch(action=TypedExtensionConfig(
            name="skip", typed_config=AnyMessage.pack(SkipFilter()))))]))


def refusals() -> HttpFilter:
    """An upstream's 401 on a token-exchange route, for the sidecar to evict the exchanged
    token it refused; off unless a route turns it on. Any other answer skips it before a
    stream is opened: a request pays nothing for it."""
    # ext_authz's answer names the exchanged token's cache key.
    processor = _answer_headers([EXT_AUTHZ_FILTER], mode_override=False)
    unauthorized = MatcherMatcherListPredicateSinglePredicate(
        input=TypedExtensionConfig(name="status", typed_config=AnyMessage.pack(
            HttpResponseStatusCodeMatchInput())),
        value_match=StringMatcher(exact="401"))
    wrapped = ExtensionWithMatcher(
        xds_matcher=_skip_when(MatcherMatcherListPredicate(
            not_matcher=MatcherMatcherListPredicate(single_predicate=unauthorized))),
        extension_config=CoreTypedExtensionConfig(name=REFUSALS_FILTER,
                                                  typed_config=AnyMessage.pack(processor)))
    return HttpFilter(name=REFUSALS_FILTER, disabled=True, typed_config=AnyMessage.pack(wrapped))


def answers(skip_marked: str | None = None) -> HttpFilter:
    """The answers to tools/call and tools/list (and discovery documents); off unless a
    route turns it on. `skip_marked`: a response header that marks Envoy's own answers,
    which pass untouched and unheld."""
    # Every answer's headers go to the sidecar, which asks for the body of those it rewrites
    # (mode_override: BUFFERED for JSON, STREAMED for SSE) from what the request's stream
    # left in the metadata. A second filter because Envoy 1.40 ignores mode_override on a
    # FULL_DUPLEX_STREAMED filter.
    processor = _answer_headers([EXT_AUTHZ_FILTER, EXT_PROC_FILTER], mode_override=True)
    if skip_marked is None:
        return HttpFilter(name=ANSWERS_FILTER, disabled=True,
                          typed_config=AnyMessage.pack(processor))
    marked = MatcherMatcherListPredicateSinglePredicate(
        input=TypedExtensionConfig(name="response-header", typed_config=AnyMessage.pack(
            HttpResponseHeaderMatchInput(header_name=skip_marked))),
        value_match=StringMatcher(exact="1"))
    skip = _skip_when(MatcherMatcherListPredicate(single_predicate=marked))
    wrapped = ExtensionWithMatcher(
        xds_matcher=skip,
        extension_config=CoreTypedExtensionConfig(name=ANSWERS_FILTER,
                                                  typed_config=AnyMessage.pack(processor)))
    return HttpFilter(name=ANSWERS_FILTER, disabled=True, typed_config=AnyMessage.pack(wrapped))
