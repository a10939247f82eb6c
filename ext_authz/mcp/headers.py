"""MCP's routing headers against the body (pure, no I/O).

A server, or a router before it, may go by `Mcp-Method` and `Mcp-Name` rather than the
body: they must say what the body says, once. Envoy joins a repeated header with "," in
ext_authz's header map, so a comma counts as a repeat too.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

# The methods whose name MCP mirrors in the `Mcp-Name` header, and the param that holds it.
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_BASE64_HEADER = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)


def decode_header_value(value: str) -> str | None:
    """Read an MCP header value: verbatim, or the `=?base64?...?=` form the SDKs send for
    names that are not printable ASCII. None when that form is malformed."""
    match = _BASE64_HEADER.fullmatch(value)
    if match is None:
        return value
    payload = match.group(1)
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None  # not canonical: no SDK writes it, and decoders disagree on it
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def header_problem(mcp_method: tuple[str, ...], mcp_name: tuple[str, ...],
                   messages: list[dict[str, Any]], batch: bool) -> str:
    """Why the headers (every value received) and the body's messages disagree ("" when
    they do not)."""
    if not mcp_method and not mcp_name:
        return ""
    if batch:
        return "Mcp-Method and Mcp-Name headers describe one message, not a batch"
    for header, values in (("Mcp-Method", mcp_method), ("Mcp-Name", mcp_name)):
        if len(values) > 1 or any("," in value for value in values):
            return f"the {header} header is sent more than once"
    message = messages[0]
    method = message.get("method")
    if mcp_method and mcp_method[0] != method:
        return "the Mcp-Method header names another method than the body"
    if not mcp_name:
        return ""
    key = NAME_BEARING_METHODS.get(method) if isinstance(method, str) else None
    if key is None:
        return "an Mcp-Name header on a message whose method names nothing"
    name = decode_header_value(mcp_name[0])
    if name is None:
        return "the Mcp-Name header's =?base64?...?= form is malformed"
    params = message.get("params")
    if not isinstance(params, dict) or params.get(key) != name:
        return f"the Mcp-Name header names another {key} than the body's params.{key}"
    return ""
