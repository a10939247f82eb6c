"""Named networks and tool rules through a real Envoy running `envoy-config` output.

Callers: 127.0.0.1 (internal), 127.0.0.2 (external) and 127.0.0.3 (the `partners`
network). Servers, both demo MCP servers with the tools `whoami` and `add`:
- `pub`: public; its `add` is internal-only but visible to partners.
- `billing`: internal-only, visible to partners; its `add` is internal-only, and the sidecar
  answers for it (`unknown_tool_reply: tool_error`) where `pub`'s server does (the default).
The MCP SDK client plays each caller; raw HTTP sends what the SDK would not (batches, bad
bodies, forged MCP headers).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp.shared.exceptions import MCPError

from tests.e2e.harness import (
    Process,
    envoy_config,
    free_port,
    mcp_client,
    rpc,
    start_envoy,
    start_sidecar,
    start_upstream,
)
from tests.token_endpoint import ThreadedTokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERNAL, EXTERNAL, PARTNER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
MAX_BODY = 4096
MAX_BATCH = 4
MCP_HEADERS = {"content-type": "application/json",
               "accept": "application/json, text/event-stream"}


@dataclass
class Stack:
    base: str
    sidecar: Process
    admin: str
    envoy_config: dict[str, Any]
    workdir: Path

    def post(self, source: str, server: str, body: bytes | str,
             headers: dict[str, str] | None = None) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=10) as http:
            return http.post(f"{self.base}/mcp/{server}", content=body,
                             headers={**MCP_HEADERS, **(headers or {})})

    def decisions(self) -> list[dict[str, Any]]:
        return self.sidecar.json_lines()

    def last_decision(self, before: int) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            records = self.decisions()
            if len(records) > before:
                return records[-1]
            time.sleep(0.05)
        raise AssertionError("no decision logged")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("tools")
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin", "pub",
                                             "billing")}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        try:
            for name in ("pub", "billing"):
                processes.append(start_upstream(name, ports[name], workdir))
            oauth2 = {"token_url": tokens.url, "client_id": "tools-client",
                      "client_secret": "tools-secret"}
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"],
                            "networks": {"partners": ["127.0.0.3/32"]}},
                "mcp": {"max_body_bytes": MAX_BODY, "max_batch_messages": MAX_BATCH},
                "servers": {
                    "pub": {"oauth2": oauth2, "tools": {"add": {
                        "available_on_public_internet": False, "visible_to": ["partners"]}}},
                    "billing": {"available_on_public_internet": False,
                                "visible_to": ["partners"], "oauth2": oauth2,
                                "tools": {"add": {}}, "unknown_tool_reply": "tool_error"},
                },
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config))
            bootstrap = envoy_config(
                config_path, "--listen", f"127.0.0.1:{ports['envoy']}",
                "--admin", f"127.0.0.1:{ports['envoy_admin']}",
                "--upstream", f"pub=127.0.0.1:{ports['pub']}",
                "--upstream", f"billing=127.0.0.1:{ports['billing']}")
            sidecar = start_sidecar(config_path, workdir)
            processes.append(sidecar)
            for process, name in zip(processes, ("pub", "billing"), strict=False):
                process.wait_http(f"http://127.0.0.1:{ports[name]}/mcp/{name}/echo")
            sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
            processes.append(start_envoy(bootstrap, workdir, ports["envoy_admin"]))
            yield Stack(f"http://127.0.0.1:{ports['envoy']}", sidecar,
                        f"http://127.0.0.1:{ports['admin']}", bootstrap, workdir)
        finally:
            for process in reversed(processes):
                process.stop()


async def _call(base: str, source: str, server: str, tool: str,
                arguments: dict[str, Any]) -> Any:
    async with mcp_client(f"{base}/mcp/{server}", source) as mcp:
        return await mcp.call_tool(tool, arguments)


def call_tool(stack: Stack, source: str, server: str, tool: str) -> Any:
    """Call a tool with the MCP SDK client; return its result, or the MCPError it raised."""
    arguments = {"a": 2, "b": 3} if tool == "add" else {}
    try:
        return asyncio.run(_call(stack.base, source, server, tool, arguments))
    except BaseException as exc:  # the SDK nests errors in task groups
        error: BaseException = exc
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        if isinstance(error, MCPError):
            return error
        raise


def shape(result: Any, tool: str) -> Any:
    """What a caller can tell of an answer, with the tool's own name taken out."""
    if isinstance(result, MCPError):
        return ("MCPError", result.code, str(result).replace(tool, "<tool>"))
    texts = [(type(c).__name__, c.type, c.text.replace(tool, "<tool>"))  # type: ignore[union-attr]
             for c in result.content]
    return (type(result).__name__, result.is_error, texts, result.structured_content)


