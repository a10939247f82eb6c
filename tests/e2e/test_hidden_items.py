"""Hidden prompts and resources through a real Envoy, in both data paths: as if the server
had never had them.

The demo's MCP server (official Python SDK, stateless; JSON and SSE), and the TypeScript
SDK's server (tests/e2e/ts_server), each have prompts
`summarize` and `delete_help` (whose text names the internal tool `delete_repo`), resources
`repo://docs/readme` and `repo://victim/delete` (reading it has a side effect), the template
`repo://{owner}/secrets`, and completions that offer `delete_repo`. The rules show an
outsider `summarize` and `repo://docs/...` only (`"*"` hides the rest). For an outsider, a
hidden item's every use answers as a missing one's of the same length: status, headers and
body (but for the name); its lists leave it out; the side effect never runs.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import (
    Process,
    free_port,
    mcp_client,
    start_gateway,
    start_ts_upstream,
    start_upstream,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

INTERNAL, EXTERNAL = "127.0.0.1", "127.0.0.2"
HIDDEN = rb"hidden-[0-9a-f]*-[0-9a-f]{24}"
MCP_HEADERS = {"content-type": "application/json",
               "accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2025-06-18"}
RULES = {
    "prompts": {"*": {"available_on_public_internet": False}, "summarize": {}},
    "resources": {"repo://docs/{name}": {}, "*": {"available_on_public_internet": False}},
}


@dataclass
class Stack:
    base: str
    upstreams: dict[str, Process]

    def post(self, source: str, server: str, message: dict[str, Any],
             version: str = "2025-06-18") -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=15) as http:
            return http.post(f"{self.base}/mcp/{server}", content=json.dumps(message),
                             headers={**MCP_HEADERS, "mcp-protocol-version": version,
                                      # 2026-07-28 asks the method of every request
                                      **({"mcp-method": message["method"]}
                                         if version >= "2026" else {})})

    def side_effects(self, server: str) -> int:
        return self.upstreams[server].output().count('"side_effect"')


@pytest.fixture(scope="module", params=["ext_authz", "native"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp(f"items-{request.param}")
    ports = {name: free_port() for name in ("py", "pysse", "ts")}
    processes: list[Process] = []
    try:
        # `py` says its lists may be shared by everyone (cacheScope public).
        upstreams = {name: start_upstream(name, ports[name], workdir, sse=name == "pysse",
                                          public_lists=name == "py")
                     for name in ("py", "pysse")}
        upstreams["ts"] = start_ts_upstream("ts", ports["ts"], workdir)
        processes += upstreams.values()
        for name in upstreams:
            upstreams[name].wait_http(f"http://127.0.0.1:{ports[name]}/mcp/{name}/echo")
        base = start_gateway({name: {"upstream": f"127.0.0.1:{ports[name]}", **RULES}
                              for name in upstreams}, workdir, request.param, processes)
        yield Stack(base, upstreams)
    finally:
        for process in reversed(processes):
            process.stop()


def rpc(method: str, params: dict[str, Any] | None = None, rpc_id: int = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def messages(response: httpx.Response) -> list[Any]:
    """The JSON-RPC messages of an answer, JSON or SSE."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[len("data:"):]) for line in response.text.splitlines()
                if line.startswith("data:") and line[len("data:"):].strip()]
    return [response.json()]


def headers_of(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items() if k not in ("date",)]


