"""Which tools, prompts and resources an MCP request uses, read from its JSON-RPC body.

Pure, no I/O. Every body sent to a server with tool rules is parsed, and judged as the
strictest and the most lenient MCP server behind us would read it. Where two of them could
read it differently, it is refused with a 400 that says why (in words of ours: nothing a
client sent is echoed into answers or logs); nothing unread is let through. The readers we
defend against, and what each would otherwise have read differently:

- Go's encoding/json (mark3labs/mcp-go; the official go-sdk before CVE-2026-27896) matches
  keys to fields case-insensitively under Unicode simple case folding (the long s is `s`, the
  Kelvin sign is `k`), and the last matching key wins. So in a message and in its params,
  a key that is a routing key in another case or form is refused, and so are two keys that
  fold to one name.
- The TypeScript SDK behind `express.json()` (or its raw-body path) decodes the bytes in
  whatever charset Content-Type names: utf-7, utf-16, utf-32. So only `application/json`,
  UTF-8, no BOM, is read at all.
- A server, or a router in front of it, may go by MCP's `Mcp-Method` and `Mcp-Name` headers
  rather than the body: they must name what the body names, once (headers.py).
- Parsers differ on duplicate keys, lone surrogates, NaN, huge numbers and odd ids: refused.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .headers import header_problem

TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"
PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS = -32700, -32600, -32602
# From this protocol version on, results say `resultType` and carry the server's identity.
STATELESS_PROTOCOL = "2026-07-28"
_PROTOCOL_KEY = "io.modelcontextprotocol/protocolVersion"

UnknownToolReply = Literal["tool_error", "jsonrpc_error"]  # the answers the sidecar writes
UnknownToolAnswer = Literal["server", "tool_error", "jsonrpc_error"]  # who answers
Received = Literal[
    "whole",    # the sidecar holds the whole body (or there is none)
    "missing",  # the request has a body that did not reach the sidecar
    "partial",  # Envoy sent only its start (allow_partial_message)
    "text",     # Envoy sent it as text, bytes that are not UTF-8 replaced (no pack_as_bytes)
]

# The keys an MCP server reads from a message's envelope, its params and a completion's ref.
ROUTING_KEYS = frozenset(("jsonrpc", "id", "method", "params", "name", "arguments", "_meta",
                          "uri", "ref", "type", "notifications", "resourceSubscriptions"))
# The methods that use one item, its kind, and where its name (or URI) is in params.
ITEM_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    TOOLS_CALL: ("tool", ("name",)),
    "prompts/get": ("prompt", ("name",)),
    "resources/read": ("resource", ("uri",)),
    "resources/subscribe": ("resource", ("uri",)),
    "resources/unsubscribe": ("resource", ("uri",)),
}
COMPLETE = "completion/complete"
# MCP 2026-07-28's notification stream: the resources whose updates it asks for.
LISTEN = "subscriptions/listen"
_SUBSCRIPTIONS = "resourceSubscriptions"
# A completion's reference: the prompt or the resource (template) it completes an argument of.
COMPLETION_REFS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ref/prompt": ("prompt", ("ref", "name")), "ref/resource": ("resource", ("ref", "uri"))}
# The methods whose answer is a list of items, filtered for the caller.
LIST_METHODS = frozenset((TOOLS_LIST, "prompts/list", "resources/list",
                          "resources/templates/list"))

# The JSON media type, UTF-8 (said or not), and nothing else: any other charset is one a
# server might decode the bytes in, into a message we never saw.
_JSON_MEDIA_TYPE = re.compile(
    r'[ \t]*application/json[ \t]*(?:;[ \t]*charset[ \t]*=[ \t]*(?:utf-8|"utf-8")[ \t]*)?',
    re.IGNORECASE)
_MAX_SAFE_INTEGER = 2**53 - 1  # the largest id every parser (JavaScript's doubles) keeps exact
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,15})")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Body:
    """A request's body as the sidecar received it, and the headers that say how to read it."""

    data: bytes = b""
    method: str = ""  # the HTTP method
    received: Received = "whole"
    content_type: str | None = None
    content_encoding: str = ""
    # Every value of MCP's routing headers as received. Envoy joins a repeated header with
    # "," in ext_authz's header map, so a comma counts as a repeat too.
    mcp_method: tuple[str, ...] = ()
    mcp_name: tuple[str, ...] = ()
    protocol_version: str | None = None  # MCP's Mcp-Protocol-Version header


