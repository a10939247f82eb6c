"""What a CheckRequest says, as plain values: the facts a decision needs, the identity
Envoy vouches for, the body (where the Check carries it) and the origin the caller used."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from .._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ..contract import JWT_FILTER
from ..mcp.jsonrpc import NO_BODY, Body, Received, body_headers, request_body
from ..policy.compile import Policy
from ..policy.decision import RequestFacts
from ..policy.network import NO_IDENTITY, Identity
from ..policy.subject import Subject
from .subject import subject_of

_XFF = "x-forwarded-for"
_PARTIAL_BODY = "x-envoy-auth-partial-body"
NO_FACTS = RequestFacts("", None, "", "", has_http=False)


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


def _verified(attributes: attribute_context_pb2.AttributeContext, policy: Policy
              ) -> struct_pb2.Struct | None:
    """jwt_authn's metadata (holding the verified payload), where the policy reads it."""
    metadata = attributes.metadata_context.filter_metadata
    if policy.claims_key is None or JWT_FILTER not in metadata:
        return None
    return metadata[JWT_FILTER]


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
    verified = _verified(attributes, policy)
    serialized = verified.SerializeToString(deterministic=True) if verified is not None else b""
    return policy.identity(attributes.source.principal, serialized,
                           lambda: _payload(verified, policy.claims_key))


def authorization(request: external_auth_pb2.CheckRequest | None) -> str | None:
    """The request's Authorization header as Envoy passes it (repeated ones joined by ",")."""
    if request is None:
        return None
    http = request.attributes.request.http
    if http.headers:
        return http.headers.get("authorization")
    found = [value for key, value in _header_pairs(http) if key.lower() == "authorization"]
    return ",".join(found) if found else None


def extract_subject(request: external_auth_pb2.CheckRequest | None, policy: Policy) -> Subject:
    """The caller whose token a token exchange takes: its bearer, only if it is the token
    jwt_authn verified (subject.py). NoSubject otherwise."""
    verified = None if request is None else _payload(_verified(request.attributes, policy),
                                                      policy.claims_key)
    return subject_of(authorization(request), verified)


def extract_facts(request: external_auth_pb2.CheckRequest | None,
                  policy: Policy | None = None) -> RequestFacts:
    """Read the facts the decision needs from a CheckRequest, tolerating missing parts."""
    if request is None:
        return NO_FACTS
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
                        method=http.method, identity=identity,
                        forwarded_proto=headers.get("x-forwarded-proto", ""),
                        scheme=http.scheme)


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

_WANTED = frozenset((_XFF, ":path", ":authority", "x-forwarded-proto"))


def _from_header_map(http: attribute_context_pb2.AttributeContext.HttpRequest
                     ) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for key, value in _header_pairs(http):
        if key.lower() in _WANTED:
            found.setdefault(key.lower(), []).append(value)
    return {key: ",".join(values) for key, values in found.items()}
