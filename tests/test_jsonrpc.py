"""Reading tools/call from JSON-RPC bodies, and the replies for hidden tools."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    NO_CALLS,
    PARSE_ERROR,
    Body,
    ToolCall,
    read_tool_calls,
    unknown_tool_reply,
)

MAX_BYTES, MAX_BATCH = 65536, 8


def read(data: bytes | str, **headers: Any) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    return read_tool_calls(Body(raw, "POST", len(raw), **headers), MAX_BYTES, MAX_BATCH)


def call(name: str, rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": "tools/call",
                               "params": {"name": name, **params}}
    if rpc_id is not None:
        message["id"] = rpc_id
    return message


class TestReading:
    @pytest.mark.parametrize(
        ("body", "names"),
        [
            (json.dumps(call("add")), ["add"]),
            (json.dumps([call("a", 1), {"jsonrpc": "2.0", "method": "ping", "id": 2},
                         call("b", 3)]), ["a", "b"]),
            (r'{"method":"tools\/call","params":{"name":"\u0061dd"},"id":1}', ["add"]),
            (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), []),
            (json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), []),
            (json.dumps(call("add", arguments={"text": "tools/call"})), ["add"]),
        ],
    )
    def test_names(self, body: str, names: list[str]) -> None:
        """Every tools/call's name, whatever the JSON spelling."""
        assert [c.name for c in read(body).calls] == names

    def test_a_body_that_cannot_be_a_call_is_not_parsed(self) -> None:
        """Without `tools/call` or a backslash in it, even invalid JSON is let be."""
        assert read('{"method": "tools/list", oops') is NO_CALLS
        assert read("hello") is NO_CALLS

    @pytest.mark.parametrize(
        ("body", "headers", "code", "words"),
        [
            ('{"method":"tools/call"', {}, PARSE_ERROR, "not JSON"),
            (b'{"method":"tools/call","params":{"name":"\xff"}}', {}, PARSE_ERROR, "UTF-8"),
            ('{"method":"tools/call","params":{"name":NaN}}', {}, PARSE_ERROR, "not JSON"),
            ("[" * 30_000 + "\\" + "]" * 30_000, {}, PARSE_ERROR, "not JSON"),
            ('{"method":"tools/call","params":{}}', {}, INVALID_PARAMS, "no params.name"),
            ('{"method":"tools/call","params":{"name":""}}', {}, INVALID_PARAMS, "params.name"),
            ('{"method":"tools/call","params":{"name":7}}', {}, INVALID_PARAMS, "params.name"),
            ('{"method":"tools/call","params":"add"}', {}, INVALID_PARAMS, "params.name"),
            ('{"method":"tools/call","method":"tools/list"}', {}, INVALID_REQUEST, "twice"),
            ('{"method":"tools/call","params":{"name":"a","name":"b"}}', {}, INVALID_REQUEST,
             "twice"),
            ('"tools/call"', {}, INVALID_REQUEST, "neither"),
            ('[1, {"method":"tools/call"}]', {}, INVALID_REQUEST, "other than messages"),
            ("[]", {"mcp_method": "tools/call"}, INVALID_REQUEST, "empty batch"),
            (json.dumps([call("a")] * (MAX_BATCH + 1)), {}, INVALID_REQUEST, "max_batch"),
            (json.dumps(call("a")), {"content_encoding": "gzip"}, INVALID_REQUEST, "gzip"),
            (json.dumps(call("a")), {"partial": True}, INVALID_REQUEST, "part of the body"),
            (json.dumps(call("a")), {"mcp_name": "b"}, INVALID_REQUEST, "Mcp-Name"),
            (json.dumps(call("a")), {"mcp_method": "tools/list"}, INVALID_REQUEST,
             "Mcp-Method"),
            (json.dumps([call("a")]), {"mcp_name": "a"}, INVALID_REQUEST, "not a batch"),
            ("x" * (MAX_BYTES + 1), {}, INVALID_REQUEST, "max_body_bytes"),
        ],
    )
    def test_refusals(self, body: str | bytes, headers: dict[str, Any], code: int,
                      words: str) -> None:
        """What cannot be judged exactly is refused, with the JSON-RPC code and a reason."""
        result = read(body, **headers)
        assert (result.error_code, result.calls) == (code, ())
        assert words in result.problem

    def test_headers_that_agree_are_fine(self) -> None:
        """Mcp-Method and Mcp-Name matching the body are accepted."""
        result = read(json.dumps(call("a")), mcp_method="tools/call", mcp_name="a")
        assert [c.name for c in result.calls] == ["a"]

    @pytest.mark.parametrize(
        ("method", "size", "content_length", "refused"),
        [("POST", 12, 12, True), ("POST", 0, 12, True), ("POST", 0, None, True),
         ("POST", -1, None, True), ("PUT", 12, 12, True), ("POST", 0, 0, False),
         ("GET", -1, None, False), ("GET", 0, None, False), ("DELETE", 0, None, False)],
    )
    def test_a_missing_body_is_refused(self, method: str, size: int,
                                       content_length: int | None, refused: bool) -> None:
        """A body Envoy did not send (buffering off on the route) is not taken as empty."""
        body = Body(b"", method, size, content_length=content_length)
        result = read_tool_calls(body, MAX_BYTES, MAX_BATCH)
        assert ("did not reach the sidecar" in result.problem) == refused

    @pytest.mark.parametrize(
        ("rpc_id", "expected"),
        [(1, "1"), ("a", '"a"'), ("é", '"é"'), (None, None), (1.5, None), (True, None)],
    )
    def test_ids(self, rpc_id: Any, expected: str | None) -> None:
        """String and integer ids are requests; anything else is a notification (as the SDK)."""
        [found] = read(json.dumps(call("a", rpc_id))).calls
        assert found.rpc_id == expected

    def test_protocol_version_from_meta_then_header(self) -> None:
        """The call's _meta names its protocol version; the header is the fallback."""
        meta = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}
        [from_meta] = read(json.dumps(call("a", **meta)), protocol_version="2025-06-18").calls
        [from_header] = read(json.dumps(call("a")), protocol_version="2025-06-18").calls
        assert (from_meta.protocol_version, from_header.protocol_version) == (
            "2026-07-28", "2025-06-18")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