NO_BODY = Body()

_BODY_HEADERS = frozenset(("content-type", "content-encoding", "content-length",
                           "mcp-method", "mcp-name", "mcp-protocol-version"))


def body_headers(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Collect the headers that say how to read a body, by lower-case name, every value kept."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        key = name.lower()
        if key in _BODY_HEADERS:
            found.setdefault(key, []).append(value)
    return found


def request_body(data: bytes, method: str, headers: dict[str, list[str]],
                 received: Received = "whole") -> Body:
    """Describe a request body from its bytes and its headers (as `body_headers` collects them)."""
    content_type, encoding, version, method_values, names = map(headers.get, (
        "content-type", "content-encoding", "mcp-protocol-version", "mcp-method", "mcp-name"))
    return Body(
        data, method, received,
        content_type=",".join(content_type) if content_type else None,
        content_encoding=",".join(encoding) if encoding else "",
        mcp_method=tuple(method_values) if method_values else (),
        mcp_name=tuple(names) if names else (),
        protocol_version=",".join(version) if version else None,
    )


@dataclass(frozen=True, slots=True)
class ItemUse:
    """One use of a tool, prompt or resource: its name (a resource's URI, a completion's
    template) and the request id as JSON text (None: a notification)."""

    name: str
    rpc_id: str | None
    protocol_version: str = ""  # the MCP protocol version of the request, if said
    index: int | None = None  # its place in a batch (None: the body is this one message)
    kind: str = "tool"  # "tool", "prompt" or "resource"
    at: tuple[str | int, ...] = ("params", "name")  # where the name is in the message
    method: str = TOOLS_CALL


@dataclass(frozen=True, slots=True)
class ItemUses:
    """The items a request uses; or, when `problem` is set, why the body cannot be judged."""

    uses: tuple[ItemUse, ...] = ()
    batch: bool = False
    lists: bool = False  # a message of the body lists tools, prompts, resources or templates
    problem: str = ""
    error_code: int = 0  # the JSON-RPC error code that goes with `problem`
    too_large: bool = False  # the problem is the body's size (an HTTP 413, not a 400)


NO_USES = ItemUses()


def _refuse(code: int, problem: str) -> ItemUses:
    return ItemUses(problem=problem, error_code=code)


def _too_large(max_bytes: int) -> ItemUses:
    """The refusal of a body over the limit (said without reading any more of it)."""
    return ItemUses(problem=f"the body is over the {max_bytes} bytes of mcp.max_body_bytes",
                     error_code=INVALID_REQUEST, too_large=True)


class _DuplicateKey(ValueError):
    pass


class _Number:
    """A JSON number kept as its text: no number is too big to read, and ids echo exactly."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _unique_keys(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins: refuse rather than pick one.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Characters that some parser folds onto an ASCII letter beyond plain case: Go's simple case
# folding takes the long s to s and the Kelvin sign to k; Turkic-aware ones take the dotless
# and the dotted i to i.
_TO_ASCII = str.maketrans({"\u017f": "s", "\u212a": "k", "\u0131": "i", "\u0130": "i"})


def fold_key(key: str) -> str:
    """Spell a key as the most lenient parser could match it: case- and compatibility-folded.

    Wider than Go's folding (anything Go takes for one name folds to one string here too),
    so refusing what folds alike refuses everything Go could confuse.
    """
    if key.isascii():
        return key.lower()
    return unicodedata.normalize("NFKC", key.translate(_TO_ASCII)).casefold()


_ROUTING_BY_FOLD = {fold_key(key): key for key in ROUTING_KEYS}


def _key_problem(keys: dict[str, Any], where: str) -> str:
    if ROUTING_KEYS.issuperset(keys):
        return ""  # the common case: exact routing keys, which fold apart
    seen: set[str] = set()
    for key in keys:
        folded = fold_key(key)
        if folded in seen:
            return f"two keys of {where} are one name in different case"
        seen.add(folded)
        routing = _ROUTING_BY_FOLD.get(folded)
        if routing is not None and key != routing:
            return (f"a key of {where} spells {routing!r} in another case or form (some"
                    f" servers read it as {routing!r}, others ignore it)")
    return ""


def _lone_surrogate(text: str) -> bool:
    # Go reads a lone surrogate escape as U+FFFD, JavaScript keeps it, Python's SDK refuses
    # it. Only escapes can spell one: strict UTF-8 decoding already refused encoded ones.
    high_ends_at = -1
    for match in _ESCAPE.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else -1
        if high_ends_at >= 0:
            if match.start() != high_ends_at or not 0xDC00 <= code <= 0xDFFF:
                return True
            high_ends_at = -1
        elif 0xD800 <= code <= 0xDBFF:
            high_ends_at = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return True
    return high_ends_at >= 0


def _rpc_id(message: dict[str, Any]) -> tuple[str | None, bool]:
    """The id of a tools/call as JSON text (None: a notification), and whether it is usable."""
    if "id" not in message:
        return None, True
    value = message["id"]
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False), True
    # Python's SDK takes only integers, JavaScript only what a double holds: between them,
    # an integer of at most 2**53 - 1. null, fractions and the rest are read as a request by
    # some servers and as a notification or an error by others.
    if isinstance(value, _Number) and _INTEGER.fullmatch(value.text):
        number = int(value.text)
        if abs(number) <= _MAX_SAFE_INTEGER:
            return str(number), True
    return None, False


def _protocol(params: dict[str, Any], body: Body) -> str:
    meta = params.get("_meta")
    version = meta.get(_PROTOCOL_KEY) if isinstance(meta, dict) else None
    return version if isinstance(version, str) else (body.protocol_version or "")


_NOT_RECEIVED = {
    "missing": "the request body did not reach the sidecar; tool rules need it on this route"
               " (with_request_body, or envoy-config's ext_proc filter)",
    "partial": "only part of the body reached the sidecar; tool rules need all of it"
               " (allow_partial_message: false)",
    "text": "the body reached the sidecar as text, not bytes; tool rules need the exact bytes"
            " (pack_as_bytes: true)",
}


def _envelope_problem(body: Body) -> tuple[int, str]:
    """Why the bytes cannot be read as one UTF-8 JSON text by every server, if they cannot."""
    problem = _NOT_RECEIVED.get(body.received)
    if problem:
        return INVALID_REQUEST, problem
    if body.content_encoding and body.content_encoding.lower() != "identity":
        return INVALID_REQUEST, "a compressed body (Content-Encoding) cannot be checked"
    if body.content_type is None or not _JSON_MEDIA_TYPE.fullmatch(body.content_type):
        return INVALID_REQUEST, ("the Content-Type must be application/json, in UTF-8 (no"
                                 " other charset, no other parameter)")
    if body.data.startswith(b"\xef\xbb\xbf"):
        return PARSE_ERROR, "the body starts with a byte order mark"
    return 0, ""


def read_item_uses(body: Body, max_bytes: int, max_batch: int) -> ItemUses:
    """Read what a request to a server with item rules uses (tools/call, prompts/get,
    resources/read and (un)subscribe, completion/complete), and whether it lists items."""
    data = body.data
    if not data and body.received == "whole" and body.method != "POST":
        return NO_USES  # a GET (the SSE stream) or a DELETE (ending a session)
    if len(data) > max_bytes:
        return _too_large(max_bytes)
    code, problem = _envelope_problem(body)
    if problem:
        return _refuse(code, problem)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _refuse(PARSE_ERROR, "the body is not UTF-8")
    if not text or text.isspace():
        return _refuse(PARSE_ERROR, "the body is empty; an MCP POST carries a JSON-RPC message")
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                              parse_int=_Number, parse_float=_Number)
    except _DuplicateKey:
        return _refuse(INVALID_REQUEST, "an object in the body has a key twice")
    except RecursionError:
        return _refuse(PARSE_ERROR, "the body is nested too deeply")
    except ValueError:
        return _refuse(PARSE_ERROR, "the body is not JSON")
    if "\\u" in text and _lone_surrogate(text):
        return _refuse(PARSE_ERROR, "the body escapes a lone UTF-16 surrogate")
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
    batch = isinstance(document, list)
    uses = []
    lists = False
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return _refuse(INVALID_REQUEST, "a batch holds something other than messages")
        params = message.get("params")
        problem = _key_problem(message, "the message") or (
            _key_problem(params, "params") if isinstance(params, dict) else "")
        if problem:
            return _refuse(INVALID_REQUEST, problem)
        method = message.get("method")
        lists = lists or method in LIST_METHODS
        if not isinstance(method, str) or (method not in ITEM_METHODS and method not in (
                COMPLETE, LISTEN)):
            continue
        used = _uses(message, method, params, body, index if batch else None)
        if isinstance(used, ItemUses):
            return used
        uses += used
    problem = header_problem(body.mcp_method, body.mcp_name, messages, batch)
    if problem:
        return _refuse(INVALID_REQUEST, problem)
    if not uses and not lists:
        return NO_USES
    return ItemUses(tuple(uses), batch, lists)


def _uses(message: dict[str, Any], method: str, params: Any, body: Body,
          index: int | None) -> list[ItemUse] | ItemUses:
    """The items a message uses, or the refusal of a message no two servers read alike."""
    if message.get("jsonrpc") != "2.0":
        # A strict server refuses it, echoing the message back (the Python SDK, cut short:
        # a hidden item's fresh name would show half put back); a lenient one runs it.
        # Neither is sure: refused here, for every item alike.
        return _refuse(INVALID_REQUEST, f'a {method} must say "jsonrpc": "2.0"')
    rpc_id, usable = _rpc_id(message)
    if not usable:
        return _refuse(INVALID_REQUEST, f"the id of a {method} must be a string or an"
                                        f" integer of at most {_MAX_SAFE_INTEGER}")
    if not isinstance(params, dict):
        where = {COMPLETE: "ref", LISTEN: "notifications"}.get(method) or ".".join(
            ITEM_METHODS[method][1])
        return _refuse(INVALID_PARAMS, f"a {method} has no params.{where}")
    protocol = _protocol(params, body)
    if method == LISTEN:
        return _listened(params, rpc_id, protocol, index)
    if method == COMPLETE:
        ref = params.get("ref")
        problem = _key_problem(ref, "params.ref") if isinstance(ref, dict) else ""
        if problem:
            return _refuse(INVALID_REQUEST, problem)
        found = COMPLETION_REFS.get(str(ref.get("type"))) if isinstance(ref, dict) else None
        if found is None:
            return _refuse(INVALID_PARAMS, "a completion/complete's params.ref is no"
                                           " ref/prompt or ref/resource")
        kind, at = found
        holder: Any = ref
    else:
        kind, at = ITEM_METHODS[method]
        holder = params
    name = holder.get(at[-1])
    if not isinstance(name, str) or not name:
        return _refuse(INVALID_PARAMS, f"a {method} has no params.{'.'.join(at)}")
    return [ItemUse(name, rpc_id, protocol, index, kind, ("params", *at), method)]


def _listened(params: dict[str, Any], rpc_id: str | None, protocol: str,
              index: int | None) -> list[ItemUse] | ItemUses:
    """The resources a subscriptions/listen asks to hear of (MCP 2026-07-28)."""
    wanted = params.get("notifications")
    if not isinstance(wanted, dict):
        return _refuse(INVALID_PARAMS, f"a {LISTEN} has no params.notifications")
    problem = _key_problem(wanted, "params.notifications")
    if problem:
        return _refuse(INVALID_REQUEST, problem)
    uris = wanted.get(_SUBSCRIPTIONS, [])
    if not isinstance(uris, list) or not all(isinstance(uri, str) and uri for uri in uris):
        return _refuse(INVALID_PARAMS, f"a {LISTEN}'s params.notifications.{_SUBSCRIPTIONS}"
                                       " is no list of URIs")
    return [ItemUse(uri, rpc_id, protocol, index, "resource",
                    ("params", "notifications", _SUBSCRIPTIONS, position), LISTEN)
            for position, uri in enumerate(uris)]
