"""The body reader against executable models of the parsers that MCP servers decide with.

The property: whenever the reader lets a body through for a caller, no model of a server
sees a call of a tool hidden from that caller. The models:

- Go's encoding/json as mark3labs/mcp-go and the go-sdk before CVE-2026-27896 use it: each
  key is matched to a struct field exactly, else under Go's case folding (ASCII case, and
  Unicode simple folding: the long s is s, the Kelvin sign is k), and the last matching key
  wins; a value of the wrong type for a field is an error; a null leaves the field alone.
- The TypeScript SDK behind express.json(): the bytes decoded in the Content-Type's charset
  (iconv-lite: utf-7, utf-16, utf-32, a BOM stripped), then JSON.parse (exact keys, the last
  of two equal keys wins).
- The Python SDK: UTF-8 only, exact keys, the last of two equal keys wins.
- A router in front of a server that goes by MCP's headers: Mcp-Method and Mcp-Name (its
  first copy, or its last), the name in the SDKs' =?base64?...?= form decoded.

Hypothesis draws envelopes whose keys are spelt in every case and fold, duplicated, with
charsets, byte order marks and routing headers. tests/e2e/test_tool_bypass.py sends the
same kinds of request through a real Envoy to real Python and TypeScript servers.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ext_authz.mcp.jsonrpc import read_item_uses, request_body

HIDDEN = "delete_repo"
VISIBLE = ("list_repos", "whoami")
MAX_BYTES, MAX_BATCH = 65536, 8


class Unreadable(Exception):
    """The model's server refuses the body: no tool runs."""


# -- Go ----------------------------------------------------------------------------------

# Go's unicode.SimpleFold orbits that reach beyond plain upper/lower case (the caseOrbit
# table of Go's unicode package), for the characters the strategies below draw from.
_GO_ORBITS = [("K", "k", "\u212a"), ("S", "s", "\u017f"), ("\u00b5", "\u039c", "\u03bc"),
              ("\u00c5", "\u00e5", "\u212b"), ("\u00df", "\u1e9e"), ("\u0130",), ("\u0131",)]
_GO_FOLD = {char: min(orbit) for orbit in _GO_ORBITS for char in orbit}


def _go_fold_rune(char: str) -> str:
    if char in _GO_FOLD:
        return _GO_FOLD[char]
    if char.isascii():
        return char.upper()
    # Elsewhere an orbit is the character and its simple upper and lower case.
    orbit = {char} | {c for c in (char.upper(), char.lower()) if len(c) == 1}
    return min(orbit)


def go_fold(key: str) -> str:
    """encoding/json's foldName: what two keys must share to match the same field."""
    return "".join(_go_fold_rune(char) for char in key)


def _go_text(data: bytes) -> str:
    # Go replaces invalid UTF-8 with U+FFFD rather than refusing it; so do lone surrogates.
    return data.decode("utf-8", "replace")


def _go_object(value: Any, fields: dict[str, type]) -> dict[str, Any]:
    """Decode a JSON object into a struct with these fields, as encoding/json does."""
    if not isinstance(value, list):  # objects arrive as pairs, in order (see go_messages)
        raise Unreadable("not an object")
    by_fold = {go_fold(name): name for name in fields}
    decoded: dict[str, Any] = {}
    for key, item in value:
        name = key if key in fields else by_fold.get(go_fold(key))
        if name is None:
            continue
        if item is None:
            continue  # null leaves a field as it was
        wanted = fields[name]
        if wanted is not object and not isinstance(item, wanted):
            raise Unreadable(f"{name}: wrong type")
        decoded[name] = item  # the last matching key wins
    return decoded


