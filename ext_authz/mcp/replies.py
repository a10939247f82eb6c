"""The JSON-RPC answers the sidecar writes in a server's place: an unknown tool's, prompt's
or resource's, and the error for a body that cannot be judged."""

from __future__ import annotations

import json

from .jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    STATELESS_PROTOCOL,
    ItemUse,
    ItemUses,
    UnknownToolReply,
)


def unknown_tool_reply(style: UnknownToolReply, call: ItemUse,
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


RESOURCE_NOT_FOUND = -32002  # MCP's error for a resource a server does not have


def unknown_item_reply(use: ItemUse) -> bytes:
    """What a server answers for a prompt or resource it does not have, in the words of the
    MCP specification's examples (empty for a notification)."""
    if use.rpc_id is None:
        return b""
    if use.kind == "prompt":
        text = json.dumps(f"Unknown prompt: {use.name}", ensure_ascii=False)
        error = f'{{"code":{INVALID_PARAMS},"message":{text}}}'
    else:
        uri = json.dumps(use.name, ensure_ascii=False)
        error = (f'{{"code":{RESOURCE_NOT_FOUND},"message":"Resource not found",'
                 f'"data":{{"uri":{uri}}}}}')
    return f'{{"jsonrpc":"2.0","id":{use.rpc_id},"error":{error}}}'.encode()


_ERROR_NAMES = {PARSE_ERROR: "Parse error", INVALID_REQUEST: "Invalid Request",
                INVALID_PARAMS: "Invalid params"}


def refusal_reply(read: ItemUses) -> bytes:
    """The JSON-RPC error for a body that cannot be judged, saying why."""
    return error_reply(read.error_code, f"{_ERROR_NAMES[read.error_code]}: {read.problem}")


def error_reply(code: int, message: str) -> bytes:
    """A JSON-RPC error answering the whole body (id null: no one message is answered)."""
    text = json.dumps(message, ensure_ascii=False)
    return f'{{"jsonrpc":"2.0","id":null,"error":{{"code":{code},"message":{text}}}}}'.encode()
