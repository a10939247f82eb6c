"""The JSON-RPC answers the sidecar writes in a server's place: an unknown tool's, and the
error for a body that cannot be judged."""

from __future__ import annotations

import json

from .jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    STATELESS_PROTOCOL,
    ToolCall,
    ToolCalls,
    UnknownToolReply,
)


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
