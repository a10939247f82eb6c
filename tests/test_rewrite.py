"""Rewrites of MCP messages in flight: hidden items left out of lists, hidden uses renamed
(under sealed fresh names that any answer has put back)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ext_authz.mcp.rewrite import (
    EventStream,
    UnreadableAnswer,
    drop_items,
    rename,
    set_member,
)
from ext_authz.mcp.seal import Sealer

HIDDEN = {"add", "delete_repo", "repo://victim/delete", "repo://{owner}/secrets"}
SEALER = Sealer(b"k" * 32)


def visible(kind: str, name: str) -> bool:
    return name not in HIDDEN


def listing(names: list[str], **result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": {
        "tools": [{"name": n, "description": f"the {n} tool", "inputSchema": {
            "type": "object", "properties": {"a": {"type": "integer"}}}} for n in names],
        **result}}


def without(message: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(message))
    copy["result"]["tools"] = [t for t in copy["result"]["tools"] if visible("tool", t["name"])]
    return copy


DUMPS = {  # how SDKs write JSON: compact (pydantic, JSON.stringify, Go), spaced, indented
    "compact": lambda v: json.dumps(v, separators=(",", ":")),
    "spaced": json.dumps,
    "indented": lambda v: json.dumps(v, indent=2),
}


class TestDropItems:
    @pytest.mark.parametrize("style", DUMPS)
    @pytest.mark.parametrize(
        "names",
        [["whoami", "add", "search"], ["add", "whoami"], ["whoami", "add"], ["add"],
         ["add", "delete_repo"], ["whoami", "add", "delete_repo", "search"]],
    )
    def test_as_the_server_without_them_would_write_it(self, style: str,
                                                       names: list[str]) -> None:
        """Byte for byte the server's own answer had it not had the hidden tools."""
        dumps = DUMPS[style]
        message = listing(names, nextCursor="abc", _meta={"x": [1, 2]})
        assert drop_items(dumps(message), visible) == dumps(without(message))

    def test_a_batch_of_answers(self) -> None:
        """Each tools/list answer of a batch is filtered; the other answers stay."""
        batch = [listing(["add", "whoami"]), {"jsonrpc": "2.0", "id": 2, "result": {}},
                 listing(["search", "delete_repo"])]
        filtered = drop_items(json.dumps(batch), visible)
        assert filtered == json.dumps([without(batch[0]), batch[1], without(batch[2])])

    @pytest.mark.parametrize(
        "text",
        [json.dumps(listing(["whoami"])), json.dumps({"jsonrpc": "2.0", "id": 1,
                                                       "error": {"code": -1}}),
         "", " \r\n", json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": "x"}}),
         json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [
             {"name": "add"}]}})],
    )
    def test_nothing_to_drop_is_none(self, text: str) -> None:
        """No tools/list result with a hidden tool in it: left as it is."""
        assert drop_items(text, visible) is None

    @pytest.mark.parametrize("text", ["not json", '{"result": {"tools": [{"name": "add"}', "NaN]"])
    def test_what_cannot_be_read_is_an_error(self, text: str) -> None:
        """Never passed on unread: a more lenient client might read hidden tools in it."""
        with pytest.raises(ValueError, match="not JSON"):
            drop_items(text, visible)

    @given(names=st.lists(st.sampled_from(["add", "delete_repo", "whoami", "search", "é\"x"]),
                          max_size=6),
           style=st.sampled_from(list(DUMPS)), ascii_only=st.booleans())
    def test_property(self, names: list[str], style: str, ascii_only: bool) -> None:
        """Whatever the tools and the writer's style, the result is the server's own."""
        message = listing(names, nextCursor="n")

        def dumps(value: Any) -> str:
            if style == "indented":
                return json.dumps(value, indent=2, ensure_ascii=ascii_only)
            separators = (",", ":") if style == "compact" else (", ", ": ")
            return json.dumps(value, separators=separators, ensure_ascii=ascii_only)

        expected = dumps(without(message))
        filtered = drop_items(dumps(message), visible)
        assert (filtered if filtered is not None else dumps(message)) == expected


