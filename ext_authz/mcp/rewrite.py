"""Rewriting MCP messages in flight (pure, no I/O): hidden items renamed, and left out.

- A hidden tool's call (a prompt's get, a resource's read) goes to the server under a fresh
  name (seal.py), so the server itself answers for the unknown item it then is, whatever
  its SDK or language; in any answer, the caller's name is put back.
- A list of tools, prompts, resources or resource templates loses what the caller may not
  see, and says it may be cached for this caller alone (`cacheScope: private`); a hidden
  resource's update notification is dropped.
- An OAuth protected-resource metadata document names the gateway's URL as its resource.

Every other byte stays as the server or the client wrote it: the rewrites cut and splice
the text at the spans of the values they change, so the order of the other items,
`nextCursor`, `_meta`, SSE event ids and framing, and the JSON formatting are untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# Finds where a value ends; objects built as tuples (in C), never looked at.
_DECODER = json.JSONDecoder(object_pairs_hook=tuple)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SPACE = frozenset(" \t\n\r")
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

Path = Sequence[str | int]  # object keys and array indexes, from the document's root


class UnreadableAnswer(ValueError):
    """An answer that must be judged but cannot be read as every client would read it:
    refused, never passed on unread (what this reader cannot read, a more lenient client
    might, hidden tools and all)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Parsers disagree on a duplicate key (first or last wins), and the splice must cut what
    # every client reads.
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise UnreadableAnswer("an answer with a key twice cannot be checked")
    return dict(pairs)


def _parsed(text: str) -> object:
    """The JSON value of a text, each object as the tuple of its (key, value) pairs: built
    in C, with no dict made for what is never looked at (a tool's schema); `_object` makes
    one of those that matter, refusing a key twice there."""
    try:
        return json.loads(text, object_pairs_hook=tuple)
    except ValueError:
        raise UnreadableAnswer("an answer to judge that is not JSON cannot be checked") from None


def _object(value: object) -> dict[str, Any] | None:
    """A parsed JSON object (where a list or a name lives) as a dict; None if it is none."""
    if not isinstance(value, tuple):
        return None
    return _unique_keys(list(value))