# Each use of a hidden item, and the same use of a missing one of the same length.
USES = {
    "prompts/get": (rpc("prompts/get", {"name": "delete_help"}),
                    rpc("prompts/get", {"name": "zzzzzzzzzzz"})),
    "resources/read": (rpc("resources/read", {"uri": "repo://victim/delete"}),
                       rpc("resources/read", {"uri": "repo://victim/zzzzzz"})),
    "resources/read-template": (rpc("resources/read", {"uri": "repo://alice/secrets"}),
                                rpc("resources/read", {"uri": "repo://alice/zzzzzzz"})),
    "completion/complete-prompt": (
        rpc("completion/complete", {"ref": {"type": "ref/prompt", "name": "delete_help"},
                                    "argument": {"name": "x", "value": "d"}}),
        rpc("completion/complete", {"ref": {"type": "ref/prompt", "name": "zzzzzzzzzzz"},
                                    "argument": {"name": "x", "value": "d"}})),
    "completion/complete-template": (
        rpc("completion/complete", {"ref": {"type": "ref/resource",
                                            "uri": "repo://{owner}/secrets"},
                                    "argument": {"name": "owner", "value": "a"}}),
        rpc("completion/complete", {"ref": {"type": "ref/resource",
                                            "uri": "repo://{owner}/zzzzzzz"},
                                    "argument": {"name": "owner", "value": "a"}})),
    "resources/subscribe": (rpc("resources/subscribe", {"uri": "repo://victim/delete"}),
                            rpc("resources/subscribe", {"uri": "repo://victim/zzzzzz"})),
}


def _name(message: dict[str, Any]) -> str:
    params = message["params"]
    return params.get("name") or params.get("uri") or (
        params["ref"].get("name") or params["ref"]["uri"])


@pytest.mark.parametrize("server", ["py", "pysse", "ts"])
class TestHiddenUses:
    @pytest.mark.parametrize("use", USES)
    def test_a_hidden_item_answers_as_a_missing_one(self, stack: Stack, server: str,
                                                    use: str) -> None:
        hidden_message, missing_message = USES[use]
        hidden = stack.post(EXTERNAL, server, hidden_message)
        missing = stack.post(EXTERNAL, server, missing_message)
        assert hidden.status_code == missing.status_code
        assert headers_of(hidden) == headers_of(missing)
        hidden_name, missing_name = _name(hidden_message), _name(missing_message)
        assert hidden.content.replace(hidden_name.encode(), missing_name.encode()) == (
            missing.content)
        assert not re.search(HIDDEN, hidden.content)

    def test_the_side_effect_never_runs_for_an_outsider(self, stack: Stack,
                                                        server: str) -> None:
        before = stack.side_effects(server)
        stack.post(EXTERNAL, server, USES["resources/read"][0])
        assert stack.side_effects(server) == before
        inside = stack.post(INTERNAL, server, USES["resources/read"][0])
        assert messages(inside)[0]["result"]["contents"][0]["text"] == "deleted"

    @pytest.mark.parametrize(("method", "key", "field", "outside"), [
        ("prompts/list", "prompts", "name", ["summarize"]),
        ("resources/list", "resources", "uri", ["repo://docs/readme"]),
        ("resources/templates/list", "resourceTemplates", "uriTemplate", []),
    ])
    def test_lists_leave_hidden_items_out(self, stack: Stack, server: str, method: str,
                                          key: str, field: str, outside: list[str]) -> None:
        [external] = messages(stack.post(EXTERNAL, server, rpc(method)))
        [internal] = messages(stack.post(INTERNAL, server, rpc(method)))
        assert [item[field] for item in external["result"][key]] == outside
        assert len(internal["result"][key]) > len(outside)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_the_sdk_client_sees_only_what_it_may(stack: Stack, mode: str) -> None:
    """The official SDK client, as an outsider, in the initialize handshake's mode and in
    protocol 2026-07-28's: the tools, prompts and resources it may see, and a hidden
    prompt's get failing as a missing one's does."""

    async def session() -> tuple[str, list[str], list[str], list[str], list[str]]:
        async with mcp_client(f"{stack.base}/mcp/py", EXTERNAL, mode=mode) as mcp:
            tools = [t.name for t in (await mcp.list_tools()).tools]
            prompts = [p.name for p in (await mcp.list_prompts()).prompts]
            resources = [str(r.uri) for r in (await mcp.list_resources()).resources]
            errors = []
            for name in ("delete_help", "zzzzzzzzzzz"):
                try:
                    await mcp.get_prompt(name)
                    errors.append("no error")
                except Exception as error:  # the SDK's MCPError
                    errors.append(str(error))
            return mcp.protocol_version, tools, prompts, resources, errors

    version, tools, prompts, resources, (hidden, missing) = asyncio.run(session())
    assert (version == "2026-07-28") == (mode != "legacy")
    assert tools == ["whoami", "add", "wait"]
    assert (prompts, resources) == (["summarize"], ["repo://docs/readme"])
    assert hidden.replace("delete_help", "zzzzzzzzzzz") == missing


