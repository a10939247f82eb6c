"""Who, not only where: SPIFFE principals and JWT claims in network rules, through Envoy.

One sidecar; for each data path an Envoy from `envoy-config` whose listener requires client
certificates (minted here with SPIFFE URI SANs) and verifies JWTs (signed here; the JWKS is
a local file). Every caller connects from 127.0.0.2, which no address rule holds: only who
it is can let it see `billing`. Forged headers (an XFCC naming another workload, claims in
a header) and bad tokens (expired, another audience, another key) change nothing.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ext_authz.demo.certs import Authority
from ext_authz.render.options import DATA_PATHS
from tests.e2e.harness import (
    Process,
    envoy_config,
    free_port,
    mcp_client,
    start_envoy,
    start_sidecar,
    start_upstream,
)
from tests.jwt_issuer import Issuer, b64

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXTERNAL = "127.0.0.2"
TRUST_DOMAIN = "spiffe://test.local"
AGENT = f"{TRUST_DOMAIN}/ns/ai/sa/bot"
WEB = f"{TRUST_DOMAIN}/ns/web/sa/front"
DEEPER = f"{TRUST_DOMAIN}/ns/ai/sa/bot/extra"  # the wildcard is one segment, not a subtree
ISSUER, AUDIENCE = "https://idp.test.local", "mcp-gateway"


@dataclass
class Stack:
    bases: dict[str, str]
    ca: Path
    clients: dict[str, tuple[Path, Path]]
    issuer: Issuer
    stranger: Issuer  # signs with a key the JWKS does not hold
    sidecar: Process

    def tls(self, who: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        cert, key = self.clients[who]
        context.load_cert_chain(str(cert), str(key))
        return context

    async def tools(self, mode: str, who: str) -> set[str]:
        """The tools the official MCP SDK client lists, connecting as `who`."""
        async with mcp_client(f"{self.bases[mode]}/mcp/tooled", EXTERNAL,
                              verify=self.tls(who)) as mcp:
            return {tool.name for tool in (await mcp.list_tools()).tools}

    def get(self, mode: str, path: str, who: str, token: str | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        transport = httpx.HTTPTransport(local_address=EXTERNAL, verify=self.tls(who))
        with httpx.Client(transport=transport, timeout=10) as http:
            return http.get(self.bases[mode] + path, headers=sent)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("identities")
    ports = {name: free_port() for name in ("grpc", "admin", "upstream", "tooled", *[
        f"{mode}_{what}" for mode in DATA_PATHS for what in ("envoy", "admin")])}
    authority = Authority(workdir)
    server = authority.issue("gateway", ("127.0.0.1", "localhost"), client=False)
    clients = {who: authority.issue(who, (spiffe,), client=True)
               for who, spiffe in (("agent", AGENT), ("web", WEB), ("deeper", DEEPER))}
    issuer, stranger = (Issuer("test-key", ISSUER, AUDIENCE),
                        Issuer("test-key", ISSUER, AUDIENCE))
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    at = f"127.0.0.1:{ports['upstream']}"
    config = {
        "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
        "network": {"internal_ranges": ["127.0.0.1/32"], "networks": {
            "agents": {"principals": [f"{TRUST_DOMAIN}/ns/ai/sa/*"]},
            "partners": {"jwt_claims": {"group": "partners"}}}},
        "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)},
        "servers": {
            "pub": {"upstream": at},
            "billing": {"upstream": at, "available_on_public_internet": False,
                        "visible_to": ["agents", "partners"]},
            "vault": {"upstream": at, "available_on_public_internet": False},
            # A tool for agents only: judged on the body (ext_proc), from the networks the
            # server decision placed the caller in.
            "tooled": {"upstream": f"127.0.0.1:{ports['tooled']}",
                       "tools": {"add": {"available_on_public_internet": False,
                                         "visible_to": ["agents"]}}}},
    }
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    processes: list[Process] = []
    try:
        processes.append(start_upstream("any", ports["upstream"], workdir))
        processes.append(start_upstream("tooled", ports["tooled"], workdir))
        sidecar = start_sidecar(config_path, workdir)
        processes.append(sidecar)
        processes[0].wait_http(f"http://{at}/mcp/x/echo")
        processes[1].wait_http(f"http://127.0.0.1:{ports['tooled']}/mcp/x/echo")
        sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
        for mode in DATA_PATHS:
            bootstrap = envoy_config(
                config_path, "--data-path", mode,
                "--listen", f"127.0.0.1:{ports[f'{mode}_envoy']}",
                "--admin", f"127.0.0.1:{ports[f'{mode}_admin']}",
                "--listen-cert", str(server[0]), "--listen-key", str(server[1]),
                "--client-ca", str(authority.path))
            processes.append(start_envoy(bootstrap, workdir, ports[f"{mode}_admin"],
                                         name=f"envoy-{mode}"))
        bases = {mode: f"https://127.0.0.1:{ports[f'{mode}_envoy']}" for mode in DATA_PATHS}
        yield Stack(bases, authority.path, clients, issuer, stranger, sidecar)
    finally:
        for process in reversed(processes):
            process.stop()


def sees(response: httpx.Response) -> bool:
    if response.status_code == 404:
        assert response.json() == {"error": "not_found"}
        return False
    assert response.status_code == 200, response.text
    return True


@pytest.mark.parametrize("mode", DATA_PATHS)
class TestPrincipals:
    def test_a_workload_of_the_service_account_pattern(self, stack: Stack, mode: str) -> None:
        assert sees(stack.get(mode, "/mcp/billing/echo", "agent"))
        assert not sees(stack.get(mode, "/mcp/vault/echo", "agent"))  # not visible_to agents
        assert sees(stack.get(mode, "/mcp/pub/echo", "agent"))

    @pytest.mark.parametrize("who", ["web", "deeper"])
    def test_other_workloads(self, stack: Stack, mode: str, who: str) -> None:
        """Another namespace; and a path below the wildcard's one segment."""
        assert not sees(stack.get(mode, "/mcp/billing/echo", who))
        assert sees(stack.get(mode, "/mcp/pub/echo", who))

    def test_a_forged_client_cert_header_changes_nothing(self, stack: Stack, mode: str) -> None:
        forged = {"x-forwarded-client-cert": f"By={WEB};URI={AGENT};Hash=00",
                  "x-envoy-peer-metadata": "agent", "x-spiffe-id": AGENT}
        assert not sees(stack.get(mode, "/mcp/billing/echo", "web", headers=forged))

    def test_no_certificate_no_connection(self, stack: Stack, mode: str) -> None:
        context = ssl.create_default_context(cafile=str(stack.ca))
        transport = httpx.HTTPTransport(local_address=EXTERNAL, verify=context)
        with httpx.Client(transport=transport, timeout=5) as http, pytest.raises(
                httpx.TransportError):
            http.get(stack.bases[mode] + "/mcp/pub/echo")


