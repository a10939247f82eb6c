"""Answers on a tool-rule route are read as every client would read them, or refused.

Through a real Envoy from `envoy-config`, in both data paths, to an upstream that writes its
tools/list answer oddly (tests/e2e/odd_upstream.py): a media type other than JSON or SSE, or
none, SSE with a byte order mark or bare JSON in it, a `result` key twice, one JSON text
over several `data:` lines, a `cacheScope` of `public`. An external caller, from whom
`delete_repo` is hidden, never receives it: the answer is filtered where it can be read
alike by every client, and is otherwise a 502 with a JSON-RPC error.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from tests.e2e.harness import Process, free_port, raw_request, start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERNAL, EXTERNAL = "127.0.0.1", "127.0.0.2"
LIST = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
CALL = json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                   "params": {"name": "whoami", "arguments": {}}})
MAX_ANSWER = 10 * 1024 * 1024  # the stack's mcp.max_answer_bytes
MCP_HEADERS = {"content-type": "application/json",
               "accept": "application/json, text/event-stream"}


@dataclass
class Stack:
    base: str
    envoy_admin: int

    def answers_streams(self) -> int:
        """How many streams the answers filter has opened to the sidecar (Envoy's own
        count: the bodies filter never starts where ext_authz refuses)."""
        url = f"http://127.0.0.1:{self.envoy_admin}/stats?filter=ext_proc.streams_started$"
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        return sum(int(line.rpartition(": ")[2]) for line in lines)

    def tools_list(self, source: str, mode: str) -> httpx.Response:
        return self.post(source, mode, LIST)

    def post(self, source: str, mode: str, body: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as http:
            return http.post(f"{self.base}/mcp/odd", content=body,
                             headers={**MCP_HEADERS, "x-odd-answer": mode})


@pytest.fixture(scope="module", params=["ext_authz", "native"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"answers-{request.param}")
    port = free_port()
    processes: list[Process] = []
    try:
        odd = Process("odd", [sys.executable, "-m", "tests.e2e.odd_upstream", "--port",
                              str(port)], workdir)
        processes.append(odd)
        odd.wait_port(port)
        base = start_gateway({
            "odd": {
                "upstream": f"127.0.0.1:{port}",
                "tools": {"delete_repo": {"available_on_public_internet": False}},
                "prompts": {"delete_help": {"available_on_public_internet": False}},
                "resources": {"repo://victim/{action}": {"available_on_public_internet": False}}},
            # Hidden from outside, with tool rules: its routes read bodies.
            "vault": {"upstream": f"127.0.0.1:{port}", "available_on_public_internet": False,
                      "tools": {"delete_repo": {"available_on_public_internet": False}}},
        }, workdir, request.param, processes, mcp={"max_answer_bytes": MAX_ANSWER})
        envoy = yaml.safe_load((workdir / "envoy.yaml").read_text())
        yield Stack(base, envoy["admin"]["address"]["socket_address"]["port_value"])
    finally:
        for process in reversed(processes):
            process.stop()


def sse_data(text: str) -> list[object]:
    """The JSON of each event, read as an SSE client reads a stream."""
    events, data = [], []
    for line in re.split(r"\r\n|\r|\n", text):
        if not line:
            if "".join(data).strip():  # a priming event carries no message
                events.append(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            value = line[len("data:"):]
            data.append(value[1:] if value.startswith(" ") else value)
    return events


class TestReadable:
    def test_a_json_list_is_filtered(self, stack: Stack) -> None:
        response = stack.tools_list(EXTERNAL, "json")
        assert response.status_code == 200
        assert [t["name"] for t in response.json()["result"]["tools"]] == ["whoami"]

    def test_json_over_several_data_lines_reaches_the_client_filtered(self,
                                                                      stack: Stack) -> None:
        """Legal SSE, one JSON text split over `data:` lines: a client reads it, filtered."""
        response = stack.tools_list(EXTERNAL, "sse-split")
        assert response.status_code == 200
        [message] = sse_data(response.text)
        assert [t["name"] for t in message["result"]["tools"]] == ["whoami"]  # type: ignore[index]
        assert "delete_repo" not in response.text

    @pytest.mark.parametrize("source", [INTERNAL, EXTERNAL])
    def test_a_list_is_private_to_its_caller(self, stack: Stack, source: str) -> None:
        """A server's `cacheScope: public` would let a shared cache hand one caller's list
        to another: it goes out private, for everyone (its TTL kept)."""
        result = stack.tools_list(source, "cache-public").json()["result"]
        assert (result["cacheScope"], result["ttlMs"]) == ("private", 600000)


class TestRefused:
    @pytest.mark.parametrize("mode", ["text-plain", "json-rpc", "no-type", "sse-bom",
                                      "sse-bare", "duplicate-result"])
    def test_what_a_client_could_read_otherwise_is_a_502(self, stack: Stack,
                                                         mode: str) -> None:
        """Never passed unfiltered: a 502 with a JSON-RPC error, nothing of the list."""
        for source in (EXTERNAL, INTERNAL):
            response = stack.tools_list(source, mode)
            assert response.status_code == 502
            assert response.json()["error"]["code"] == -32603
            assert "delete_repo" not in response.text


class TestLargeAnswers:
    @pytest.mark.parametrize("size", [1_200_000, 2_000_000, 3_000_000, 8_000_000])
    @pytest.mark.parametrize("kind", ["json", "sse", "json-chunked"])
    def test_up_to_the_limit_every_time(self, stack: Stack, kind: str, size: int) -> None:
        """A visible tool's answer up to mcp.max_answer_bytes passes whole, every time (it
        was a 500, a 200 or no answer at all, by chance, past Envoy's 1 MiB buffers)."""
        for _ in range(3):
            response = stack.post(EXTERNAL, f"large-{kind}-{size}", CALL)
            assert response.status_code == 200, response.text[:300]
            assert response.text.count("x") >= size

    @pytest.mark.parametrize("kind", ["json", "sse"])
    def test_past_the_limit_a_502_at_once(self, stack: Stack, kind: str) -> None:
        """Past the limit, with its length said: a 502 before a byte is buffered."""
        for _ in range(2):
            response = stack.post(EXTERNAL, f"large-{kind}-{MAX_ANSWER + 1}", CALL)
            assert response.status_code == 502
            assert response.json()["error"]["code"] == -32603

    def test_past_the_limit_unsaid_never_a_whole_answer(self, stack: Stack) -> None:
        """Past the limit with no length said, the headers have gone: the answer is cut off
        (never the whole of it, never a hang), the same every time."""
        for _ in range(2):
            with pytest.raises(httpx.HTTPError):
                stack.post(EXTERNAL, f"large-json-{MAX_ANSWER + 1}-chunked",
                           CALL).raise_for_status()