class TestRenames:
    def test_rename_then_restore(self) -> None:
        """The call goes out under the fresh name; any answer names the caller's tool."""
        name = 'r\u00e9sum\u00e9 "x"'
        fresh = SEALER.fresh("tool", name)
        body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add",' \
               '"arguments":{"name":"add"}}}'
        sent = rename(body, {("params", "name"): fresh})
        assert json.loads(sent)["params"] == {"name": fresh, "arguments": {"name": "add"}}
        assert sent.replace(fresh, "add") == body
        answer = f'{{"result":{{"content":[{{"text":"Unknown tool: {fresh}"}}]}}}}'.encode()
        assert SEALER.restore(answer) == (
            '{"result":{"content":[{"text":"Unknown tool: r\u00e9sum\u00e9 \\"x\\""}]}}'
            .encode())
        assert SEALER.restore(f"no tool {fresh}".encode(), escape=False) == (
            f"no tool {name}".encode())

    def test_each_call_of_a_batch_gets_its_own_name(self) -> None:
        """Two hidden calls, two fresh names, in place; the visible call untouched."""
        batch = json.dumps([
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami"}},
            {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "drop"}}])
        first, second = SEALER.fresh("tool", "add"), SEALER.fresh("tool", "drop")
        assert first != second
        sent = json.loads(rename(batch, {(0, "params", "name"): first,
                                         (2, "params", "name"): second}))
        assert [m["params"]["name"] for m in sent] == [first, "whoami", second]

    def test_escaped_names_are_replaced_whole(self) -> None:
        """A name spelt with escapes is one value: replaced from quote to quote."""
        fresh = SEALER.fresh("tool", "add")
        body = r'{"method":"tools/call","params":{"name":"\u0061dd"}}'
        assert json.loads(rename(body, {("params", "name"): fresh}))["params"]["name"] == fresh

    @pytest.mark.parametrize("text", [
        '{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"result":{"tools":[{"name":"add"}]}}',
        '{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add","name":"whoami"}]}}',
        '{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add"}]',
        '\ufeff{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add"}]}}',
    ], ids=["result-twice", "name-twice", "cut-short", "bom"])
    def test_what_every_client_may_read_differently_is_unreadable(self, text: str) -> None:
        """A key twice (first or last wins, as the parser goes), JSON cut short, a byte
        order mark: never judged one way and read another."""
        with pytest.raises(UnreadableAnswer):
            drop_items(text, visible)

    @pytest.mark.parametrize("names", [["whoami", "add"], ["whoami"]])
    def test_a_list_is_never_cached_for_others(self, names: list[str]) -> None:
        """Filtered or not (it would be for another caller), a list goes out private to its
        caller: a shared cache must not hand it to anyone else. The TTL stays."""
        message = listing(names, cacheScope="public", ttlMs=600000)
        out = json.loads(drop_items(DUMPS["compact"](message), visible) or "")
        assert out == {**without(message), "result": {
            **without(message)["result"], "cacheScope": "private"}}
        already = DUMPS["compact"](listing(["whoami"], cacheScope="private", ttlMs=5))
        assert drop_items(already, visible) is None

    def test_every_result_of_a_batch_is_filtered(self) -> None:
        """A batch's later tools/list results lose their hidden tools even when an earlier
        one drops nothing."""
        batch = [listing(["whoami"]), {"jsonrpc": "2.0", "id": 2, "result": {}},
                 listing(["search", "delete_repo"])]
        dumps = DUMPS["compact"]
        assert drop_items(dumps(batch), visible) == dumps(
            [listing(["whoami"]), batch[1], without(listing(["search", "delete_repo"]))])


def sse(*events: tuple[str | None, dict[str, Any]], ending: str = "\r\n") -> bytes:
    out = ""
    for event_id, data in events:
        out += "event: message" + ending
        if event_id is not None:
            out += f"id: {event_id}{ending}"
        out += f"data: {json.dumps(data, separators=(',', ':'))}{ending}{ending}"
    return out.encode()


def filtered(data: str) -> str | None:
    return drop_items(data, visible)


