"""docker-compose.yaml, really running: clients on their own networks, the MCP SDK client,
the load balancer of the `lb` profile, IPv4 and IPv6.

Addresses come from the compose file (tests/topology/compose.py reads it); the ones these
tests name are looked up there too, so a renumbered compose file is still tested as written.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mcp.client.client import Client
from mcp.shared.exceptions import MCPError

from tests.raw_http import http_request
from tests.topology.compose import ROOT
from tests.topology.netns import netns_exec
from tests.topology.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WHOAMI = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "whoami", "arguments": {}}}).encode()
MCP_HEADERS = [("Content-Type", "application/json"),
               ("Accept", "application/json, text/event-stream")]


def url(host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, path: str) -> str:
    return f"http://{f'[{host}]' if host.version == 6 else host}:{port}{path}"


async def _use_server(address: str) -> tuple[set[str], dict[str, Any]]:
    async with Client(address) as mcp:
        tools = await mcp.list_tools()
        result = await mcp.call_tool("whoami", {})
    assert result.structured_content is not None
    return {tool.name for tool in tools.tools}, result.structured_content


def use_server(stack: Stack, client: str, address: str) -> tuple[set[str], dict[str, Any]]:
    """List the tools and call `whoami` with the MCP SDK client, from inside `client`."""
    return stack.in_namespace(client, lambda: asyncio.run(_use_server(address)))  # type: ignore[no-any-return]


async def _call_tool(address: str, tool: str, arguments: dict[str, Any]) -> Any:
    async with Client(address) as mcp:
        return await mcp.call_tool(tool, arguments)


def call_tool(stack: Stack, client: str, address: str, tool: str,
              arguments: dict[str, Any]) -> Any:
    """Call one tool with the MCP SDK client, from inside `client`."""
    return stack.in_namespace(client, lambda: asyncio.run(_call_tool(address, tool, arguments)))


def mcp_error(stack: Stack, client: str, address: str) -> MCPError:
    """The MCPError the SDK client ends with when it cannot use the server at `address`."""
    with pytest.raises(BaseExceptionGroup) as caught:  # the SDK nests it in task groups
        use_server(stack, client, address)
    error: BaseException = caught.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, MCPError), repr(caught.value)
    return error


def envoy_port(stack: Stack) -> int:
    return 10000  # docker-compose.yaml publishes it; test_deploy checks the two agree


class Addresses:
    """The compose file's addresses, by service and network."""

    def __init__(self, stack: Stack) -> None:
        self.services = stack.topology.services

    def of(self, service: str, network: str, version: int = 4) -> Any:
        return self.services[service].address(network, version)


def judged(stack: Stack, since: int, server: str, expected: int = 1) -> list[dict[str, Any]]:
    """The sidecar's decisions on `server`'s requests since `since`: `expected` of them where
    the sidecar decides them; none where Envoy does (native data path), asked nothing."""
    if stack.sidecar_decides(server):
        records = decisions_since(stack, since, expected)
        assert len(records) >= expected, records
        return records
    time.sleep(0.3)  # what the sidecar would have logged by now
    assert decisions_since(stack, since, 0) == []
    return []


@pytest.fixture(scope="module")
def at(compose: Stack) -> Addresses:
    return Addresses(compose)


def decisions_since(stack: Stack, count: int, expected: int = 1) -> list[dict[str, Any]]:
    """The ext_authz checks logged after the first `count` lines, once `expected` are in.

    (Requests to a server with tool rules log a second line, ext_proc's reading of the body.)
    """
    deadline = time.monotonic() + 5
    while True:
        checks = [r for r in stack.json_lines("sidecar")[count:] if r["phase"] == "check"]
        if len(checks) >= expected or time.monotonic() > deadline:
            return checks
        time.sleep(0.05)