VISIBLE, HIDDEN, MISSING = "visible", "hidden", "missing"
# How each server's hidden tools are answered: renamed for the server, or a local reply.
HIDDEN_REASON = {"pub": "tool_hidden", "billing": "tool_not_found"}

MATRIX = [
    # caller, server, tool, expected
    (INTERNAL, "pub", "add", VISIBLE),
    (PARTNER, "pub", "add", VISIBLE),
    (EXTERNAL, "pub", "add", HIDDEN),
    (EXTERNAL, "pub", "whoami", VISIBLE),
    (INTERNAL, "billing", "add", VISIBLE),
    (PARTNER, "billing", "whoami", VISIBLE),
    (PARTNER, "billing", "add", HIDDEN),
    (INTERNAL, "pub", "nope", MISSING),
    (PARTNER, "billing", "nope", MISSING),
    (EXTERNAL, "pub", "nope", MISSING),
]


class TestToolsWithTheSdkClient:
    @pytest.mark.parametrize(("source", "server", "tool", "expected"), MATRIX)
    def test_matrix(self, stack: Stack, source: str, server: str, tool: str,
                    expected: str) -> None:
        """Each caller sees the tools its network may; a hidden tool looks missing."""
        before = len(stack.decisions())
        result = call_tool(stack, source, server, tool)
        decision = stack.last_decision(before)
        if expected == VISIBLE:
            assert not result.is_error, result
            if tool == "add":
                assert result.structured_content == {"result": 5}
            else:
                assert result.structured_content["authorization"].startswith("Bearer ")
            assert decision["reason"] == "allowed"
        else:
            missing = call_tool(stack, INTERNAL, server, "no-such-tool")
            assert shape(result, tool) == shape(missing, "no-such-tool")
            assert decision["reason"] == (HIDDEN_REASON[server] if expected == HIDDEN
                                          else "allowed")
            # Only configured tools are named in logs and metrics.
            assert decision["tool"] == (tool if expected == HIDDEN else "")

    def test_hidden_server_still_hides_everything(self, stack: Stack) -> None:
        """External callers do not see billing at all: its tools fail as a missing server."""
        error = call_tool(stack, EXTERNAL, "billing", "whoami")
        missing = call_tool(stack, EXTERNAL, "no-such-server", "whoami")
        assert isinstance(error, MCPError)
        assert shape(error, "whoami") == shape(missing, "whoami")

    def test_partner_network_is_named(self, stack: Stack) -> None:
        """The decision log and metadata name the partner network."""
        before = len(stack.decisions())
        call_tool(stack, PARTNER, "billing", "whoami")
        decision = stack.last_decision(before)
        assert (decision["network"], decision["rule"]) == ("partners",
                                                           "servers.billing.visible_to")


def tools_call(name: str, rpc_id: Any = 1) -> dict[str, Any]:
    arguments = {"a": 1, "b": 2} if name == "add" else {}
    return rpc("tools/call", {"name": name, "arguments": arguments}, rpc_id)


def headers_of(response: httpx.Response) -> set[tuple[str, str]]:
    # Envoy writes a local reply's headers in another order than a proxied answer's; the
    # names and values are what is compared (README "Tool rules" says so).
    return {(k, v) for k, v in response.headers.items() if k not in ("date", "content-length")}


def header_list(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.items() if k not in ("date", "content-length")]