def _pairs(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise Unreadable(name)

    return json.loads(text, object_pairs_hook=list, parse_constant=no_constant)


def go_messages(data: bytes, headers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(method, tool name) of every tools/call a Go server (mcp-go) would run."""
    text = _go_text(data)
    if text.startswith("\ufeff"):
        raise Unreadable("Go does not skip a byte order mark")
    try:
        document = _pairs(text)
    except ValueError as exc:
        raise Unreadable(str(exc)) from None
    messages = document if isinstance(document, list) and not (
        document and isinstance(document[0], tuple)) else [document]
    calls = []
    for message in messages:
        envelope = _go_object(message, {"jsonrpc": str, "id": object, "method": str,
                                        "params": object})
        if envelope.get("method") != "tools/call":
            continue
        params = _go_object(envelope.get("params"), {"name": str, "arguments": object,
                                                      "_meta": object})
        if isinstance(params.get("name"), str):
            calls.append(("tools/call", params["name"]))
    return calls


# -- TypeScript --------------------------------------------------------------------------

_IANA = {"utf-8": "utf-8", "utf8": "utf-8", "utf-7": "utf-7", "utf-16le": "utf-16-le",
         "utf-16be": "utf-16-be", "utf-16": "utf-16", "utf-32": "utf-32",
         "utf-32le": "utf-32-le", "utf-32be": "utf-32-be"}


def _charset(content_type: str) -> str:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        raise Unreadable("415")
    charset = "utf-8"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if not charset.startswith("utf-"):  # body-parser refuses other charsets (415)
        raise Unreadable("415")
    return charset


def ts_messages(data: bytes, headers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(method, tool name) of every tools/call the TypeScript SDK behind express.json() runs."""
    content_type = ",".join(headers.get("content-type", []))
    codec = _IANA.get(_charset(content_type))
    if codec is None:
        raise Unreadable("iconv-lite has no such charset")
    text = codecs.decode(data, codec, "replace")
    text = text.removeprefix("\ufeff")  # iconv-lite strips a BOM
    if text.lstrip(" \t\r\n")[:1] not in ("{", "["):  # body-parser's strict mode
        raise Unreadable("400")
    try:
        document = json.loads(text)  # like JSON.parse: exact keys, the last one wins
    except ValueError as exc:
        raise Unreadable(str(exc)) from None
    return _exact_calls(document)


def _exact_calls(document: Any) -> list[tuple[str, str]]:
    calls = []
    for message in document if isinstance(document, list) else [document]:
        if not isinstance(message, dict) or message.get("method") != "tools/call":
            continue
        params = message.get("params")
        if isinstance(params, dict) and isinstance(params.get("name"), str):
            calls.append(("tools/call", params["name"]))
    return calls


# -- Python ------------------------------------------------------------------------------

def py_messages(data: bytes, headers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(method, tool name) of every tools/call the Python SDK runs (UTF-8, exact keys)."""
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise Unreadable(str(exc)) from None
    return _exact_calls(document)


# -- a router that goes by MCP's headers -------------------------------------------------

def _decode_header(value: str) -> str:
    match = re.fullmatch(r"=\?base64\?(.*)\?=", value)
    return base64.b64decode(match.group(1)).decode("utf-8", "replace") if match else value


def header_router(pick: Callable[[list[str]], str]
                  ) -> Callable[[bytes, dict[str, list[str]]], list[tuple[str, str]]]:
    def messages(data: bytes, headers: dict[str, list[str]]) -> list[tuple[str, str]]:
        method, name = headers.get("mcp-method"), headers.get("mcp-name")
        if not method or not name or pick(method) != "tools/call":
            return []
        return [("tools/call", _decode_header(pick(name)))]

    return messages


MODELS = {"go": go_messages, "typescript": ts_messages, "python": py_messages,
          "router-first": header_router(lambda values: values[0]),
          "router-last": header_router(lambda values: values[-1])}


def seen_by(model: str, data: bytes, headers: dict[str, list[str]]) -> list[str]:
    try:
        return [name for _, name in MODELS[model](data, headers)]
    except (Unreadable, ValueError, UnicodeError, TypeError, AttributeError):
        return []  # the server refuses the body: nothing runs


def hidden_call_allowed(data: bytes, headers: dict[str, list[str]]) -> bool:
    """Whether the reader lets this body through for a caller who may not call HIDDEN."""
    read = read_item_uses(request_body(data, "POST", headers), MAX_BYTES, MAX_BATCH)
    return not read.problem and all(call.name != HIDDEN for call in read.uses)


# -- strategies --------------------------------------------------------------------------

_SPECIAL = {"s": ["s", "S", "\u017f"], "k": ["k", "K", "\u212a"], "i": ["i", "I", "\u0131"]}


@st.composite
def spellings(draw: st.DrawFn, key: str) -> str:
    """The key as written, or in another case or fold, letter by letter."""
    if draw(st.booleans()):
        return key
    letters = []
    for char in key:
        options = _SPECIAL.get(char, [char, char.upper()])
        letters.append(draw(st.sampled_from(options)))
    spelt = "".join(letters)
    if draw(st.integers(0, 9)) == 0:
        spelt = unicodedata.normalize("NFKC", spelt).translate(
            {ord(c): ord(c) + 0xFEE0 for c in "abcdefghijklmnopqrstuvwxyz"})  # fullwidth
    return spelt


@st.composite
def objects(draw: st.DrawFn, entries: list[tuple[str, Any]]) -> str:
    """A JSON object from (key, value JSON) entries, keys respelt, some repeated."""
    members = []
    for key, value in entries:
        members.append((draw(spellings(key)), value))
        if draw(st.integers(0, 4)) == 0:  # the same key again, spelt another way
            members.append((draw(spellings(key)), draw(st.sampled_from(
                [value, json.dumps("tools/call"), json.dumps(HIDDEN), "null", "{}"]))))
    order = draw(st.permutations(range(len(members))))
    return "{" + ",".join(f"{json.dumps(members[i][0], ensure_ascii=draw(st.booleans()))}:"
                          f"{members[i][1]}" for i in order) + "}"


@st.composite
def messages(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from([HIDDEN, *VISIBLE]))
    method = draw(st.sampled_from(["tools/call", "tools/list", "Tools/Call"]))
    params = draw(objects([("name", json.dumps(name)), ("arguments", '{"ID":1,"id":2}')]))
    entries = [("jsonrpc", '"2.0"'), ("id", draw(st.sampled_from(["1", '"x"', "null"]))),
               ("method", json.dumps(method)), ("params", params)]
    return draw(objects(entries))


CHARSETS = [None, "utf-8", "UTF-8", '"utf-8"', "utf-7", "utf-16le", "utf-16be", "utf-16",
            "utf-32", "latin1"]


def _utf7(text: str) -> bytes:
    # Python's encoder writes "/" and "_" directly; an attacker spells them in base64.
    return text.encode("utf-7").replace(b"/", b"+AC8-").replace(b"_", b"+AF8-")


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, list[str]]]:
    bodies = draw(st.lists(messages(), min_size=1, max_size=3))
    text = bodies[0] if len(bodies) == 1 and draw(st.booleans()) else "[" + ",".join(
        bodies) + "]"
    charset = draw(st.sampled_from(CHARSETS))
    codec = _IANA.get((charset or "utf-8").strip('"').lower(), "latin-1")
    data = _utf7(text) if codec == "utf-7" else text.encode(codec, "replace")
    if draw(st.integers(0, 9)) == 0:
        data = codecs.BOM_UTF8 + data
    content_type = "application/json" + (f"; charset={charset}" if charset else "")
    headers: dict[str, list[str]] = {"content-type": [content_type]}
    if draw(st.booleans()):
        headers["mcp-method"] = draw(st.lists(st.sampled_from(["tools/call", "tools/list"]),
                                              min_size=1, max_size=2))
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from([HIDDEN, *VISIBLE]), min_size=1, max_size=2))
        if draw(st.booleans()):
            names = ["=?base64?" + base64.b64encode(n.encode()).decode() + "?=" for n in names]
        headers["mcp-name"] = names
    return data, headers


# -- the property ------------------------------------------------------------------------

@pytest.mark.slow  # a large property search
class TestDifferential:
    @settings(max_examples=1500)
    @given(request=requests())
    @example(request=(b'{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":'
                      b'{"name":"delete_repo"}}', {"content-type": ["application/json"]}))
    @example(request=(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                      b'{"name":"list_repos","Name":"delete_repo"}}',
                      {"content-type": ["application/json"]}))
    @example(request=(_utf7('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                            '{"name":"delete_repo"}}'),
                      {"content-type": ["application/json; charset=utf-7"]}))
    @example(request=(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                      b'{"name":"list_repos"}}',
                      {"content-type": ["application/json"], "mcp-method": ["tools/call"],
                       "mcp-name": ["list_repos", "delete_repo"]}))
    def test_no_server_runs_a_tool_the_reader_let_through_hidden(
            self, request: tuple[bytes, dict[str, list[str]]]) -> None:
        """Whatever the reader allows, no model sees a call of the hidden tool in it."""
        data, headers = request
        if hidden_call_allowed(data, headers):
            for model in MODELS:
                assert HIDDEN not in seen_by(model, data, headers), model

    def test_the_models_see_what_the_issue_reported(self) -> None:
        """Each model, shown one of the bodies that once got through, runs the hidden tool."""
        json_only = {"content-type": ["application/json"]}
        cases = {
            "go": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","param\xc5\xbf":'
                  b'{"name":"delete_repo"}}',
            "typescript": _utf7('{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                                '"params":{"name":"delete_repo"}}'),
            "python": b'{"method":"tools/call","params":{"name":"whoami"},'
                      b'"params":{"name":"delete_repo"}}',
        }
        headers = {"typescript": {"content-type": ["application/json; charset=utf-7"]}}
        for model, data in cases.items():
            assert seen_by(model, data, headers.get(model, json_only)) == [HIDDEN], model
            assert not hidden_call_allowed(data, headers.get(model, json_only)), model
        routed = {**json_only, "mcp-method": ["tools/call"], "mcp-name": ["whoami", HIDDEN]}
        assert seen_by("router-last", b'{"method":"tools/call","params":{"name":"whoami"}}',
                       routed) == [HIDDEN]

    def test_go_folding_model(self) -> None:
        """The Go model folds as encoding/json does: case, the long s, Kelvin; not Turkic i."""
        assert go_fold("METHOD") == go_fold("method") == go_fold("Method")
        assert go_fold("param\u017f") == go_fold("params")
        assert go_fold("\u212aey") == go_fold("key")
        assert go_fold("\u0131d") != go_fold("id")  # dotless i folds only to itself in Go
        assert go_fold("\u0130d") != go_fold("id")
