"""Which tools an MCP request calls, read from its JSON-RPC body; and the replies we send.

Pure, no I/O. Bodies are read only for servers with tool rules, and parsed only when they
could be a tools/call: a body holding neither `tools/call` nor a backslash (with which JSON
could spell the method another way) cannot be one for any JSON parser, so it costs one byte
scan. Where parsers may disagree, the body is refused rather than guessed at: duplicate
keys, non-UTF-8 bytes, NaN, a compressed body, a partial body, or MCP's `Mcp-Method` and
`Mcp-Name` headers saying something other than the body. Whatever is refused is a 400 that
says why (in words of ours: nothing a client sent is echoed into answers or logs); nothing
unread is let through.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

TOOLS_CALL = "tools/call"
PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS = -32700, -32600, -32602
# From this protocol version on, results say `resultType` and carry the server's identity.
STATELESS_PROTOCOL = "2026-07-28"
_PROTOCOL_KEY = "io.modelcontextprotocol/protocolVersion"

UnknownToolReply = Literal["tool_error", "jsonrpc_error"]


@dataclass(frozen=True, slots=True)
class Body:
    """A request's body as ext_authz sent it, and what says how to read it."""

    data: bytes = b""
    method: str = ""  # the HTTP method
    size: int = 0  # the size Envoy reported: the Content-Length, or -1 when unknown
    content_length: int | None = None  # the Content-Length header (None: absent or bad)
    content_encoding: str = ""
    partial: bool = False  # Envoy sent only the start of it (allow_partial_message)
    mcp_method: str | None = None  # MCP's Mcp-Method header
    mcp_name: str | None = None  # MCP's Mcp-Name header
    protocol_version: str | None = None  # MCP's Mcp-Protocol-Version header


