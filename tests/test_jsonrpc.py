"""Reading tools/call from JSON-RPC bodies, and the replies for hidden tools."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    NO_USES,
    PARSE_ERROR,
    ROUTING_KEYS,
    ItemUse,
    Received,
    fold_key,
    read_item_uses,
    request_body,
)
from ext_authz.mcp.replies import unknown_tool_reply

MAX_BYTES, MAX_BATCH = 65536, 8
JSON = {"content-type": ["application/json"]}


def read(data: bytes | str, headers: dict[str, list[str]] | None = None,
         received: Received = "whole", method: str = "POST") -> Any:
    raw = data.encode() if isinstance(data, str) else data
    body = request_body(raw, method, JSON if headers is None else {**JSON, **headers}, received)
    return read_item_uses(body, MAX_BYTES, MAX_BATCH)


def call(name: str, rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": "tools/call",
                               "params": {"name": name, **params}}
    if rpc_id is not None:
        message["id"] = rpc_id
    return message


ADD = json.dumps(call("add"))


class TestReading:
    @pytest.mark.parametrize(
        ("body", "names"),
        [
            (ADD, ["add"]),
            (json.dumps([call("a", 1), {"jsonrpc": "2.0", "method": "ping", "id": 2},
                         call("b", 3)]), ["a", "b"]),
            (r'{"jsonrpc":"2\u002e0","method":"tools\/call","params":{"name":"\u0061dd"},'
             r'"id":1}', ["add"]),
            (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), []),
            (json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), []),
            (json.dumps(call("add", arguments={"text": "tools/call"})), ["add"]),
            # Inside arguments the keys are the tool's own data: any case, any spelling.
            (json.dumps(call("add", arguments={"id": 1, "ID": 2, "Name": "x", "name": "y",
                                               "param\u017f": 3})), ["add"]),
            (json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}), []),  # a client's answer
        ],
    )
    def test_names(self, body: str, names: list[str]) -> None:
        """Every tools/call's name, whatever the JSON spelling."""
        assert [c.name for c in read(body).uses] == names

    @pytest.mark.parametrize(
        ("body", "headers", "code", "words"),
        [
            # Every body is parsed: no byte scan decides that a body needs no reading.
            ('{"method": "tools/list", oops', {}, PARSE_ERROR, "not JSON"),
            ("hello", {}, PARSE_ERROR, "not JSON"),
            ("", {}, PARSE_ERROR, "empty"),
            (" \n", {}, PARSE_ERROR, "empty"),
            ('{"method":"tools/call"', {}, PARSE_ERROR, "not JSON"),
            (b'{"method":"tools/call","params":{"name":"\xff"}}', {}, PARSE_ERROR, "UTF-8"),
            (b'{"method":"tools/call","params":{"name":"\xed\xa0\x80"}}', {}, PARSE_ERROR,
             "UTF-8"),  # an encoded surrogate
            (b"\xef\xbb\xbf" + ADD.encode(), {}, PARSE_ERROR, "byte order mark"),
            ('{"method":"tools/call","params":{"name":NaN}}', {}, PARSE_ERROR, "not JSON"),
            ("[" * 30_000 + "]" * 30_000, {}, PARSE_ERROR, "nested too deeply"),
            ('{"jsonrpc":"2.0","id":"\\ud800","method":"tools/call","params":{"name":"a"}}', {},
             PARSE_ERROR, "lone UTF-16 surrogate"),
            ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a",'
             '"arguments":{"x":"\\udc00"}}}', {}, PARSE_ERROR, "lone UTF-16 surrogate"),
            ('{"jsonrpc":"2.0","method":"tools/call","params":{}}', {}, INVALID_PARAMS,
             "no params.name"),
            ('{"jsonrpc":"2.0","method":"tools/call","params":{"name":""}}', {}, INVALID_PARAMS,
             "params.name"),
            ('{"jsonrpc":"2.0","method":"tools/call","params":{"name":7}}', {}, INVALID_PARAMS,
             "params.name"),
            ('{"jsonrpc":"2.0","method":"tools/call","params":"add"}', {}, INVALID_PARAMS,
             "params.name"),
            # Strict servers refuse these, echoing them; lenient ones run them: refused here.
            ('{"method":"tools/call","params":{"name":"add"},"id":1}', {}, INVALID_REQUEST,
             '"jsonrpc": "2.0"'),
            ('{"jsonrpc":"1.0","method":"tools/call","params":{"name":"add"},"id":1}', {},
             INVALID_REQUEST, '"jsonrpc": "2.0"'),
            ('{"jsonrpc":2.0,"method":"tools/call","params":{"name":"add"},"id":1}', {},
             INVALID_REQUEST, '"jsonrpc": "2.0"'),
            ('{"method":"tools/call","method":"tools/list"}', {}, INVALID_REQUEST, "twice"),
            ('{"method":"tools/call","params":{"name":"a","name":"b"}}', {}, INVALID_REQUEST,
             "twice"),
            ('"tools/call"', {}, INVALID_REQUEST, "neither"),
            ('[1, {"method":"tools/call"}]', {}, INVALID_REQUEST, "other than messages"),
            ("[]", {}, INVALID_REQUEST, "empty batch"),
            (json.dumps([call("a")] * (MAX_BATCH + 1)), {}, INVALID_REQUEST, "max_batch"),
            (ADD, {"content-encoding": ["gzip"]}, INVALID_REQUEST, "Content-Encoding"),
            (ADD, {"mcp-name": ["b"]}, INVALID_REQUEST, "Mcp-Name"),
            (ADD, {"mcp-method": ["tools/list"]}, INVALID_REQUEST, "Mcp-Method"),
            (json.dumps([call("a")]), {"mcp-name": ["a"]}, INVALID_REQUEST, "not a batch"),
            ("x" * (MAX_BYTES + 1), {}, INVALID_REQUEST, "max_body_bytes"),
        ],
    )
    def test_refusals(self, body: str | bytes, headers: dict[str, list[str]], code: int,
                      words: str) -> None:
        """What cannot be judged exactly is refused, with the JSON-RPC code and a reason."""
        result = read(body, headers)
        assert (result.error_code, result.uses) == (code, ())
        assert words in result.problem

    @pytest.mark.parametrize(
        "body",
        [
            # Go's encoding/json: keys match fields case-insensitively, with Unicode simple
            # folding, and the last one wins. Each of these runs delete_repo on a Go server.
            '{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call",'
            '"params":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_repos",'
            '"Name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","param\\u017f":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","param\u017f":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a",'
            '"argument\u017f":{}}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a",'
            '"ARGUMENTS":{}}}',
            '{"jsonrpc":"2.0","ID":1,"method":"tools/call","params":{"name":"a"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","_META":{}}}',
            # Wider than Go, for parsers that fold further: compatibility forms, Turkic i.
            '{"jsonrpc":"2.0","\u0131d":1,"method":"tools/call","params":{"name":"a"}}',
            '{"jsonrpc":"2.0","id":1,"\uff4dethod":"tools/call","params":{"name":"a"}}',
            # Two keys that fold to one name, routing key or not.
            '{"jsonrpc":"2.0","id":1,"method":"ping","extra":1,"EXTRA":2}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","x":1,'
            '"X":2}}',
        ],
    )
    def test_keys_that_some_parser_reads_otherwise(self, body: str) -> None:
        """Envelope and params keys that fold onto another name are refused, saying why."""
        result = read(body)
        assert result.error_code == INVALID_REQUEST, result
        assert "another case" in result.problem or "different case" in result.problem

    @pytest.mark.parametrize(
        "content_type",
        ["application/json", "APPLICATION/JSON", "application/json; charset=utf-8",
         'application/json;charset="UTF-8"', "application/json ; charset = utf-8"],
    )
    def test_json_in_utf8_is_read(self, content_type: str) -> None:
        """application/json, with no charset or UTF-8 in any case, quoted or not."""
        assert read(ADD, {"content-type": [content_type]}).uses[0].name == "add"

    @pytest.mark.parametrize(
        "content_type",
        [None, "", "text/plain", "application/json; charset=utf-7",
         "application/json; charset=utf-16le", "application/json; charset=utf-32",
         "application/json; charset=latin1", "application/json; charset=utf-8; x=y",
         "application/json, application/json", "application/jsonx", "application/json;",
         "application/json-seq", "application/*"],
    )
    def test_other_content_types_are_refused(self, content_type: str | None) -> None:
        """Any other media type or charset: a server could decode the bytes another way."""
        headers = {"content-type": [content_type]} if content_type is not None else {}
        body = request_body(ADD.encode(), "POST", headers)
        result = read_item_uses(body, MAX_BYTES, MAX_BATCH)
        assert (result.error_code, "Content-Type" in result.problem) == (INVALID_REQUEST, True)

    def test_utf7_smuggling_is_refused(self) -> None:
        """A utf-7 body spells tools/call without its bytes: refused by its charset."""
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools+AC8-call","params":{"name":"x"}}'
        result = read(body, {"content-type": ["application/json; charset=utf-7"]})
        assert "Content-Type" in result.problem

    def test_headers_that_agree_are_fine(self) -> None:
        """Mcp-Method and Mcp-Name matching the body are accepted."""
        result = read(json.dumps(call("a")), {"mcp-method": ["tools/call"], "mcp-name": ["a"]})
        assert [c.name for c in result.uses] == ["a"]

    def test_base64_mcp_name_is_decoded(self) -> None:
        """The SDKs send a name that is not printable ASCII as =?base64?...?=: it matches."""
        name = "r\u00e9sum\u00e9 tool"
        header = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
        result = read(json.dumps(call(name)), {"mcp-name": [header]})
        assert [c.name for c in result.uses] == [name]
        other = "=?base64?" + base64.b64encode(b"other").decode() + "?="
        assert "Mcp-Name" in read(json.dumps(call(name)), {"mcp-name": [other]}).problem

    @pytest.mark.parametrize(
        "headers",
        [
            {"mcp-name": ["add", "delete"]},  # ext_proc sees each header
            {"mcp-name": ["add,delete"]},  # ext_authz's map joins them with ","
            {"mcp-method": ["tools/call", "tools/call"]},
            {"mcp-method": ["tools/call,tools/call"]},
            {"mcp-name": ["=?base64?YWRk?"]},  # malformed
            {"mcp-name": ["=?base64?YWRl?="]},  # not canonical ("ade" spelled loosely)
            {"mcp-name": ["=?base64?!!!!?="]},
        ],
    )
    def test_repeated_or_malformed_mcp_headers_are_refused(
            self, headers: dict[str, list[str]]) -> None:
        """A repeated routing header is read as its first copy by some, its last by others."""
        body = json.dumps(call("add,delete" if "add,delete" in str(headers) else "add"))
        result = read(body, headers)
        assert result.error_code == INVALID_REQUEST
        assert "Mcp-" in result.problem

    def test_mcp_name_on_a_method_that_names_nothing(self) -> None:
        """tools/list names no tool: an Mcp-Name beside it is refused, not ignored."""
        result = read('{"jsonrpc":"2.0","id":1,"method":"tools/list"}', {"mcp-name": ["x"]})
        assert "names nothing" in result.problem

    @pytest.mark.parametrize(
        ("received", "words"),
        [("missing", "did not reach the sidecar"), ("partial", "part of the body"),
         ("text", "as text")],
    )
    def test_a_body_not_received_whole_is_refused(self, received: Received,
                                                   words: str) -> None:
        """A body Envoy did not send, or sent in part or as text, is not taken as read."""
        result = read(b"", received=received) if received == "missing" else read(
            ADD, received=received)
        assert words in result.problem

    @pytest.mark.parametrize("method", ["GET", "DELETE"])
    def test_no_body_on_get_or_delete_is_nothing_to_read(self, method: str) -> None:
        """The SSE stream's GET and a session's DELETE carry no body: no tools called."""
        assert read_item_uses(request_body(b"", method, {}), MAX_BYTES, MAX_BATCH) is NO_USES

    def test_a_body_on_any_method_is_read(self) -> None:
        """A body is judged whatever the method: a lenient server might run it."""
        assert read(ADD, method="PUT").uses[0].name == "add"
        assert "Content-Type" in read_item_uses(
            request_body(ADD.encode(), "GET", {}), MAX_BYTES, MAX_BATCH).problem

    @pytest.mark.parametrize(
        ("rpc_id", "expected"),
        [("1", "1"), ('"a"', '"a"'), ('"\u00e9"', '"\u00e9"'), ("-0", "0"), ("007", None),
         ("9007199254740991", "9007199254740991"), ("-9007199254740991", "-9007199254740991"),
         ("9007199254740992", None), ("1" * 400, None), ("1e400", None), ("1.5", None),
         ("1.0", None), ("null", None), ("true", None), ("[]", None), ("{}", None)],
    )
    def test_ids(self, rpc_id: str, expected: str | None) -> None:
        """A tools/call's id is a string or an integer every parser keeps; else refused."""
        result = read(f'{{"jsonrpc":"2.0","id":{rpc_id},"method":"tools/call",'
                      '"params":{"name":"a"}}')
        if expected is None:
            assert "the id" in result.problem or "not JSON" in result.problem
        else:
            assert result.uses[0].rpc_id == expected

    def test_a_notification_has_no_id(self) -> None:
        """No id at all: a notification."""
        assert read(json.dumps(call("a", None))).uses[0].rpc_id is None

    def test_huge_numbers_in_arguments_are_data(self) -> None:
        """Numbers too big for a double or for Python's int parsing are read, not refused."""
        body = f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a",' \
               f'"arguments":{{"n":{"9" * 5000},"f":1e999999}}}}}}'
        assert read(body).uses[0].name == "a"

    def test_protocol_version_from_meta_then_header(self) -> None:
        """The call's _meta names its protocol version; the header is the fallback."""
        meta = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}
        older = {"mcp-protocol-version": ["2025-06-18"]}
        [from_meta] = read(json.dumps(call("a", **meta)), older).uses
        [from_header] = read(json.dumps(call("a")), older).uses
        assert (from_meta.protocol_version, from_header.protocol_version) == (
            "2026-07-28", "2025-06-18")