class TestDirectClients:
    """Clients reach Envoy on their own network: Envoy sees their real addresses."""

    @pytest.mark.parametrize("version", [4, 6])
    def test_internal_client_uses_both_servers(self, compose: Stack, at: Addresses,
                                               version: int) -> None:
        """From the internal network (IPv4 and IPv6) both servers answer, each with its token."""
        envoy = at.of("envoy", "internal", version)
        since = len(compose.json_lines("sidecar"))
        for server in ("public", "internal"):
            tools, whoami = use_server(compose, "client-internal",
                                       url(envoy, envoy_port(compose), f"/mcp/{server}"))
            assert tools == {"whoami", "add", "wait"}
            assert whoami["server"] == server
            assert whoami["authorization"].startswith(f"Bearer demo-demo-{server}-")
        asked = [s for s in ("public", "internal") if compose.sidecar_decides(s)]
        records = decisions_since(compose, since, 3 * len(asked))
        assert {r["server"] for r in records} == set(asked)  # native: tool rules only
        client = str(at.of("client-internal", "internal", version))
        assert {(r["client_ip"], r["client_ip_source"], r["network"], r["reason"])
                for r in records} == {(client, "peer", "internal", "allowed")}

    @pytest.mark.parametrize("version", [4, 6])
    def test_external_client_sees_public_only(self, compose: Stack, at: Addresses,
                                              version: int) -> None:
        """From the external network the internal server fails exactly as a missing one."""
        envoy = at.of("envoy", "external", version)
        port = envoy_port(compose)
        since = len(compose.json_lines("mcp-internal"))
        tools, whoami = use_server(compose, "client-external", url(envoy, port, "/mcp/public"))
        assert tools == {"whoami", "wait"}  # `add` is internal-only: not listed to outsiders
        assert whoami["authorization"].startswith("Bearer demo-demo-public-")
        hidden = mcp_error(compose, "client-external", url(envoy, port, "/mcp/internal"))
        missing = mcp_error(compose, "client-external", url(envoy, port, "/mcp/missing"))
        assert (hidden.code, str(hidden)) == (missing.code, str(missing))
        assert compose.json_lines("mcp-internal")[since:] == []

    @pytest.mark.parametrize(("client", "network"), [("client-internal", "internal"),
                                                     ("client-external", "external")])
    def test_tool_rule_on_the_public_server(self, compose: Stack, at: Addresses, client: str,
                                            network: str) -> None:
        """`add` of the public server is internal-only: outside it is an unknown tool."""
        envoy = url(at.of("envoy", network), envoy_port(compose), "/mcp/public")
        added = call_tool(compose, client, envoy, "add", {"a": 2, "b": 3})
        if network == "internal":
            assert (added.is_error, added.structured_content) == (False, {"result": 5})
        else:
            missing = call_tool(compose, client, envoy, "subtract", {})
            assert added.is_error
            assert missing.is_error
            assert [c.text for c in added.content] == ["Unknown tool: add"]
            assert [c.text for c in missing.content] == ["Unknown tool: subtract"]

    def test_upstream_received_the_injected_token(self, compose: Stack, at: Addresses) -> None:
        """The internal upstream logged the gateway's bearer and the caller's address."""
        envoy = at.of("envoy", "internal")
        since = len(compose.json_lines("mcp-internal"))
        use_server(compose, "client-internal", url(envoy, envoy_port(compose), "/mcp/internal"))
        records = compose.new_lines("mcp-internal", since, 3)
        assert records
        for record in records:
            assert record["headers"]["authorization"][0].startswith("Bearer demo-demo-internal")
            assert record["headers"]["x-forwarded-for"] == [str(at.of("client-internal",
                                                                      "internal"))]

    def test_published_port_arrives_from_the_gateway(self, compose: Stack,
                                                     at: Addresses) -> None:
        """The host's published port reaches Envoy from the bridge gateway: external."""
        network = compose.topology.networks["internal"]
        gateway = network.gateways()[0].ip
        envoy = str(at.of("envoy", "internal"))
        since = len(compose.json_lines("sidecar"))
        response = compose.host_request(envoy, envoy_port(compose), http_request(
            "POST", "/mcp/internal", envoy, MCP_HEADERS, WHOAMI))
        assert (response.status, response.json()) == (404, {"error": "not_found"})
        for record in judged(compose, since, "internal"):
            assert (record["client_ip"], record["network"]) == (str(gateway), "external")