class _Spans:
    """Find where values lie in a JSON text already known to be valid (the reader parsed it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _skip(self, at: int) -> int:
        if at < len(self.text) and self.text[at] not in _SPACE:
            return at  # compact JSON, the common case: no regex
        match = _WHITESPACE.match(self.text, at)
        assert match is not None
        return match.end()

    def _value_end(self, at: int) -> int:
        return int(_DECODER.raw_decode(self.text, at)[1])

    def find(self, path: Path) -> tuple[int, int] | None:
        """The span [start, end) of the value at `path`, or None if there is none."""
        start = self.start(path)
        return None if start is None else (start, self._value_end(start))

    def start(self, path: Path, at: int = 0) -> int | None:
        """Where the value at `path` starts (its end not looked for: an array's elements
        give it), or None if there is none."""
        at = self._skip(at)
        if not path:
            return at
        step, rest = path[0], path[1:]
        opening = self.text[at]
        if opening == "{" and isinstance(step, str):
            for key, start in self._members(at):
                if key == step:
                    return self.start(rest, start)
            return None
        if opening == "[" and isinstance(step, int):
            for index, (start, _) in enumerate(self.elements(at)):
                if index == step:
                    return self.start(rest, start)
        return None

    def closing(self, at: int, elements: list[tuple[int, int]]) -> int:
        """Where the `]` of the array at `at`, with these elements, is."""
        return self._skip(elements[-1][1] if elements else at + 1)

    def _members(self, at: int) -> Iterator[tuple[str, int]]:
        """(key, where its value starts) of each member of the object at `at`."""
        at = self._skip(at + 1)
        if self.text[at] == "}":
            return
        while True:
            key, at = _scanstring(self.text, at + 1)
            at = self._skip(self._skip(at) + 1)  # the colon
            yield key, at
            at = self._skip(self._value_end(at))
            if self.text[at] == "}":
                return
            at = self._skip(at + 1)  # the comma

    def elements(self, at: int) -> list[tuple[int, int]]:
        """The span of each element of the array at `at`."""
        spans: list[tuple[int, int]] = []
        at = self._skip(at + 1)
        if self.text[at] == "]":
            return spans
        while True:
            end = self._value_end(at)
            spans.append((at, end))
            at = self._skip(end)
            if self.text[at] == "]":
                return spans
            at = self._skip(at + 1)


def _without(text: str, spans: list[tuple[int, int]], drop: set[int]) -> str:
    """The elements of an array (their spans in `text`) but those at indexes `drop`, joined
    by the separator the writer used ("," or ", " or ",\n  ")."""
    separator = text[spans[0][1]:spans[1][0]] if len(spans) > 1 else ","
    return separator.join(text[a:b] for index, (a, b) in enumerate(spans) if index not in drop)


# What a list result holds (its key), the kind of its items, and where an item's name is.
LISTED = {"tools": ("tool", "name"), "prompts": ("prompt", "name"),
          "resources": ("resource", "uri"), "resourceTemplates": ("resource", "uriTemplate")}
UPDATED = "notifications/resources/updated"  # a resource changed: it names the resource
# Without one of these (or an escape that could spell one), a text has nothing to drop.
_CLUES = ("tools", "prompts", "resource", "\\u")

Visible = Callable[[str, str], bool]  # (kind, name or URI) -> whether the caller sees it


def may_hold_items(text: str) -> bool:
    """Whether `text` may hold a list or a notification that drop_items judges (a cheap
    look before parsing an answer to something else)."""
    return any(clue in text for clue in _CLUES)


def drop_items(text: str, visible: Visible) -> str | None:
    """A server's message (or batch) without what the caller may not see: the tools,
    prompts, resources and resource templates of any list result, each list private to the
    caller (`cacheScope`), and a hidden resource's `notifications/resources/updated` (the
    message dropped: "" when it was the whole text). None when nothing changes, or the text
    is no JSON-RPC message that holds any of them.

    Text that is not JSON, or JSON with a key twice, is an UnreadableAnswer. (Empty text,
    as in an SSE event that only primes the stream, is nothing to drop.)
    """
    if not text.strip():
        return None
    document = _parsed(text)
    batch = isinstance(document, list)
    messages = document if isinstance(document, list) else [document]
    cuts: list[tuple[int, int, str]] = []
    spans = _Spans(text)
    gone: set[int] = set()
    for index, value in enumerate(messages):
        message = _object(value)
        if message is None:
            continue
        prefix: list[str | int] = [index] if batch else []
        if message.get("method") == UPDATED:
            params = _object(message.get("params"))
            uri = params.get("uri") if params is not None else None
            if isinstance(uri, str) and not visible("resource", uri):
                gone.add(index)
            continue
        result = _object(message.get("result"))
        if result is not None:
            cuts += _list_cuts(spans, prefix, result, visible)
    if gone and not batch:
        return ""
    if gone:
        # The lists of the messages kept first, then the messages dropped from the batch.
        messages_at = spans.elements(spans._skip(0))
        dropped = [messages_at[index] for index in gone]
        text = _apply(text, [cut for cut in cuts if not any(
            start <= cut[0] < end for start, end in dropped)])
        spans = _Spans(text)
        opening = spans._skip(0)
        elements = spans.elements(opening)
        if len(gone) == len(elements):
            return text[:opening + 1] + text[spans.closing(opening, elements):]
        return _apply(text, [(elements[0][0], elements[-1][1],
                              _without(text, elements, gone))])
    if not cuts:
        return None
    return _apply(text, cuts)


def _list_cuts(spans: _Spans, prefix: list[str | int], result: dict[str, Any],
               visible: Visible) -> list[tuple[int, int, str]]:
    """The cuts that take what the caller may not see out of a result's lists."""
    cuts: list[tuple[int, int, str]] = []
    listed = False
    for key, (kind, name_key) in LISTED.items():
        items = result.get(key)
        if not isinstance(items, list):
            continue
        listed = True
        drop = set()
        for index, value in enumerate(items):
            item = _object(value)
            name = item.get(name_key) if item is not None else None
            if isinstance(name, str) and not visible(kind, name):
                drop.add(index)
        if not drop:
            continue
        opening = spans.start([*prefix, "result", key])
        assert opening is not None
        elements = spans.elements(opening)
        if len(drop) == len(elements):  # all of them: `[]`, as a writer puts an empty list
            cuts.append((opening + 1, spans.closing(opening, elements), ""))
        else:
            cuts.append((elements[0][0], elements[-1][1], _without(spans.text, elements, drop)))
    if listed and "cacheScope" in result and result["cacheScope"] != "private":
        # The list is this caller's (filtered for it, or one that would be filtered for
        # another): never a shared cache's, whatever the server says (TTL kept).
        scope = spans.find([*prefix, "result", "cacheScope"])
        assert scope is not None
        cuts.append((scope[0], scope[1], '"private"'))
    return cuts