# Keys that no parser could take for a routing key, nor for one another.
plain_keys = st.text(max_size=5).filter(lambda key: fold_key(key) not in {
    fold_key(routing) for routing in ROUTING_KEYS})


def folds_apart(keys: dict[str, Any]) -> bool:
    return len({fold_key(key) for key in keys}) == len(keys)


safe_integers = st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
messages = st.one_of(
    st.builds(call, st.text(min_size=1, max_size=20), st.one_of(safe_integers, st.text())),
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": safe_integers,
                           "method": st.sampled_from(["tools/list", "initialize", "ping"]),
                           "params": st.dictionaries(plain_keys, json_values,
                                                     max_size=3).filter(folds_apart)}),
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
        assert [c.name for c in result.uses] == expected
        assert result.batch == isinstance(message, list) or not expected

    @settings(max_examples=500)
    @given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
    def test_never_raises(self, data: bytes) -> None:
        """Any bytes at all give calls or a refusal, never an exception."""
        result = read(data)
        assert bool(result.problem) == bool(result.error_code)
        assert not (result.problem and result.uses)


class TestReplies:
    def test_tool_error_is_the_python_sdk_answer(self) -> None:
        """Byte for byte what the MCP Python SDK (2.3) answers for a tool it lacks."""
        legacy = unknown_tool_reply("tool_error", ItemUse("nope", "7"), ("public", ""))
        assert legacy == (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"text":"Unknown tool:'
                          b' nope","type":"text"}],"isError":true}}')
        stateless = unknown_tool_reply("tool_error", ItemUse("nope", "2", "2026-07-28"),
                                       ("public", ""))
        assert stateless == (
            b'{"jsonrpc":"2.0","id":2,"result":{"content":[{"text":"Unknown tool: nope",'
            b'"type":"text"}],"isError":true,"resultType":"complete","_meta":{"io.model'
            b'contextprotocol/serverInfo":{"name":"public","version":""}}}}')

    def test_jsonrpc_error_and_notifications(self) -> None:
        """The specification's error form; a notification gets no body at all."""
        error = unknown_tool_reply("jsonrpc_error", ItemUse("n\u00e9", '"x"'), ("s", "1"))
        assert json.loads(error) == {"jsonrpc": "2.0", "id": "x", "error": {
            "code": -32602, "message": "Unknown tool: n\u00e9"}}
        assert unknown_tool_reply("tool_error", ItemUse("n", None), ("s", "")) == b""
