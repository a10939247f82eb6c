"""Hiding on every stream: a stateful SDK server with an event store, through a real Envoy.

The demo's MCP server (official Python SDK) with sessions and an event store, so that its
SSE streams can be resumed: a GET with `Last-Event-ID` replays what came after that event,
as the SDK client asks when a POST stream drops. Rules hide from an outsider every tool but
`whoami`, every prompt but `summarize` and every resource but `repo://docs/...`. Whatever
exchange carries an answer (the POST that asked, a replay on the GET stream, another
request's exchange when two requests share an id), the outsider receives no byte of a
hidden item's name, description or schema, and no fresh name. In both data paths.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.harness import Process, free_port, start_gateway, start_upstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

INTERNAL, EXTERNAL = "127.0.0.1", "127.0.0.2"
VERSION = "2025-11-25"  # streams open with a priming event: resumable
HIDDEN = {"available_on_public_internet": False}
RULES = {
    "tools": {"*": HIDDEN, "whoami": {}},
    "prompts": {"*": HIDDEN, "summarize": {}},
    "resources": {"repo://docs/{name}": {}, "*": HIDDEN},
}
VISIBLE = {"tools": {"whoami"}, "prompts": {"summarize"}, "resources": {"repo://docs/readme"},
           "resourceTemplates": set()}
# What the hidden items say of themselves: none of it may reach an outsider (their names
# come back only where the outsider wrote them itself, as in "Unknown tool: add").
SECRETS = ("Add two numbers", "Answer after this many seconds", "waitArguments",
           "addArguments", "internal runbook", "Call delete_repo", "An owner's secrets",
           "repo://{owner}/secrets", "deleted")
FRESH = re.compile(r"hidden-[0-9a-f]*-[0-9a-f]{24}")


@dataclass
class Event:
    id: str
    data: str


def events(text: str) -> list[Event]:
    """The events of an SSE text, as a client reads them."""
    found = []
    for block in re.split(r"\r\n\r\n|\n\n", text):
        lines = re.split(r"\r\n|\n", block)
        event_id = next((line[4:] for line in lines if line.startswith("id: ")), "")
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        if event_id or data:
            found.append(Event(event_id, data))
    return found


@dataclass
class Session:
    base: str
    source: str
    id: str = ""
    received: list[str] = field(default_factory=list)  # every text this caller got
    primings: list[str] = field(default_factory=list)  # the priming event of each stream

    def headers(self, **more: str) -> dict[str, str]:
        sent = {"content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": VERSION, **more}
        if self.id:
            sent["mcp-session-id"] = self.id
        return sent

    def client(self, read: float = 15) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(local_address=self.source),
                            timeout=httpx.Timeout(15, read=read))

    def post(self, message: dict[str, Any], read: float = 15) -> list[Event]:
        """POST a message; the events of its answer (none when nothing came in `read`
        seconds: an answer the server sent to another exchange leaves this one waiting)."""
        with self.client(read) as http:
            try:
                response = http.post(f"{self.base}/mcp/st", content=json.dumps(message),
                                     headers=self.headers())
            except httpx.ReadTimeout:
                return []
        self.received.append(response.text + json.dumps(dict(response.headers)))
        found = events(response.text) if response.headers.get(
            "content-type", "").startswith("text/event-stream") else []
        self.primings += [event.id for event in found[:1] if event.id and not event.data]
        if not self.id:
            self.id = response.headers.get("mcp-session-id", "")
        return found

    def replay(self, last_event_id: str) -> list[Event]:
        """The GET stream resumed after an event: what it replays (it then stays open)."""
        text = ""
        with self.client(read=1.0) as http, http.stream(
                "GET", f"{self.base}/mcp/st",
                headers=self.headers(**{"accept": "text/event-stream",
                                        "last-event-id": last_event_id})) as response:
            try:
                for chunk in response.iter_text():
                    text += chunk
                    if any(event.data for event in events(text)):
                        break
            except httpx.ReadTimeout:
                pass
        self.received.append(text)
        return events(text)

    def start(self) -> Session:
        self.post(rpc("initialize", {"protocolVersion": VERSION, "capabilities": {},
                                     "clientInfo": {"name": "outsider", "version": "1"}}))
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self


def rpc(method: str, params: dict[str, Any] | None = None, rpc_id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def results(found: list[Event]) -> list[Any]:
    return [json.loads(event.data) for event in found if event.data]


@pytest.fixture(scope="module", params=["ext_authz", "native"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp(f"streams-{request.param}")
    port = free_port()
    processes: list[Process] = []
    try:
        upstream = start_upstream("st", port, workdir, stateful=True)
        processes.append(upstream)
        upstream.wait_http(f"http://127.0.0.1:{port}/mcp/st/echo")
        yield start_gateway({"st": {"upstream": f"127.0.0.1:{port}", **RULES}}, workdir,
                            request.param, processes)
    finally:
        for process in reversed(processes):
            process.stop()


def tool_names(messages: list[Any]) -> list[str]:
    return listed(messages, "tools")


def listed(messages: list[Any], key: str) -> list[str]:
    """The names (URIs, templates) of the items of one kind the messages list."""
    field = {"tools": "name", "prompts": "name", "resources": "uri",
             "resourceTemplates": "uriTemplate"}[key]
    return [item[field] for message in messages if isinstance(message.get("result"), dict)
            for item in message["result"].get(key, [])]


class TestResumption:
    def test_a_replayed_list_is_filtered(self, base: str) -> None:
        """The tools/list answer replayed on the GET stream is the outsider's, as the POST's
        was."""
        session = Session(base, EXTERNAL).start()
        posted = session.post(rpc("tools/list", rpc_id=2))
        assert tool_names(results(posted)) == ["whoami"]
        replayed = session.replay(posted[0].id)
        assert tool_names(results(replayed)) == ["whoami"]
        inside = Session(base, INTERNAL).start()
        assert len(tool_names(results(inside.replay(inside.post(
            rpc("tools/list", rpc_id=2))[0].id)))) == 3

    @pytest.mark.parametrize(("method", "params", "said"), [
        ("tools/call", {"name": "add", "arguments": {}}, "Unknown tool: add"),
        ("prompts/get", {"name": "delete_help"}, "Unknown prompt: delete_help"),
    ])
    def test_a_replayed_hidden_answer_names_the_callers_item(
            self, base: str, method: str, params: dict[str, Any], said: str) -> None:
        session = Session(base, EXTERNAL).start()
        posted = session.post(rpc(method, params, rpc_id=3))
        replayed = session.replay(posted[0].id)
        for found in (posted, replayed):
            assert said in json.dumps(results(found))
        assert not FRESH.search("".join(session.received))


STEPS = st.sampled_from([
    ("tools/list", None), ("prompts/list", None), ("resources/list", None),
    ("resources/templates/list", None),
    ("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}),
    ("tools/call", {"name": "zzz", "arguments": {}}),
    ("tools/call", {"name": "whoami", "arguments": {}}),
    ("prompts/get", {"name": "delete_help"}), ("prompts/get", {"name": "summarize",
                                                               "arguments": {"text": "t"}}),
    ("resources/read", {"uri": "repo://victim/delete"}),
    ("resources/read", {"uri": "repo://docs/readme"}),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "delete_help"},
                             "argument": {"name": "x", "value": "d"}}),
    ("ping", None),
    ("replay", None),  # resume the GET stream after the last stream's priming event
    ("crossed", None),  # a tools/list and a ping with one id, at once, on two connections
])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(STEPS, st.sampled_from([1, 2, "a"]), st.booleans()),
                      min_size=1, max_size=6))
def test_no_sequence_shows_an_outsider_anything_hidden(
        base: str, steps: list[tuple[tuple[str, Any], Any, bool]]) -> None:
    """For any sequence of requests from an outsider (methods, ids, two sessions, replays,
    crossed answers), nothing it receives describes a hidden item or carries a fresh name,
    every list it gets holds the visible items only, and a hidden item's name comes back
    only where the outsider wrote it itself (as a missing item's does)."""
    sessions = [Session(base, EXTERNAL).start(), Session(base, EXTERNAL).start()]
    for (method, params), rpc_id, second in steps:
        session = sessions[second]
        if method == "replay":
            if session.primings:
                session.replay(session.primings[-1])
        elif method == "crossed":
            threads = [threading.Thread(target=session.post,
                                        args=(rpc(name, rpc_id=rpc_id), 2.0))
                       for name in ("tools/list", "ping")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            session.post(rpc(method, params, rpc_id))
    received = "".join(text for session in sessions for text in session.received)
    assert not FRESH.search(received)
    for secret in SECRETS:
        assert secret not in received, secret
    for text in (text for session in sessions for text in session.received):
        messages = [json.loads(event.data) for event in events(text) if event.data.startswith(
            "{")]
        for key, visible in VISIBLE.items():
            assert set(listed(messages, key)) <= visible, key
