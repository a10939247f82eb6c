"""The dynamic metadata the sidecar leaves in Envoy and reads back: one codec.

ext_authz's answer carries its decision (Envoy's access log reads it, and forwards it to
the ext_proc filters, which take up the caller's place from it rather than placing the
caller again). The ext_proc request stream tells the answers stream, through Envoy, how the
answer is to be rewritten. Keys Envoy's own config names are the contract's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ..contract import (
    CLIENT_IP,
    DECISION_ID,
    EXCHANGED,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    NETWORK,
    NETWORKS,
    REASON,
    RESOURCE,
    REWRITE,
    SERVER,
    TOOL,
)
from ..policy.decision import Decision
from ..policy.memo import PerDecision
from .wire import short_struct_entry, struct_entry

# ext_proc's own keys, between its request stream and its answers stream.
_ANSWER = "answer"  # "list" or "call": what the answer is, to be rewritten
_REWRITE_RESOURCE = "resource"  # REWRITE's value: a discovery document naming the gateway


def _authz_entries(decision: Decision) -> bytes:
    client = decision.client.address
    entries = [
        struct_entry(SERVER, decision.server_name or ""),
        struct_entry(NETWORK, decision.network),
        struct_entry(CLIENT_IP, str(client) if client is not None else ""),
        struct_entry(REASON, decision.reason),
    ]
    if decision.tool:
        entries.append(struct_entry(TOOL, decision.tool))
    if decision.reads_body:
        # For ext_proc, which judges the tool rules where this check placed the caller.
        entries.append(struct_entry(NETWORKS, ",".join(sorted(decision.placement.members))))
    return b"".join(entries)


# Encoded once per decision (decide hands out the same Decision for the same inputs).
authz_entries = PerDecision(_authz_entries)
_DECISION_ID_PREFIX = b"\x0a" + bytes((len(DECISION_ID),)) + DECISION_ID.encode() + b"\x12"


def decision_id_entry(decision_id: str) -> bytes:
    """The decision id's Struct entry: the one field written anew for every check."""
    return short_struct_entry(_DECISION_ID_PREFIX, decision_id)


def discovery_entries(resource: str) -> bytes:
    """Ask the answers filter to name `resource` in a discovery document's answer."""
    return struct_entry(REWRITE, _REWRITE_RESOURCE) + struct_entry(RESOURCE, resource)


def exchange_entry(key: str) -> bytes:
    """The cache key of the exchanged token sent upstream (a digest: neither token nor
    subject), for the ext_proc stream that sees the upstream's 401 to evict."""
    return struct_entry(EXCHANGED, key)


def _strings(request: ext_proc_pb2.ProcessingRequest, namespace: str) -> dict[str, str]:
    found = request.metadata_context.filter_metadata.get(namespace)
    if found is None:
        return {}
    return {key: value.string_value for key, value in found.fields.items()}


@dataclass(frozen=True, slots=True)
class AuthzVerdict:
    """What ext_authz's answer left in a request's metadata, as ext_proc reads it."""

    reason: str
    server: str | None  # None: the check named no server
    network: str
    networks: str  # comma-joined
    client_ip: str
    resource: str  # a discovery document's answer must name this ("" : not one)
    exchanged: str = ""  # the exchanged token's cache key ("": none was)

    @classmethod
    def read(cls, request: ext_proc_pb2.ProcessingRequest) -> AuthzVerdict:
        said = _strings(request, EXT_AUTHZ_FILTER)
        rewrites = said.get(REWRITE) == _REWRITE_RESOURCE
        return cls(said.get(REASON, ""), said.get(SERVER), said.get(NETWORK, ""),
                   said.get(NETWORKS, ""), said.get(CLIENT_IP, ""),
                   said.get(RESOURCE, "") if rewrites else "", said.get(EXCHANGED, ""))


def ext_proc_response(decision: Decision, decision_id: str) -> ext_proc_pb2.ProcessingResponse:
    """A ProcessingResponse carrying the body decision for Envoy's access log."""
    response = ext_proc_pb2.ProcessingResponse()
    metadata = response.dynamic_metadata.fields[EXT_PROC_FILTER].struct_value
    metadata.update({DECISION_ID: decision_id, REASON: decision.reason, TOOL: decision.tool})
    return response


def write_answer_plan(response: ext_proc_pb2.ProcessingResponse, kind: str) -> None:
    """Tell the answers stream what this request's answer is ("list", "call", or "any":
    whatever a server sends there, the GET stream and its replays included)."""
    response.dynamic_metadata.fields[EXT_PROC_FILTER].struct_value.update({_ANSWER: kind})


def read_answer_plan(request: ext_proc_pb2.ProcessingRequest) -> str:
    """What the request stream said of this answer: "list", "call", "any" or ""."""
    return _strings(request, EXT_PROC_FILTER).get(_ANSWER, "")