class TestHiddenWithToolRules:
    @pytest.mark.parametrize("late_body", [False, True], ids=["whole", "body-late"])
    @pytest.mark.parametrize("method", ["POST", "PUT", "GET", "DELETE"])
    def test_answers_as_an_unknown_server(self, stack: Stack, method: str,
                                          late_body: bool) -> None:
        """A hidden server whose routes read bodies answers an outsider's request, with a
        body, as a server that does not exist: status, headers (`connection: close` among
        them) and body, and neither 404 waits on the answers filter.

        Sent whole (one write), or with the body 0.3 s after the headers: whether Envoy has
        read the body when it answers decides whether it closes the connection, so each
        case fixes that for both (sent as a client pleases, it is a race, which the two run
        alike)."""
        streams = stack.answers_streams()
        hidden, unknown = (raw_request(stack.base, method, f"/mcp/{server}", LIST,
                                       MCP_HEADERS, EXTERNAL, late_body)
                           for server in ("vault", "nope"))
        assert hidden == unknown
        assert hidden[0] == 404
        assert stack.answers_streams() == streams


class TestJudgedByWhatItIs:
    """A tools list is filtered for its caller in whatever answer carries it, not only in the
    answer to the tools/list that asked for it."""

    def test_the_get_stream_is_judged_message_by_message(self, stack: Stack) -> None:
        """The server-to-client GET stream (where a resumed stream's replay arrives): its
        tools list filtered, a hidden call's answer naming the caller's tool (never the
        fresh name), and a hidden resource's update dropped."""
        stack.post(EXTERNAL, "json", json.dumps(
            {"jsonrpc": "2.0", "id": 8, "method": "tools/call",
             "params": {"name": "delete_repo", "arguments": {}}}))
        with httpx.Client(transport=httpx.HTTPTransport(local_address=EXTERNAL),
                          timeout=10) as http:
            response = http.get(f"{stack.base}/mcp/odd", headers={
                "accept": "text/event-stream", "last-event-id": "ev-3"})
        assert response.status_code == 200
        listing, call, update = sse_data(response.text)
        assert [t["name"] for t in listing["result"]["tools"]] == ["whoami"]  # type: ignore[index]
        assert call["result"]["content"][0]["text"] == "Unknown tool: delete_repo"  # type: ignore[index]
        assert update["params"]["uri"] == "repo://docs/readme"  # type: ignore[index]
        assert "hidden-" not in response.text
        assert "victim" not in response.text
        assert "id: ev-6" in response.text  # the dropped update's id still counts

    def test_a_list_answering_another_request_is_filtered(self, stack: Stack) -> None:
        """An answer crossed into another exchange (the same id on two connections): a ping
        whose answer is a tools list."""
        ping = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping"})
        response = stack.post(EXTERNAL, "json", ping)
        assert response.status_code == 200
        assert [t["name"] for t in response.json()["result"]["tools"]] == ["whoami"]

    def test_a_hidden_calls_answer_in_another_exchange_names_the_callers_tool(
            self, stack: Stack) -> None:
        """A hidden call's answer crossed into a ping's exchange: the caller's name is put
        back there too, as it would be for a missing tool's answer."""
        stack.post(EXTERNAL, "json", json.dumps(
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
             "params": {"name": "delete_repo", "arguments": {}}}))
        ping = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "ping"})
        response = stack.post(EXTERNAL, "echo-last-call", ping)
        assert response.json()["result"]["content"][0]["text"] == "Unknown tool: delete_repo"
        assert "hidden-" not in response.text


class TestEveryList:
    @pytest.mark.parametrize(("mode", "field", "shown"), [
        ("prompts", "name", ["summarize"]),
        ("resources", "uri", ["repo://docs/readme"]),
        ("resourceTemplates", "uriTemplate", ["repo://{owner}/readme"]),
    ])
    def test_prompts_resources_and_templates_are_filtered(
            self, stack: Stack, mode: str, field: str, shown: list[str]) -> None:
        """Whatever request an answer seems to answer, each list in it loses what the
        caller may not see, and is private to the caller."""
        outside = stack.post(EXTERNAL, mode, json.dumps(
            {"jsonrpc": "2.0", "id": 3, "method": "ping"})).json()["result"]
        assert [item[field] for item in outside[mode]] == shown
        assert (outside["cacheScope"], outside["ttlMs"]) == ("private", 1000)
        inside = stack.post(INTERNAL, mode, json.dumps(
            {"jsonrpc": "2.0", "id": 3, "method": "ping"})).json()["result"]
        assert len(inside[mode]) == 2
