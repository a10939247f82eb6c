"""The gRPC Authorization servicer: CheckRequest -> RequestFacts -> Decision -> CheckResponse.

The only module that knows protobuf. It never lets an exception escape: whatever goes
wrong becomes a CheckResponse that denies, so the sidecar stays fail-closed even behind
an Envoy configured with `failure_mode_allow: true`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ..contract import (
    AUTHZ_SERVICE,
    JWT_FILTER,
    PROTECTED_RESOURCE,
    TOOL_RULES_BY_EXT_PROC,
    TOOL_RULES_EXTENSION,
)
from ..mcp.jsonrpc import NO_BODY, Body, Received, body_headers, request_body
from ..policy.compile import Policy
from ..policy.decision import Decision, RequestFacts
from ..policy.memo import Memo, PerDecision
from ..policy.network import NO_IDENTITY, Identity
from ..policy.outcomes import OUTCOMES, Reason, denial_body
from ..tokens import TokenCache
from .generation import Generation, Serving
from .metadata import authz_entries, decision_id_entry, discovery_entries
from .pipeline import judge
from .wire import length_delimited, varint

log = logging.getLogger(__name__)


# Leave Envoy this much of its ext_authz timeout to receive our 503 before it gives up
# and answers its own generic 403.
DEADLINE_MARGIN_S = 0.02

_XFF = "x-forwarded-for"
_PARTIAL_BODY = "x-envoy-auth-partial-body"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
    append_action=_OVERWRITE,
)


def _template(reason: Reason) -> external_auth_pb2.CheckResponse:
    grpc_code, http_status = OUTCOMES[reason]
    response = external_auth_pb2.CheckResponse()
    response.status.code = grpc_code
    if reason == "allowed":
        response.ok_response.SetInParent()
        return response
    response.status.message = reason
    denied = response.denied_response
    denied.status.code = http_status  # type: ignore[assignment]
    denied.headers.append(_JSON)
    denied.body = denial_body(reason).decode()
    return response


_NO_FACTS = RequestFacts("", None, "", "", has_http=False)


def parse_check_request(data: bytes) -> external_auth_pb2.CheckRequest | None:
    """Deserialize a CheckRequest; None when the bytes do not parse (answered as bad_request)."""
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        return None


def _payload(verified: struct_pb2.Struct | None, key: str | None
             ) -> dict[str, object] | None:
    payload = verified.fields.get(key or "") if verified is not None else None
    if payload is None or payload.WhichOneof("kind") != "struct_value":
        return None
    return json_format.MessageToDict(payload.struct_value)


def extract_identity(attributes: attribute_context_pb2.AttributeContext,
                     policy: Policy) -> Identity:
    """Who the caller is, from what Envoy alone sets (only when a network rule asks).

    The principal is the mTLS peer certificate's URI SAN (`source.principal`: Envoy fills it
    from a certificate its listener accepted, and from nothing a client sends). The claims
    are those a rule names, of the payload jwt_authn verified (its dynamic metadata, which
    no header reaches).
    """
    if not policy.networks.uses_identities:
        return NO_IDENTITY
    metadata = attributes.metadata_context.filter_metadata
    verified = None
    if policy.claims_key is not None and JWT_FILTER in metadata:
        verified = metadata[JWT_FILTER]
    serialized = verified.SerializeToString(deterministic=True) if verified is not None else b""
    return policy.identity(attributes.source.principal, serialized,
                           lambda: _payload(verified, policy.claims_key))


def extract_facts(request: external_auth_pb2.CheckRequest | None,
                  policy: Policy | None = None) -> RequestFacts:
    """Read the facts the decision needs from a CheckRequest, tolerating missing parts."""
    if request is None:
        return _NO_FACTS
    attributes = request.attributes
    address = attributes.source.address
    peer = (
        address.socket_address.address
        if address.WhichOneof("address") == "socket_address"
        else ""
    )
    attributes_request = attributes.request
    if not attributes_request.HasField("http"):
        return RequestFacts(peer, None, "", "", has_http=False)
    http = attributes_request.http
    # Envoy joins repeated headers with "," in this map; with `encode_raw_headers: true` it
    # sends header_map instead.
    headers: Mapping[str, str] = http.headers or _from_header_map(http)
    path = http.path or headers.get(":path", "")
    authority = http.host or headers.get(":authority", "")
    identity = NO_IDENTITY if policy is None else extract_identity(attributes, policy)
    return RequestFacts(peer, headers.get(_XFF), path, authority, attributes.context_extensions,
                        method=http.method, identity=identity)


# What may stand in an origin echoed into a URL: RFC 3986's host and port characters (no
# quote, space or backslash that would break out of the header parameter or JSON string).
_AUTHORITY = re.compile(r"[A-Za-z0-9.\-_~:\[\]]{1,255}")


def request_origin(request: external_auth_pb2.CheckRequest | None) -> str | None:
    """`scheme://authority` as the caller addressed the gateway; None if it cannot be said.

    The caller's own Host and X-Forwarded-Proto, echoed back to that caller only (in the
    URLs of OAuth discovery): a client that forges them misleads no one but itself.
    """
    if request is None:
        return None
    http = request.attributes.request.http
    headers: Mapping[str, str] = http.headers or {}
    authority = http.host or headers.get(":authority", "")
    forwarded = headers.get("x-forwarded-proto", "").partition(",")[0].strip().lower()
    scheme = forwarded or http.scheme.lower() or "http"
    if scheme not in ("http", "https") or not _AUTHORITY.fullmatch(authority):
        return None
    return f"{scheme}://{authority}"


def extract_body(request: external_auth_pb2.CheckRequest | None) -> Body:
    """Read the body, and the headers that say how to read it (for tool rules only)."""
    if request is None:
        return NO_BODY
    http = request.attributes.request.http
    pairs = list(http.headers.items() if http.headers else _header_pairs(http))
    headers = body_headers(pairs)
    data = http.raw_body
    received: Received = "whole"
    if any(key == _PARTIAL_BODY and value == "true" for key, value in pairs):
        received = "partial"  # Envoy's own mark, in the CheckRequest only
    elif not data and http.body:
        data, received = http.body.encode(), "text"
    elif not data:
        # Envoy reports size 0 when a route turns body buffering off, so the headers decide:
        # a POST is taken as empty only when its Content-Length says so.
        length = headers.get("content-length", [""])[0]
        if http.size > 0 or (http.method == "POST" and length != "0"):
            received = "missing"
    return request_body(data, http.method, headers, received)


def _header_pairs(http: attribute_context_pb2.AttributeContext.HttpRequest
                  ) -> Iterator[tuple[str, str]]:
    # With `encode_raw_headers: true` Envoy sends header_map, each value once, as bytes.
    for header in http.header_map.headers:
        yield header.key, (header.raw_value.decode("utf-8", "replace") if header.raw_value
                           else header.value)


_WANTED = frozenset((_XFF, ":path", ":authority"))


def _from_header_map(http: attribute_context_pb2.AttributeContext.HttpRequest
                     ) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for key, value in _header_pairs(http):
        if key.lower() in _WANTED:
            found.setdefault(key.lower(), []).append(value)
    return {key: ",".join(values) for key, values in found.items()}


# -- writing CheckResponses --------------------------------------------------------------
#
# A CheckResponse is its reason's constant template plus two per-check parts: the bearer
# header and the dynamic metadata. Protobuf wire format lets them be concatenated: fields
# may come in any order, and a message field that appears twice (ok_response) is merged,
# its repeated `headers` appended. So the template is serialized once and each check only
# encodes its own few bytes (tests decode the result with the generated classes and with
# envoy-data-plane's independent implementation).

_TEMPLATES = {reason: _template(reason) for reason in OUTCOMES}
_TEMPLATE_BYTES = {reason: template.SerializeToString() for reason, template in _TEMPLATES.items()}
_OK_RESPONSE_FIELD = 3


_bearer_cache: Memo[str, bytes] = Memo(64)  # tokens change rarely; a handful are live at once


def _bearer(token: str) -> bytes:
    encoded = _bearer_cache.get(token)
    if encoded is None:
        # append=false for Envoys that read only the deprecated field, append_action for
        # those that read only the new one: either way the caller's own Authorization
        # header is replaced, never passed through beside ours.
        header = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="authorization", value=f"Bearer {token}"),
            append_action=_OVERWRITE,
        )
        header.append.value = False
        ok = external_auth_pb2.OkHttpResponse(headers=[header])
        encoded = length_delimited(_OK_RESPONSE_FIELD, ok.SerializeToString())
        _bearer_cache.keep(token, encoded)
    return encoded


def _answer(decision: Decision) -> bytes:
    if decision.reason != "tool_not_found" and not decision.reply:
        return _TEMPLATE_BYTES[decision.reason]
    if decision.reason == "registry":
        return _REGISTRY_ANSWERS[decision]
    return _with_reply(decision)


def _with_reply(decision: Decision) -> bytes:
    # A per-request answer (a JSON-RPC reply naming the request's id): the slow path.
    response = external_auth_pb2.CheckResponse()
    response.CopyFrom(_TEMPLATES[decision.reason])
    denied = response.denied_response
    denied.status.code = decision.http_status  # type: ignore[assignment]
    denied.body = decision.reply.decode()
    return response.SerializeToString()


# A registry decision is remembered per caller (decide's cache), and so is its answer.
_REGISTRY_ANSWERS = PerDecision(_with_reply)


def request_metadata(decision: Decision, request: external_auth_pb2.CheckRequest | None,
                     path: str) -> bytes:
    """Dynamic metadata for this one request, beyond the decision's own: the gateway URL
    that an OAuth discovery document must name (see render/routes.py; a challenge's URL is
    Envoy's own work, so that both data paths name the same)."""
    server = decision.server
    if (not decision.allowed or server is None or not server.caller_brings_token
            or decision.route.kind != "discovery"):
        return b""
    origin = request_origin(request)
    if origin is None:
        return b""
    # RFC 9728: the metadata of https://gw/mcp/x is at /.well-known/...-resource/mcp/x,
    # and names https://gw/mcp/x as its resource.
    resource = path.partition("?")[0][len(PROTECTED_RESOURCE):] or "/"
    return discovery_entries(origin + resource)


def encode_check_response(decision: Decision, token: str | None, decision_id: str,
                          extra_metadata: bytes = b"") -> bytes:
    """Write a decision (and the bearer token to inject, if any) as CheckResponse bytes."""
    metadata = authz_entries[decision] + decision_id_entry(decision_id) + extra_metadata
    response = (_answer(decision) + b"\x22"  # dynamic_metadata = 4, LEN
                + varint(len(metadata)) + metadata)
    if token is not None and decision.allowed:
        response += _bearer(token)
    return response


class AuthorizationService:
    """The grpc.aio servicer for envoy.service.auth.v3.Authorization."""

    def __init__(self, serving: Serving, tokens: TokenCache,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.serving = serving
        self.tokens = tokens
        self._clock = clock

    @property
    def state(self) -> Generation:
        """The config generation being served."""
        return self.serving.state

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register on a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            AUTHZ_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.Check,
                    # A request that does not parse is a bad_request denial, not an RPC error.
                    request_deserializer=parse_check_request,
                    # Check returns the encoded bytes itself (encode_check_response).
                    response_serializer=None,
                )
            },
        )

    async def Check(  # the gRPC method's name
        self, request: external_auth_pb2.CheckRequest | None, context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse]
    ) -> bytes:
        started = self._clock()
        serving = self.serving
        state = serving.state  # a check finishes on the config it started with
        decision_id = serving.next_decision_id()
        facts = _NO_FACTS
        try:
            facts = extract_facts(request, state.policy)
            # The body is read here only where no ext_proc filter reads it (Istio).
            by_ext_proc = facts.context_extensions.get(
                TOOL_RULES_EXTENSION) == TOOL_RULES_BY_EXT_PROC
            decision, token = await judge(
                facts, state.policy,
                body=None if by_ext_proc else lambda: extract_body(request),
                can_rename=False, cached=self.tokens.cached,
                fetch=lambda oauth2, server: self.tokens.token(
                    oauth2, server, self._fetch_budget(state, context)))
            response = encode_check_response(decision, token, decision_id,
                                             request_metadata(decision, request, facts.path))
        except Exception:
            log.exception("check %s failed; denying", decision_id)
            decision = Decision("internal_error", detail="internal error (see the service log)",
                                peer=facts.peer)
            response = encode_check_response(decision, None, decision_id)
        serving.record(decision, decision_id, facts, self._clock() - started)
        return response

    def _fetch_budget(
        self, state: Generation, context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse]
    ) -> float:
        budget = state.config.tokens.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN_S)
        return budget