def _apply(text: str, cuts: list[tuple[int, int, str]]) -> str:
    for start, end, replacement in sorted(cuts, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def set_member(text: str, key: str, value: str) -> str | None:
    """A JSON object's text with every top-level `key` set to the string `value`; None when
    the text is no JSON object or has no such member (then it stays as it was)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or key not in document:
        return None
    spans = _Spans(text)
    start = spans._skip(0)
    replacement = json.dumps(value, ensure_ascii=False)
    cuts = [(at, spans._value_end(at)) for name, at in spans._members(start) if name == key]
    for begin, end in reversed(cuts):
        text = text[:begin] + replacement + text[end:]
    return text


def rename(text: str, renames: dict[Path, str | None]) -> str:
    """The request text with each string at a path (a call's params.name) replaced by a new
    name, or (None) by itself: the same work either way, so that a call whose name is kept
    takes the time of one renamed."""
    spans = _Spans(text)
    cuts = []
    for path, name in renames.items():
        found = spans.find(path)
        assert found is not None, path
        cuts.append((found[0], found[1],
                     text[found[0]:found[1]] if name is None else json.dumps(name)))
    return _apply(text, cuts)


# -- server-sent events ------------------------------------------------------------------

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_BOM = b"\xef\xbb\xbf"
# A line of an event: one of these fields (with or without a value), a comment (no name
# before its colon), or empty.
_SSE_FIELDS = frozenset((b"data", b"event", b"id", b"retry", b""))


@dataclass
class EventStream:
    """Rewrite the `data` of complete SSE events as they arrive; pass the rest through.

    `rewrite` gets an event's data (its `data:` lines joined) and returns the new data, or
    None to leave the event as it was, byte for byte. New data "" drops the message: the
    event keeps its id and has empty data, which clients skip as they skip a priming event.
    """

    rewrite: Callable[[str], str | None]
    limit: int  # an event longer than this cannot be checked: UnreadableAnswer
    pending: bytearray = field(default_factory=bytearray)
    started: bool = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes that can go on now."""
        self.pending += chunk
        if not self.started and len(self.pending) >= len(_BOM):
            self._check_start()
        out = bytearray()
        while True:
            match = _EVENT_END.search(self.pending)
            if match is None:
                break
            event = bytes(self.pending[:match.end()])
            del self.pending[:match.end()]
            out += self._event(event)
        if len(self.pending) > self.limit:
            raise UnreadableAnswer(f"an SSE event is over {self.limit} bytes")
        return bytes(out)

    def finish(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line)."""
        if not self.started:
            self._check_start()
        rest, self.pending = bytes(self.pending), bytearray()
        return self._event(rest) if rest else b""

    def _check_start(self) -> None:
        self.started = True
        if self.pending.startswith(_BOM):
            # A client drops it and reads the stream; here it would hide the first event.
            raise UnreadableAnswer("an SSE answer that starts with a byte order mark")

    def _event(self, event: bytes) -> bytes:
        lines = event.splitlines(keepends=True)
        for line in lines:
            field_name = line.rstrip(b"\r\n").partition(b":")[0]
            if field_name not in _SSE_FIELDS:
                # Not SSE (bare JSON, say): a client that reads it anyway would read it
                # unjudged.
                raise UnreadableAnswer("an SSE answer with a line that is no SSE field")
        data = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
        if not data:
            return event
        payload = b"\n".join(_field_value(lines[i]) for i in data)
        # Bytes that are not UTF-8 are kept as they came, and read (and checked) all the same.
        rewritten = self.rewrite(payload.decode("utf-8", "surrogateescape"))
        if rewritten is None:
            return event
        # The new data where the first data line was, a `data:` line for each of its lines
        # (a client joins them with newlines again), with the first's line ending; the old
        # data lines go.
        first = lines[data[0]]
        ending = first[len(first.rstrip(b"\r\n")):]
        lines[data[0]] = b"".join(
            b"data: " + part + ending
            for part in rewritten.encode("utf-8", "surrogateescape").split(b"\n"))
        return b"".join(line for i, line in enumerate(lines) if i not in data[1:])


def _field_value(line: bytes) -> bytes:
    value = line.rstrip(b"\r\n")[len(b"data:"):]
    return value[1:] if value.startswith(b" ") else value