class TestEventStream:
    @pytest.mark.parametrize("ending", ["\r\n", "\n"])
    def test_events_rewritten_ids_and_framing_kept(self, ending: str) -> None:
        """The answer's data loses the hidden tools; ids, other events, line endings stay."""
        notification = {"jsonrpc": "2.0", "method": "notifications/message",
                        "params": {"text": "add"}}
        stream = sse(("1", notification), ("2", listing(["add", "whoami"])), ending=ending)
        expected = sse(("1", notification), ("2", without(listing(["add", "whoami"]))),
                       ending=ending)
        events = EventStream(filtered, limit=1 << 20)
        assert events.feed(stream) + events.finish() == expected

    @given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
    def test_any_chunking_gives_the_same_bytes(self, cuts: list[int]) -> None:
        """However the stream is cut into chunks, what comes out is the same."""
        stream = sse((None, listing(["add", "whoami", "search"])),
                     ("7", listing(["delete_repo"])))
        events = EventStream(filtered, limit=1 << 20)
        out = b""
        previous = 0
        for cut in sorted({min(c, len(stream)) for c in cuts}):
            out += events.feed(stream[previous:cut])
            previous = cut
        out += events.feed(stream[previous:]) + events.finish()
        assert out == sse((None, without(listing(["add", "whoami", "search"]))),
                          ("7", without(listing(["delete_repo"]))))

    @pytest.mark.parametrize("ending", ["\r\n", "\n"])
    def test_json_over_several_data_lines_stays_readable(self, ending: str) -> None:
        """An event whose JSON spans several `data:` lines (legal SSE: a client joins them
        with newlines) comes out as data lines a client joins into the filtered JSON, and
        none of the original lines is left behind."""
        text = json.dumps(listing(["whoami", "add", "search"]), indent=1)
        event = "".join(f"data: {line}{ending}" for line in text.split("\n")) + ending
        events = EventStream(filtered, limit=1 << 20)
        out = (events.feed(event.encode()) + events.finish()).decode()
        lines = re.split(r"\r\n|\r|\n", out)  # as an SSE client reads lines
        assert lines[-2:] == ["", ""]  # the event ends with its blank line
        assert all(line.startswith("data: ") for line in lines[:-2])
        data = "\n".join(line[len("data: "):] for line in lines[:-2])
        assert json.loads(data) == without(listing(["whoami", "add", "search"]))
        assert "add" not in out.replace('"jsonrpc"', "")

    @pytest.mark.parametrize("stream", [
        b"\xef\xbb\xbfdata: {}\n\n",  # a byte order mark, which a client drops
        b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}\n\n',  # bare JSON
        b"data: {}\nnonsense\n\n",  # a line that is no field
    ], ids=["bom", "bare-json", "no-field"])
    def test_what_is_not_sse_is_unreadable(self, stream: bytes) -> None:
        """Not SSE as every client reads it: an UnreadableAnswer, never passed unread."""
        events = EventStream(filtered, limit=1 << 20)

        def read() -> bytes:
            return events.feed(stream) + events.finish()

        with pytest.raises(UnreadableAnswer):
            read()

    def test_comments_and_every_field_are_sse(self) -> None:
        """Comments, event, id, retry and data (with or without a value) are all SSE."""
        stream = b": keep-alive\nevent: message\nid: 3\nretry: 10\ndata\ndata: {}\n\n"
        events = EventStream(filtered, limit=1 << 20)
        assert events.feed(stream) + events.finish() == stream

    def test_an_event_past_the_limit_is_an_error(self) -> None:
        """An event longer than the limit cannot be checked: an error, never passed unread."""
        events = EventStream(filtered, limit=10)
        with pytest.raises(ValueError, match="over 10 bytes"):
            events.feed(b"data: " + b"x" * 50)


class TestSetMember:
    @pytest.mark.parametrize(("text", "expected"), [
        ('{"resource":"http://up/x","a":1}', '{"resource":"https://gw/x","a":1}'),
        ('{ "a": {"resource": "keep"},\n  "resource" : "http://up/x" }',
         '{ "a": {"resource": "keep"},\n  "resource" : "https://gw/x" }'),
        # Every copy of a duplicated key: parsers keep the first or the last.
        ('{"resource":"a","resource":"b"}', '{"resource":"https://gw/x","resource":"https://gw/x"}'),
    ])
    def test_top_level_member_replaced_in_place(self, text: str, expected: str) -> None:
        assert set_member(text, "resource", "https://gw/x") == expected

    @pytest.mark.parametrize("text", ['{"a":1}', "[1]", "not json", '"resource"'])
    def test_nothing_to_set_is_none(self, text: str) -> None:
        assert set_member(text, "resource", "https://gw/x") is None

    def test_the_value_is_json_escaped(self) -> None:
        assert set_member('{"resource":"x"}', "resource", 'a"b') == '{"resource":"a\\"b"}'