MODERN = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {}}}


def first_event(stack: Stack, source: str, message: dict[str, Any]) -> str:
    """The first event of a long-lived SSE answer (subscriptions/listen stays open)."""
    headers = {**MCP_HEADERS, "mcp-protocol-version": "2026-07-28",
               "mcp-method": message["method"]}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                      timeout=httpx.Timeout(15, read=5)) as http, http.stream(
            "POST", f"{stack.base}/mcp/py", content=json.dumps(message),
            headers=headers) as response:
        text = ""
        for chunk in response.iter_text():
            text += chunk
            if re.search(r"\r\n\r\n|\n\n", text):
                return text
    return text


def test_listening_to_a_hidden_resource_is_listening_to_a_missing_one(stack: Stack) -> None:
    """subscriptions/listen (2026-07-28): a hidden resource's subscription goes on renamed,
    so the server honours what it would for a missing one, and the acknowledgement names
    the caller's URIs (never a fresh one)."""
    listen = rpc("subscriptions/listen", {**MODERN, "notifications": {
        "toolsListChanged": True,
        "resourceSubscriptions": ["repo://victim/delete", "repo://victim/zzzzzz"]}})
    event = first_event(stack, EXTERNAL, listen)
    [data] = [line[len("data: "):] for line in event.splitlines() if line.startswith("data: ")]
    acknowledged = json.loads(data)
    assert acknowledged["method"] == "notifications/subscriptions/acknowledged"
    assert acknowledged["params"]["notifications"]["resourceSubscriptions"] == [
        "repo://victim/delete", "repo://victim/zzzzzz"]
    assert "hidden-" not in event


def test_server_discover_is_private_to_its_caller(stack: Stack) -> None:
    """server/discover (2026-07-28) answers through the gateway, never for a shared cache."""
    answer = stack.post(EXTERNAL, "py", rpc("server/discover", MODERN), version="2026-07-28")
    [discovered] = messages(answer)
    assert "result" in discovered, answer.text
    assert discovered["result"]["supportedVersions"] == ["2026-07-28"]
    assert discovered["result"]["cacheScope"] == "private"


def test_a_shared_cache_never_hands_one_callers_list_to_another(stack: Stack) -> None:
    """Two SDK clients (protocol 2026-07-28) sharing one cache store that shares what a
    server calls public: the insider lists first, then the outsider. The server says
    `public`; through the gateway the lists are private, so the outsider's come from the
    server, filtered, never from the insider's entry."""
    from mcp.client.caching import CacheConfig, InMemoryResponseCacheStore

    store = InMemoryResponseCacheStore()

    async def listed(source: str, partition: str) -> tuple[list[str], list[str]]:
        cache = CacheConfig(store=store, partition=partition, share_public=True,
                            target_id=f"{stack.base}/mcp/py")
        async with mcp_client(f"{stack.base}/mcp/py", source, mode="2026-07-28",
                              cache=cache) as mcp:
            return ([p.name for p in (await mcp.list_prompts()).prompts],
                    [t.name for t in (await mcp.list_tools()).tools])

    inside = asyncio.run(listed(INTERNAL, "insider"))
    outside = asyncio.run(listed(EXTERNAL, "outsider"))
    assert inside == (["summarize", "delete_help"], ["whoami", "add", "wait"])
    assert outside == (["summarize"], ["whoami", "add", "wait"])