NO_BODY = Body()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tools/call: the tool's name and the request id as JSON text (None: a notification)."""

    name: str
    rpc_id: str | None
    protocol_version: str = ""  # the MCP protocol version the call was made in, if said


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The tools a request calls; or, when `problem` is set, why the body cannot be judged."""

    calls: tuple[ToolCall, ...] = ()
    batch: bool = False
    problem: str = ""
    error_code: int = 0  # the JSON-RPC error code that goes with `problem`


NO_CALLS = ToolCalls()


def _refuse(code: int, problem: str) -> ToolCalls:
    return ToolCalls(problem=problem, error_code=code)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins: refuse rather than pick one.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _rpc_id(message: dict[str, Any]) -> str | None:
    # As the MCP Python SDK does: a string or integer id is a request; null, a fraction or
    # no id at all makes a notification, answered 202 with no body.
    rpc_id = message.get("id")
    if isinstance(rpc_id, bool) or not isinstance(rpc_id, int | str):
        return None
    return json.dumps(rpc_id, ensure_ascii=False)


def _protocol(params: dict[str, Any], body: Body) -> str:
    meta = params.get("_meta")
    version = meta.get(_PROTOCOL_KEY) if isinstance(meta, dict) else None
    return version if isinstance(version, str) else (body.protocol_version or "")


def _could_call_a_tool(body: Body) -> bool:
    data = body.data
    return (body.mcp_method is not None or body.mcp_name is not None
            or b"tools/call" in data or b"\\" in data or b"\x00" in data)


def read_tool_calls(body: Body, max_bytes: int, max_batch: int) -> ToolCalls:
    """Read the tools/call messages of a request to a server with tool rules."""
    if body.partial:
        return _refuse(INVALID_REQUEST, "only part of the body reached the sidecar; tool rules"
                                        " need all of it (allow_partial_message: false)")
    data = body.data
    if not data:
        # Envoy reports size 0 when a route turns body buffering off, so the headers decide:
        # a POST is taken as empty only when its Content-Length says so.
        if body.size > 0 or (body.method == "POST" and body.content_length != 0):
            return _refuse(INVALID_REQUEST, "the request body did not reach the sidecar; tool"
                                            " rules need with_request_body on this route")
        return NO_CALLS
    if body.content_encoding and body.content_encoding.lower() != "identity":
        return _refuse(INVALID_REQUEST, f"a body with Content-Encoding {body.content_encoding}"
                                        " cannot be checked; send it uncompressed")
    if len(data) > max_bytes:
        return _refuse(INVALID_REQUEST, f"the body is {len(data)} bytes, over the"
                                        f" {max_bytes} of mcp.max_body_bytes")
    if not _could_call_a_tool(body):
        return NO_CALLS
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant)
    except _DuplicateKey:
        return _refuse(INVALID_REQUEST, "an object in the body has a key twice")
    except UnicodeDecodeError:
        return _refuse(PARSE_ERROR, "the body is not UTF-8")
    except (ValueError, RecursionError):
        return _refuse(PARSE_ERROR, "the body is not JSON")
    if isinstance(document, list):
        if not document:
            return _refuse(INVALID_REQUEST, "the body is an empty batch")
        if len(document) > max_batch:
            return _refuse(INVALID_REQUEST, f"a batch of {len(document)} messages is over the"
                                            f" {max_batch} of mcp.max_batch_messages")
        messages: list[Any] = document
    elif isinstance(document, dict):
        messages = [document]
    else:
        return _refuse(INVALID_REQUEST, "the body is neither a JSON-RPC message nor a batch")
    calls = []
    for message in messages:
        if not isinstance(message, dict):
            return _refuse(INVALID_REQUEST, "a batch holds something other than messages")
        if message.get("method") != TOOLS_CALL:
            continue
        params = message.get("params")
        if not isinstance(params, dict) or not params.get("name") or not isinstance(
                params["name"], str):
            return _refuse(INVALID_PARAMS, "a tools/call has no params.name")
        calls.append(ToolCall(params["name"], _rpc_id(message), _protocol(params, body)))
    batch = isinstance(document, list)
    problem = _header_problem(body, messages[0], calls, batch)
    if problem:
        return _refuse(INVALID_REQUEST, problem)
    return ToolCalls(tuple(calls), batch) if calls else NO_CALLS


def _header_problem(body: Body, first: dict[str, Any], calls: list[ToolCall],
                    batch: bool) -> str:
    # A server may route by MCP's headers rather than the body: they must say the same.
    if body.mcp_method is None and body.mcp_name is None:
        return ""
    if batch:
        return "Mcp-Method and Mcp-Name headers describe one message, not a batch"
    method = first.get("method")
    if body.mcp_method is not None and body.mcp_method != method:
        return "the Mcp-Method header names another method than the body"
    if method == TOOLS_CALL and body.mcp_name is not None and body.mcp_name != calls[0].name:
        return "the Mcp-Name header names another tool than the body"
    return ""


def unknown_tool_reply(style: UnknownToolReply, call: ToolCall,
                       server_info: tuple[str, str]) -> bytes:
    """What a server answers for a tool it does not have (empty for a notification).

    `tool_error` is byte for byte the official MCP Python SDK's answer, in the form of the
    protocol version the call was made in (from 2026-07-28 on, with `resultType` and the
    server's name and version); `jsonrpc_error` is the MCP specification's example.
    """
    if call.rpc_id is None:
        return b""
    text = json.dumps(f"Unknown tool: {call.name}", ensure_ascii=False)
    if style == "jsonrpc_error":
        answer = f'"error":{{"code":{INVALID_PARAMS},"message":{text}}}'
    else:
        result = f'"content":[{{"text":{text},"type":"text"}}],"isError":true'
        if call.protocol_version >= STATELESS_PROTOCOL:
            name, version = (json.dumps(v, ensure_ascii=False) for v in server_info)
            result += (f',"resultType":"complete","_meta":{{"io.modelcontextprotocol/'
                       f'serverInfo":{{"name":{name},"version":{version}}}}}')
        answer = f'"result":{{{result}}}'
    return f'{{"jsonrpc":"2.0","id":{call.rpc_id},{answer}}}'.encode()


_ERROR_NAMES = {PARSE_ERROR: "Parse error", INVALID_REQUEST: "Invalid Request",
                INVALID_PARAMS: "Invalid params"}


def refusal_reply(read: ToolCalls) -> bytes:
    """The JSON-RPC error for a body that cannot be judged, saying why."""
    return error_reply(read.error_code, f"{_ERROR_NAMES[read.error_code]}: {read.problem}")


def error_reply(code: int, message: str) -> bytes:
    """A JSON-RPC error answering the whole body (id null: no one message is answered)."""
    text = json.dumps(message, ensure_ascii=False)
    return f'{{"jsonrpc":"2.0","id":null,"error":{{"code":{code},"message":{text}}}}}'.encode()