messages = st.one_of(
    st.builds(call, st.text(min_size=1, max_size=20), st.one_of(st.integers(), st.text())),
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(),
                           "method": st.sampled_from(["tools/list", "initialize", "ping"]),
                           "params": st.dictionaries(st.text(max_size=5), json_values,
                                                     max_size=3)}),
)


class TestProperties:
    @settings(max_examples=300)
    @given(message=st.one_of(messages, st.lists(messages, min_size=1, max_size=MAX_BATCH)),
           ascii_only=st.booleans())
    def test_reads_what_a_json_parser_reads(self, message: Any, ascii_only: bool) -> None:
        """However the body is spelled, the names read are the ones the server would call."""
        body = json.dumps(message, ensure_ascii=ascii_only)
        batch = message if isinstance(message, list) else [message]
        expected = [m["params"]["name"] for m in batch if m.get("method") == "tools/call"]
        result = read(body)
        assert result.problem == ""
        assert [c.name for c in result.calls] == expected
        assert result.batch == isinstance(message, list) or not expected

    @settings(max_examples=500)
    @given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
    def test_never_raises(self, data: bytes) -> None:
        """Any bytes at all give calls or a refusal, never an exception."""
        result = read_tool_calls(Body(data, "POST", len(data)), MAX_BYTES, MAX_BATCH)
        assert bool(result.problem) == bool(result.error_code)
        assert not (result.problem and result.calls)


class TestReplies:
    def test_tool_error_is_the_python_sdk_answer(self) -> None:
        """Byte for byte what the MCP Python SDK (2.3) answers for a tool it lacks."""
        legacy = unknown_tool_reply("tool_error", ToolCall("nope", "7"), ("public", ""))
        assert legacy == (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"text":"Unknown tool:'
                          b' nope","type":"text"}],"isError":true}}')
        stateless = unknown_tool_reply("tool_error", ToolCall("nope", "2", "2026-07-28"),
                                       ("public", ""))
        assert stateless == (
            b'{"jsonrpc":"2.0","id":2,"result":{"content":[{"text":"Unknown tool: nope",'
            b'"type":"text"}],"isError":true,"resultType":"complete","_meta":{"io.model'
            b'contextprotocol/serverInfo":{"name":"public","version":""}}}}')

    def test_jsonrpc_error_and_notifications(self) -> None:
        """The specification's error form; a notification gets no body at all."""
        error = unknown_tool_reply("jsonrpc_error", ToolCall("n\u00e9", '"x"'), ("s", "1"))
        assert json.loads(error) == {"jsonrpc": "2.0", "id": "x", "error": {
            "code": -32602, "message": "Unknown tool: n\u00e9"}}
        assert unknown_tool_reply("tool_error", ToolCall("n", None), ("s", "")) == b""