@pytest.mark.parametrize("mode", DATA_PATHS)
class TestClaims:
    @pytest.mark.parametrize("group", ["partners", ["staff", "partners"]],
                             ids=["string", "array"])
    def test_a_verified_claim(self, stack: Stack, mode: str, group: Any) -> None:
        token = stack.issuer.token(group=group)
        assert sees(stack.get(mode, "/mcp/billing/echo", "web", token))
        assert not sees(stack.get(mode, "/mcp/vault/echo", "web", token))

    @pytest.mark.parametrize("bad", ["expired", "audience", "issuer", "key", "other-group",
                                     "unsigned"])
    def test_a_token_that_does_not_verify_carries_no_claims(self, stack: Stack, mode: str,
                                                             bad: str) -> None:
        """Not refused (it may be meant for an upstream): treated as carrying no claims."""
        claims: dict[str, Any] = {"group": "partners"}
        signer = stack.issuer
        if bad == "expired":
            claims["exp"] = int(time.time()) - 120
        elif bad == "audience":
            claims["aud"] = "someone-else"
        elif bad == "issuer":
            claims["iss"] = "https://evil.example"
        elif bad == "key":
            signer = stack.stranger
        elif bad == "other-group":
            claims["group"] = "partnersx"
        token = signer.token(**claims)
        if bad == "unsigned":
            head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            token = head + "." + token.split(".")[1] + "."
        assert not sees(stack.get(mode, "/mcp/billing/echo", "web", token))

    def test_claims_in_headers_change_nothing(self, stack: Stack, mode: str) -> None:
        payload = b64(json.dumps({"iss": ISSUER, "group": "partners"}).encode())
        forged = {"x-jwt-payload": payload, "x-mcp-ext-authz": payload,
                  "x-envoy-auth-jwt": payload}
        assert not sees(stack.get(mode, "/mcp/billing/echo", "web", headers=forged))

    def test_the_token_still_reaches_the_upstream(self, stack: Stack, mode: str) -> None:
        """Verified or not, a caller's own bearer passes on (an upstream may want it)."""
        token = stack.issuer.token(group="partners")
        seen = stack.get(mode, "/mcp/billing/echo", "web", token).json()
        assert seen["headers"]["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize("mode", DATA_PATHS)
async def test_tool_rules_follow_the_identity(stack: Stack, mode: str) -> None:
    """ext_proc judges the body from the networks the server decision placed the caller in,
    identities included: an agent lists `add`, another workload does not."""
    assert "add" in await stack.tools(mode, "agent")
    assert "add" not in await stack.tools(mode, "web")


def test_the_decision_log_names_what_matched(stack: Stack) -> None:
    stack.get("ext_authz", "/mcp/billing/echo", "agent")
    record = stack.sidecar.last_line("principal", AGENT)
    assert record["identity"] == f"agents by principal {TRUST_DOMAIN}/ns/ai/sa/*"
    assert record["network"] == "agents"
    assert record["client_ip"] == EXTERNAL