def answer(result: dict[str, Any], rpc_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


UPDATED = "notifications/resources/updated"


class TestEveryKindOfList:
    @pytest.mark.parametrize(("key", "field", "shown", "hidden"), [
        ("prompts", "name", "summarize", "delete_repo"),
        ("resources", "uri", "repo://docs/readme", "repo://victim/delete"),
        ("resourceTemplates", "uriTemplate", "repo://{owner}/readme", "repo://{owner}/secrets"),
    ])
    @pytest.mark.parametrize("style", DUMPS)
    def test_each_list_loses_what_the_caller_may_not_see(
            self, key: str, field: str, shown: str, hidden: str, style: str) -> None:
        """prompts/list, resources/list and resources/templates/list, as tools/list: the
        server's own answer had it not had the hidden items, and private to the caller."""
        dumps = DUMPS[style]
        items = [{field: hidden, "description": "secret"}, {field: shown, "title": "t"}]
        message = answer({key: items, "nextCursor": "c", "cacheScope": "public", "ttlMs": 9})
        expected = answer({key: items[1:], "nextCursor": "c", "cacheScope": "private",
                           "ttlMs": 9})
        assert drop_items(dumps(message), visible) == dumps(expected)

    def test_kinds_are_judged_by_their_own_rules(self) -> None:
        """A prompt and a tool of one name are judged each as what it is."""
        seen: list[tuple[str, str]] = []

        def record(kind: str, name: str) -> bool:
            seen.append((kind, name))
            return True

        drop_items(json.dumps([answer({"tools": [{"name": "a"}]}),
                               answer({"prompts": [{"name": "a"}]}, 2),
                               answer({"resources": [{"uri": "x:a"}]}, 3),
                               answer({"resourceTemplates": [{"uriTemplate": "x:{a}"}]}, 4)]),
                   record)
        assert seen == [("tool", "a"), ("prompt", "a"), ("resource", "x:a"),
                        ("resource", "x:{a}")]


class TestUpdates:
    def notification(self, uri: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": UPDATED, "params": {"uri": uri}}

    def test_a_hidden_resources_update_is_dropped(self) -> None:
        assert drop_items(json.dumps(self.notification("repo://victim/delete")), visible) == ""
        assert drop_items(json.dumps(self.notification("repo://docs/readme")), visible) is None

    @pytest.mark.parametrize("style", DUMPS)
    def test_in_a_batch_only_the_hidden_update_goes(self, style: str) -> None:
        dumps = DUMPS[style]
        batch = [self.notification("repo://victim/delete"),
                 answer({"prompts": [{"name": "add"}, {"name": "p"}]}),
                 self.notification("repo://docs/readme")]
        assert drop_items(dumps(batch), visible) == dumps(
            [answer({"prompts": [{"name": "p"}]}), batch[2]])
        assert drop_items(dumps([batch[0], batch[0]]), visible) == "[]"

    @pytest.mark.parametrize("ending", ["\n", "\r\n"])
    def test_a_dropped_event_keeps_its_id_and_has_no_data(self, ending: str) -> None:
        """Clients skip an event with empty data as they skip a priming event; its id still
        counts for a resumption."""
        stream = sse(("7", self.notification("repo://victim/delete")),
                     ("8", self.notification("repo://docs/readme")), ending=ending)
        events = EventStream(lambda data: drop_items(data, visible), 1 << 20)
        out = events.feed(stream) + events.finish()
        first, second = out.split((ending * 2).encode())[:2]
        assert first == f"event: message{ending}id: 7{ending}data: ".encode()
        assert json.loads(second.split(b"data: ")[1]) == self.notification("repo://docs/readme")


class TestSealedNames:
    @given(name=st.text(min_size=1, max_size=200),
           kind=st.sampled_from(["tool", "prompt", "resource"]))
    def test_any_name_comes_back(self, name: str, kind: str) -> None:
        """Whatever the name, its fresh name is one no JSON writer escapes, and it comes
        back as the caller's, JSON-escaped or plain."""
        fresh = SEALER.fresh(kind, name)
        assert re.fullmatch(r"(urn:)?hidden-[0-9a-f]+-[0-9a-f]{24}", fresh)
        assert fresh.startswith("urn:") == (kind == "resource")
        inside = json.dumps({"message": f"Unknown: {fresh}."})
        assert json.loads(SEALER.restore(inside.encode()))["message"] == f"Unknown: {name}."
        assert SEALER.restore(f"<{fresh}>".encode("utf-8", "surrogatepass"),
                              escape=False) == f"<{name}>".encode("utf-8", "surrogatepass")

    def test_only_our_own_names_are_opened(self) -> None:
        """A caller cannot forge a fresh name, nor bring one sealed under another key."""
        fresh = SEALER.fresh("tool", "delete_repo")
        forged = fresh[:-1] + ("0" if fresh[-1] != "0" else "1")
        other = Sealer(b"o" * 32).fresh("tool", "delete_repo")
        for text in (forged, other, "hidden--" + "0" * 24, "hidden-6-" + "0" * 24):
            assert SEALER.restore(text.encode()) == text.encode()

    def test_a_resources_uri_is_put_back_whole(self) -> None:
        fresh = SEALER.fresh("resource", "repo://victim/delete")
        assert SEALER.restore(f'"Unknown resource: {fresh}"'.encode()) == (
            b'"Unknown resource: repo://victim/delete"')
        # Echoed without its scheme, it is still put back.
        assert SEALER.restore(fresh.removeprefix("urn:").encode()) == b"repo://victim/delete"

    def test_a_short_key_is_refused(self) -> None:
        with pytest.raises(ValueError, match="16 bytes"):
            Sealer(b"short")
