"""Rewriting MCP messages in flight (pure, no I/O): hidden tools renamed, and left out.

- A tools/call of a hidden tool goes to the server under a fresh name that no server has,
  so the server itself answers it as the unknown tool it then is, whatever its SDK or
  language; in the answer, the caller's name is put back.
- A tools/list result loses the tools the caller may not call, and says it may be cached
  for this caller alone (`cacheScope: private`).
- An OAuth protected-resource metadata document names the gateway's URL as its resource.

Every other byte stays as the server or the client wrote it: the rewrites cut and splice
the text at the spans of the values they change, so the order of the other tools,
`nextCursor`, `_meta`, SSE event ids and framing, and the JSON formatting are untouched.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
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


class _Spans:
    """Find where values lie in a JSON text already known to be valid (the reader parsed it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _skip(self, at: int) -> int:
        match = _WHITESPACE.match(self.text, at)
        assert match is not None
        return match.end()

    def _value_end(self, at: int) -> int:
        return int(_DECODER.raw_decode(self.text, at)[1])

    def find(self, path: Path, at: int = 0) -> tuple[int, int] | None:
        """The span [start, end) of the value at `path`, or None if there is none."""
        at = self._skip(at)
        if not path:
            return at, self._value_end(at)
        step, rest = path[0], path[1:]
        opening = self.text[at]
        if opening == "{" and isinstance(step, str):
            for key, start in self._members(at):
                if key == step:
                    return self.find(rest, start)
            return None
        if opening == "[" and isinstance(step, int):
            for index, (start, _) in enumerate(self.elements(at)):
                if index == step:
                    return self.find(rest, start)
        return None

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


def drop_tools(text: str, callable_tool: Callable[[str], bool]) -> str | None:
    """A tools/list answer (one JSON-RPC message or a batch) without the tools the caller may
    not call, and private to it (`cacheScope`); None when the text is no such answer or
    nothing changes.

    Text that is not JSON, or JSON with a key twice, is an UnreadableAnswer. (Empty text,
    as in an SSE event that only primes the stream, is nothing to drop.)
    """
    if not text.strip():
        return None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except UnreadableAnswer:
        raise
    except ValueError:
        raise UnreadableAnswer("a tools/list answer that is not JSON cannot be checked") from None
    messages = document if isinstance(document, list) else [document]
    prefixes: list[list[str | int]] = (
        [[index] for index in range(len(messages))] if isinstance(document, list) else [[]])
    cuts: list[tuple[int, int, str]] = []
    spans = _Spans(text)
    for prefix, message in zip(prefixes, messages, strict=True):
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            continue
        tools = result["tools"]
        if "cacheScope" in result and result["cacheScope"] != "private":
            # The list is this caller's (filtered for it, or one that would be filtered for
            # another): never a shared cache's, whatever the server says (TTL kept).
            scope = spans.find([*prefix, "result", "cacheScope"])
            assert scope is not None
            cuts.append((scope[0], scope[1], '"private"'))
        drop = {index for index, tool in enumerate(tools)
                if isinstance(tool, dict) and isinstance(tool.get("name"), str)
                and not callable_tool(tool["name"])}
        if not drop:
            continue
        found = spans.find([*prefix, "result", "tools"])
        assert found is not None
        elements = spans.elements(found[0])
        if len(drop) == len(elements):  # all of them: `[]`, as a writer puts an empty list
            cuts.append((found[0] + 1, found[1] - 1, ""))
        else:
            cuts.append((elements[0][0], elements[-1][1], _without(text, elements, drop)))
    if not cuts:
        return None
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


def fresh_name() -> str:
    """A tool name that no server has and no one can guess, for one hidden call."""
    return f"hidden-{secrets.token_hex(16)}"


def rename(text: str, renames: dict[Path, str]) -> str:
    """The request text with each string at a path (a call's params.name) replaced."""
    spans = _Spans(text)
    cuts = []
    for path, name in renames.items():
        found = spans.find(path)
        assert found is not None, path
        cuts.append((found[0], found[1], json.dumps(name)))
    for start, end, replacement in sorted(cuts, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def restore(data: bytes, renamed: dict[str, str], *, escape: bool = True) -> bytes:
    """A server's answer with each fresh name replaced by the caller's: JSON-escaped as the
    JSON strings the fresh name appears in need it (`escape`), or as it is (plain text)."""
    for fresh, original in renamed.items():
        name = json.dumps(original, ensure_ascii=False)[1:-1] if escape else original
        data = data.replace(fresh.encode(), name.encode())
    return data


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
    None to leave the event as it was, byte for byte.
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
