"""Reason codes and what each answers: one table for the gRPC code, the HTTP status
and the body of a denial (pure)."""

from __future__ import annotations

import json
from typing import Literal

Reason = Literal[
    "allowed",
    "tool_hidden",
    "item_hidden",
    "registry",
    "resource_metadata",
    "not_found",
    "tool_not_found",
    "item_not_found",
    "batch_refused",
    "bad_mcp_request",
    "body_too_large",
    "upstream_credentials_unavailable",
    "subject_token_refused",
    "bad_request",
    "internal_error",
]

# gRPC status codes by number (grpc.StatusCode carries tuples, the wire wants ints).
GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_PERMISSION_DENIED = 0, 3, 7
GRPC_INTERNAL, GRPC_UNAVAILABLE, GRPC_UNAUTHENTICATED = 13, 14, 16

# One table: each stable reason code -> (CheckResponse gRPC status, HTTP status to the client).
# The reason codes double as metric labels, decision-log values and `check` output.
OUTCOMES: dict[Reason, tuple[int, int]] = {
    "allowed": (GRPC_OK, 200),
    # A hidden tool's call goes on to the server under a fresh name, and the server answers
    # it as the unknown tool it then is (unknown_tool_reply: server, through ext_proc).
    "tool_hidden": (GRPC_OK, 200),
    # The same for a hidden prompt or resource (prompts/get, resources/read, (un)subscribe,
    # completion/complete): the server answers for the unknown one it then is.
    "item_hidden": (GRPC_OK, 200),
    # The registry, answered in Envoy's place (a denial only in gRPC terms): the servers
    # this caller may see.
    "registry": (GRPC_PERMISSION_DENIED, 200),
    # The RFC 9728 metadata of a server whose callers' tokens the gateway exchanges,
    # answered in Envoy's place: the gateway is the resource server its callers see.
    "resource_metadata": (GRPC_PERMISSION_DENIED, 200),
    "not_found": (GRPC_PERMISSION_DENIED, 404),
    # A hidden tool gets what the server says of a tool it lacks: a JSON-RPC answer, 200
    # (202 with no body for a notification, as the MCP Python SDK answers one).
    "tool_not_found": (GRPC_PERMISSION_DENIED, 200),
    # A hidden prompt or resource answered by the sidecar where it cannot rename (a Check):
    # the MCP specification's error for an unknown one.
    "item_not_found": (GRPC_PERMISSION_DENIED, 200),
    "batch_refused": (GRPC_PERMISSION_DENIED, 400),
    "bad_mcp_request": (GRPC_INVALID_ARGUMENT, 400),
    "body_too_large": (GRPC_INVALID_ARGUMENT, 413),
    "upstream_credentials_unavailable": (GRPC_UNAVAILABLE, 503),
    # The caller's token cannot be exchanged (none verified, expired, or refused by the
    # IdP): a 401 whose challenge names the server's metadata at the gateway.
    "subject_token_refused": (GRPC_UNAUTHENTICATED, 401),
    "bad_request": (GRPC_INVALID_ARGUMENT, 400),
    "internal_error": (GRPC_INTERNAL, 500),
}


def denial_body(reason: Reason) -> bytes:
    """The body of a denial that has no per-request answer: a constant per reason, so that a
    hidden server and an unknown one answer the same bytes."""
    return json.dumps({"error": reason}).encode()
