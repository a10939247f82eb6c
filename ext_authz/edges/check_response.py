"""A decision as CheckResponse bytes: the reason's template, the token, the metadata.

A CheckResponse is its reason's constant template plus two per-check parts: the bearer
header and the dynamic metadata. Protobuf wire format lets them be concatenated: fields
may come in any order, and a message field that appears twice (ok_response) is merged,
its repeated `headers` appended. So the template is serialized once and each check only
encodes its own few bytes (tests decode the result with the generated classes and with
envoy-data-plane's independent implementation)."""

from __future__ import annotations

from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.service.auth.v3 import external_auth_pb2
from ..contract import PROTECTED_RESOURCE
from ..policy.decision import Decision, RequestFacts
from ..policy.memo import Memo, PerDecision
from ..policy.outcomes import OUTCOMES, Reason, denial_body
from .metadata import authz_entries, decision_id_entry, discovery_entries
from .wire import length_delimited, varint

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
    if (decision.reason not in ("tool_not_found", "item_not_found") and not decision.reply
            and not decision.challenge):
        return _TEMPLATE_BYTES[decision.reason]
    if decision.reason == "registry":
        return _REGISTRY_ANSWERS[decision]
    return _with_reply(decision)


def _with_reply(decision: Decision) -> bytes:
    # A per-request answer (a JSON-RPC reply naming the request's id, a document naming
    # the gateway's URL, a 401's challenge): the slow path.
    response = external_auth_pb2.CheckResponse()
    response.CopyFrom(_TEMPLATES[decision.reason])
    denied = response.denied_response
    denied.status.code = decision.http_status  # type: ignore[assignment]
    if decision.reply:
        denied.body = decision.reply.decode()
    if decision.challenge:
        denied.headers.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="www-authenticate", value=decision.challenge),
            append_action=_OVERWRITE))
    return response.SerializeToString()

# A registry decision is remembered per caller (decide's cache), and so is its answer.
_REGISTRY_ANSWERS = PerDecision(_with_reply)


def request_metadata(decision: Decision, facts: RequestFacts) -> bytes:
    """Dynamic metadata for this one request, beyond the decision's own: the gateway URL
    that an OAuth discovery document must name (see render/routes.py; a challenge's URL is
    Envoy's own work, so that both data paths name the same)."""
    server = decision.server
    if (not decision.goes_upstream or server is None or not server.caller_brings_token
            or decision.route.kind != "discovery"):
        return b""
    origin = facts.origin
    if origin is None:
        return b""
    # RFC 9728: the metadata of https://gw/mcp/x is at /.well-known/...-resource/mcp/x,
    # and names https://gw/mcp/x as its resource.
    resource = facts.path.partition("?")[0][len(PROTECTED_RESOURCE):] or "/"
    return discovery_entries(origin + resource)


def encode_check_response(decision: Decision, token: str | None, decision_id: str,
                          extra_metadata: bytes = b"") -> bytes:
    """Write a decision (and the bearer token to inject, if any) as CheckResponse bytes."""
    metadata = authz_entries[decision] + decision_id_entry(decision_id) + extra_metadata
    response = (_answer(decision) + b"\x22"  # dynamic_metadata = 4, LEN
                + varint(len(metadata)) + metadata)
    if token is not None and decision.goes_upstream:
        response += _bearer(token)
    return response