class TestLoadBalancer:
    """The `lb` profile: clients reach the LB, the LB reaches Envoy over `edge`."""

    @pytest.mark.parametrize("version", [4, 6])
    def test_internal_client_behind_lb_is_internal(self, compose: Stack, at: Addresses,
                                                   version: int) -> None:
        """The sidecar reads the client from the LB's X-Forwarded-For entry."""
        lb = at.of("lb", "internal", version)
        since = len(compose.json_lines("sidecar"))
        tools, whoami = use_server(compose, "client-internal", url(lb, 8080, "/mcp/internal"))
        assert tools == {"whoami", "add", "wait"}
        assert whoami["authorization"].startswith("Bearer demo-demo-internal-")
        records = judged(compose, since, "internal", 3)
        client = str(at.of("client-internal", "internal", version))
        trusted = str(at.of("lb", "edge"))  # lb.yaml reaches Envoy over IPv4
        assert {(r["peer"], r["client_ip"], r["client_ip_source"], r["network"])
                for r in records} <= {(trusted, client, "xff", "internal")}

    @pytest.mark.parametrize(
        "forged",
        [None, "{internal}", "{internal}, {lb}", "{internal},{internal}", ["{internal}", "{lb}"]],
        ids=["none", "internal", "internal-and-lb", "twice", "two-headers"])
    def test_external_client_behind_lb_is_external(self, compose: Stack, at: Addresses,
                                                   forged: str | list[str] | None) -> None:
        """Whatever XFF an external client sends the LB, the LB's own entry names it."""
        values = [] if forged is None else [forged] if isinstance(forged, str) else forged
        headers = [("X-Forwarded-For", v.format(internal=at.of("client-internal", "internal"),
                                                lb=at.of("lb", "edge"))) for v in values]
        lb = str(at.of("lb", "external"))
        since = len(compose.json_lines("sidecar"))
        response = compose.request("client-external", lb, 8080, http_request(
            "POST", "/mcp/internal", lb, [*MCP_HEADERS, *headers], WHOAMI))
        assert (response.status, response.json()) == (404, {"error": "not_found"})
        for record in judged(compose, since, "internal"):
            assert record["client_ip"] == str(at.of("client-external", "external"))
            assert (record["client_ip_source"], record["network"]) == ("xff", "external")
            assert record["peer"] == str(at.of("lb", "edge"))

    def test_external_client_behind_lb_uses_public(self, compose: Stack, at: Addresses) -> None:
        """Through the LB an external client still uses the public server."""
        lb = at.of("lb", "external")
        _, whoami = use_server(compose, "client-external", url(lb, 8080, "/mcp/public"))
        assert whoami["authorization"].startswith("Bearer demo-demo-public-")

    @pytest.mark.parametrize("forged", ["{internal}", "{internal}, {lb}", "{lb}"])
    def test_bypassing_the_lb_with_forged_xff_is_external(self, compose: Stack, at: Addresses,
                                                          forged: str) -> None:
        """Straight to Envoy, a forged XFF (even one naming the LB) is not believed."""
        xff = forged.format(internal=at.of("client-internal", "internal"),
                            lb=at.of("lb", "edge"))
        envoy = str(at.of("envoy", "external"))
        since = len(compose.json_lines("sidecar"))
        response = compose.request("client-external", envoy, envoy_port(compose), http_request(
            "POST", "/mcp/internal", envoy, [*MCP_HEADERS, ("X-Forwarded-For", xff)], WHOAMI))
        assert (response.status, response.json()) == (404, {"error": "not_found"})
        for record in judged(compose, since, "internal"):
            assert (record["client_ip"], record["client_ip_source"]) == (
                str(at.of("client-external", "external")), "peer")


class TestControlPlaneIsEnvoys:
    """Whoever reaches the sidecar's gRPC listener could read every token (Check answers,
    SDS). On the compose networks only Envoy shares one with it, and even Envoy's namespace
    gets nothing there without the certificate the `certs` service made for Envoy."""

    def _probe(self, compose: Stack, service: str, host: str, *files: Path) -> dict[str, str]:
        """What a forged Check for the internal server, from the internal client's address,
        and an SDS stream for its token secret get."""
        peer = compose.topology.services["client-internal"].address("internal")
        argv = [sys.executable, "-m", "tests.topology.control_probe", host, "9191",
                "internal", str(peer), *map(str, files)]
        result = subprocess.run(netns_exec(compose.namespaces[service], argv), cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    @pytest.mark.parametrize("server", ["mcp-public", "mcp-internal"])
    def test_no_mcp_server_reaches_the_sidecar(self, compose: Stack, at: Addresses,
                                               server: str) -> None:
        sidecar = [str(at.of("sidecar", "control", version)) for version in (4, 6)]
        # (It listens on 0.0.0.0: IPv4 alone.)

        def attempts() -> list[str]:
            outcomes = []
            for host in sidecar:
                for port in (9191, 9192):
                    try:
                        with socket.create_connection((host, port), timeout=1):
                            outcomes.append(f"{host}:{port} connected")
                    except OSError as exc:
                        outcomes.append(f"{host}:{port} {type(exc).__name__}")
            return outcomes

        outcomes = compose.in_namespace(server, attempts)
        assert not any(outcome.endswith("connected") for outcome in outcomes), outcomes
        assert self._probe(compose, server, sidecar[0]) == {
            "check": "refused: UNAVAILABLE", "sds": "refused: UNAVAILABLE"}

    def test_only_envoys_certificate_gets_a_token(self, compose: Stack, at: Addresses) -> None:
        """From Envoy's own namespace: plaintext, and TLS without a client certificate, get
        no answer; Envoy's certificate gets the token (so the probe would see a leak)."""
        host = str(at.of("sidecar", "control", 4))
        certs = compose.workdir / "volumes" / "certs" / "envoy"
        refused = {"check": "refused: UNAVAILABLE", "sds": "refused: UNAVAILABLE"}
        assert self._probe(compose, "envoy", host) == refused
        # The sidecar's certificate names it "sidecar", as Envoy dials it.
        assert self._probe(compose, "envoy", "sidecar", certs / "ca.pem") == refused
        assert self._probe(compose, "envoy", "sidecar", certs / "ca.pem", certs / "envoy.pem",
                           certs / "envoy.key") == {"check": "token", "sds": "token"}