class TestRawRequests:
    @pytest.mark.parametrize(("source", "server"), [(EXTERNAL, "pub"), (PARTNER, "billing")],
                             ids=["server-answers", "local-reply"])
    def test_hidden_and_missing_tools_answer_alike_on_the_wire(self, stack: Stack, source: str,
                                                               server: str) -> None:
        """Same status, headers and body (but for the name) from Envoy, for any id."""
        for rpc_id in (7, "req-7"):
            hidden = stack.post(source, server, json.dumps(tools_call("add", rpc_id)))
            missing = stack.post(source, server, json.dumps(tools_call("zzz", rpc_id)))
            assert hidden.status_code == missing.status_code == 200
            if server == "pub":
                # The server's own answer: the very same headers, in the same order.
                assert header_list(hidden) == header_list(missing)
            else:
                assert headers_of(hidden) == headers_of(missing)
            assert hidden.content.replace(b"add", b"zzz") == missing.content
            assert b"hidden-" not in hidden.content  # the fresh name never comes back

    def test_hidden_tool_notification_reaches_the_server_renamed(self, stack: Stack) -> None:
        """A notification calling a hidden tool gets the server's own 202."""
        hidden = stack.post(EXTERNAL, "pub", json.dumps(tools_call("add", None)))
        missing = stack.post(EXTERNAL, "pub", json.dumps(tools_call("zzz", None)))
        assert hidden.status_code == missing.status_code == 202
        assert hidden.content == missing.content
        assert header_list(hidden) == header_list(missing)

    def test_hidden_tool_notification_with_a_local_reply(self, stack: Stack) -> None:
        """A local reply to a notification is the 202 any notification gets."""
        hidden = stack.post(PARTNER, "billing", json.dumps(tools_call("add", None)))
        missing = stack.post(PARTNER, "billing", json.dumps(tools_call("zzz", None)))
        assert (hidden.status_code, hidden.content) == (missing.status_code, missing.content)
        assert hidden.status_code == 202
        # Envoy drops the content-type of a local reply with no body: the one difference.
        assert headers_of(missing) - headers_of(hidden) == {("content-type", "application/json")}
        assert headers_of(hidden) <= headers_of(missing)

    @pytest.mark.parametrize(
        ("source", "server", "body", "reason"),
        [
            # JSON's other spellings of the same method and name are read as the server would.
            (EXTERNAL, "pub",
             r'{"jsonrpc":"2.0","id":1,"method":"tools\/call","params":{"name":"\u0061dd"}}',
             "tool_hidden"),
            (PARTNER, "billing",
             r'{"jsonrpc":"2.0","id":1,"method":"tools\/call","params":{"name":"\u0061dd"}}',
             "tool_not_found"),
            # Renamed message by message, a batch goes on; a local reply cannot answer a
            # batch message by message, so there it is refused whole.
            (EXTERNAL, "pub", json.dumps([tools_call("whoami", 1), tools_call("add", 2)]),
             "tool_hidden"),
            (PARTNER, "billing", json.dumps([tools_call("whoami", 1), tools_call("add", 2)]),
             "batch_refused"),
            (EXTERNAL, "pub", json.dumps([tools_call("whoami", 1), tools_call("whoami", 2)]),
             "allowed"),
            # Every body is parsed now, tools/call in it or not: the batch limit holds.
            (EXTERNAL, "pub",
             json.dumps([rpc("tools/list", rpc_id=i) for i in range(MAX_BATCH + 1)]),
             "bad_mcp_request"),
        ],
        ids=["escaped", "escaped-local-reply", "batch-with-hidden-tool",
             "batch-with-hidden-tool-local-reply", "batch-of-visible-tools", "batch-no-calls"],
    )
    def test_bodies_read_as_the_server_reads_them(self, stack: Stack, source: str, server: str,
                                                  body: str, reason: str) -> None:
        """Escapes are decoded; a batch calling a hidden tool is renamed or refused whole."""
        before = len(stack.decisions())
        response = stack.post(source, server, body)
        assert stack.last_decision(before)["reason"] == reason
        if reason == "batch_refused":
            assert response.status_code == 400
            assert response.json() == {"jsonrpc": "2.0", "id": None,
                                       "error": {"code": -32600, "message": "Batch refused"}}
        if reason in ("tool_hidden", "tool_not_found"):
            assert "hidden-" not in response.text
            if not body.startswith("["):
                assert "Unknown tool: add" in response.text

    @pytest.mark.parametrize(
        ("body", "headers", "code", "words"),
        [
            ('{"jsonrpc":"2.0","id":1,"method":"tools/call",', {}, -32700, "not JSON"),
            (b'{"method":"tools/call","params":{"name":"\xff"}}', {}, -32700, "not UTF-8"),
            (json.dumps(rpc("tools/call", {"arguments": {}})), {}, -32602, "no params.name"),
            ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami",'
             '"name":"add"}}', {}, -32600, "a key twice"),
            (json.dumps([tools_call("whoami", i) for i in range(MAX_BATCH + 1)]), {}, -32600,
             "mcp.max_batch_messages"),
            ("[]", {"mcp-method": "tools/call"}, -32600, "empty batch"),
            (json.dumps(tools_call("whoami")), {"mcp-name": "add"}, -32600, "Mcp-Name"),
            (json.dumps(tools_call("add")), {"mcp-method": "tools/list"}, -32600, "Mcp-Method"),
            (json.dumps(tools_call("add")), {"content-encoding": "gzip"}, -32600,
             "Content-Encoding"),
        ],
        ids=["truncated", "not-utf8", "no-name", "duplicate-key", "batch-too-long",
             "empty-batch", "mcp-name-mismatch", "mcp-method-mismatch", "compressed"],
    )
    def test_bad_bodies_are_a_clear_400(self, stack: Stack, body: str | bytes,
                                        headers: dict[str, str], code: int, words: str) -> None:
        """A body that cannot be judged is refused with a JSON-RPC error saying why."""
        before = len(stack.decisions())
        response = stack.post(INTERNAL, "pub", body, headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert words in error["message"]
        assert stack.last_decision(before)["reason"] == "bad_mcp_request"

    def test_body_over_the_limit_is_refused_by_envoy(self, stack: Stack) -> None:
        """Envoy will not send part of a body: over mcp.max_body_bytes it answers 413."""
        body = json.dumps(rpc("tools/call", {"name": "whoami", "arguments": {
            "padding": "x" * MAX_BODY}}))
        assert stack.post(INTERNAL, "pub", body).status_code == 413

    @pytest.mark.parametrize(("source", "server", "names"), [
        (EXTERNAL, "pub", {"whoami", "wait"}),
        (INTERNAL, "pub", {"whoami", "add", "wait"}),
        (PARTNER, "pub", {"whoami", "add", "wait"}),
        (PARTNER, "billing", {"whoami", "wait"}),
        (INTERNAL, "billing", {"whoami", "add", "wait"}),
    ])
    def test_tools_list_names_only_what_the_caller_may_call(self, stack: Stack, source: str,
                                                            server: str,
                                                            names: set[str]) -> None:
        """tools/list answers pass through the answers filter, which drops hidden tools."""
        response = stack.post(source, server, json.dumps(rpc("tools/list")))
        assert response.status_code == 200
        assert {tool["name"] for tool in response.json()["result"]["tools"]} == names

    def test_metrics_name_only_configured_tools(self, stack: Stack) -> None:
        """checks_total carries the tool label for configured tools, "" for the rest."""
        stack.post(EXTERNAL, "pub", json.dumps(tools_call("add")))
        stack.post(PARTNER, "billing", json.dumps(tools_call("add")))
        stack.post(EXTERNAL, "pub", json.dumps(tools_call("made-up-by-a-client")))
        text = httpx.get(f"{stack.admin}/metrics", timeout=5).text
        for reason in ("tool_hidden", "tool_not_found"):
            assert re.search(r'mcp_ext_authz_body_checks_total\{[^}]*reason="' + reason +
                             r'"[^}]*tool="add"\} [1-9]', text), reason
        assert "made-up-by-a-client" not in text


class TestMisconfiguredEnvoy:
    def test_a_route_that_sends_no_body_fails_loudly(self, stack: Stack) -> None:
        """Tool rules on a route whose body reaches no one: every POST is a 400, not a pass.

        As after a reload that adds `tools` to a server while Envoy's config still predates
        them: that server's routes neither run ext_proc nor send ext_authz the body.
        """
        bootstrap = copy.deepcopy(stack.envoy_config)
        listener = bootstrap["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            per_filter = route["typed_per_filter_config"]
            per_filter["envoy.filters.http.ext_authz"]["check_settings"][
                "context_extensions"].pop("mcp_tool_rules", None)
            per_filter["envoy.filters.http.ext_proc"] = {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                         "ExtProcPerRoute", "disabled": True}
        port, admin = free_port(), free_port()
        listener["address"]["socket_address"]["port_value"] = port
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin
        workdir = stack.workdir / "no-body"
        workdir.mkdir()
        envoy = start_envoy(bootstrap, workdir, admin)
        try:
            before = len(stack.decisions())
            response = httpx.post(f"http://127.0.0.1:{port}/mcp/pub", timeout=10,
                                  content=json.dumps(tools_call("add")), headers=MCP_HEADERS)
            assert response.status_code == 400
            assert "did not reach the sidecar" in response.json()["error"]["message"]
            assert stack.last_decision(before)["reason"] == "bad_mcp_request"
        finally:
            envoy.stop()
