"""The registry and OAuth discovery through a real Envoy running `envoy-config` output.

Servers: `pub` (public, with a title), `billing` (internal, visible to partners), both the
demo MCP server; `secure` (internal-only), the official Python SDK server that wants its
caller's own token, beside its authorization server (tests/e2e/auth_upstream.py); and `tok`,
the same upstream but with the gateway injecting a token of its own (oauth2), which that
upstream does not accept. Callers: 127.0.0.1 internal, 127.0.0.2 external, 127.0.0.3 in the
`partners` network.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from ext_authz.policy.compile import Policy
from ext_authz.policy.config import parse_config
from ext_authz.policy.network import Placement
from ext_authz.render.options import DATA_PATHS
from tests.e2e.harness import (
    ROOT,
    Process,
    envoy_config,
    free_port,
    mcp_client,
    raw_request,
    start_envoy,
    start_sidecar,
    start_upstream,
    wait_healthy,
)
from tests.token_endpoint import ThreadedTokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERNAL, EXTERNAL, PARTNER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
CLIENT_ID, CLIENT_SECRET = "mcp-client", "mcp-client-secret"
PRM = "/.well-known/oauth-protected-resource"
MCP_HEADERS = {"content-type": "application/json",
               "accept": "application/json, text/event-stream"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "curl", "version": "1"}}}


@dataclass
class Stack:
    base: str
    config: dict[str, Any]
    upstream: Process
    rs_port: int
    as_port: int

    def get(self, source: str, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as http:
            return http.get(f"{self.base}{path}", **kwargs)

    def post(self, source: str, path: str, body: Any, **headers: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as http:
            return http.post(f"{self.base}{path}", json=body, headers={**MCP_HEADERS,
                                                                         **headers})

    def upstream_requests(self) -> list[dict[str, Any]]:
        return self.upstream.json_lines()


@pytest.fixture(scope="module", params=DATA_PATHS)
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Once per data path: the native one decides visibility in Envoy, and asks the sidecar
    only for the registry and the discovery documents."""
    workdir = tmp_path_factory.mktemp(f"discovery-{request.param}")
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin", "pub",
                                             "billing", "rs", "as")}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        try:
            upstream = Process("upstream-secure", [
                sys.executable, str(ROOT / "tests/e2e/auth_upstream.py"), "--name", "secure",
                "--port", str(ports["rs"]), "--as-port", str(ports["as"]),
                "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET], workdir)
            processes.append(upstream)
            for name in ("pub", "billing"):
                processes.append(start_upstream(name, ports[name], workdir))
            config: dict[str, Any] = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32"],
                            "networks": {"partners": ["127.0.0.3/32"]}},
                "servers": {
                    "pub": {"title": "Public tools", "description": "whoami, add and wait.",
                            "upstream": f"127.0.0.1:{ports['pub']}"},
                    "billing": {"available_on_public_internet": False,
                                "visible_to": ["partners"],
                                "upstream": f"127.0.0.1:{ports['billing']}"},
                    "secure": {"available_on_public_internet": False,
                               "title": "Needs your own token",
                               "upstream": f"127.0.0.1:{ports['rs']}"},
                    "tok": {"available_on_public_internet": False,
                            "upstream": f"http://127.0.0.1:{ports['rs']}/mcp/secure",
                            "oauth2": {"token_url": tokens.url, "client_id": "gateway",
                                       "client_secret": "gateway-secret"}},
                },
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            bootstrap = envoy_config(
                config_path, "--listen", f"127.0.0.1:{ports['envoy']}",
                "--admin", f"127.0.0.1:{ports['envoy_admin']}", "--data-path", request.param)
            sidecar = start_sidecar(config_path, workdir)
            processes.append(sidecar)
            upstream.wait_http(f"http://127.0.0.1:{ports['rs']}{PRM}/mcp/secure")
            for name in ("pub", "billing"):
                processes[-1].wait_port(ports[name])
            sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
            processes.append(start_envoy(bootstrap, workdir,
                                         ports["envoy_admin"]))
            wait_healthy(ports["envoy_admin"])
            yield Stack(f"http://127.0.0.1:{ports['envoy']}", config, upstream, ports["rs"],
                        ports["as"])
        finally:
            for process in reversed(processes):
                process.stop()


def without(config: dict[str, Any], *hidden: str) -> Policy:
    """The policy of the same gateway configured without some servers."""
    smaller = json.loads(json.dumps(config))
    for name in hidden:
        del smaller["servers"][name]
    for server in smaller["servers"].values():
        server.get("oauth2", {}).pop("client_secret", None)
        if "oauth2" in server:
            server["oauth2"]["client_secret"] = "x"
    return Policy.from_config(parse_config(smaller, env={}))


class TestRegistry:
    @pytest.mark.parametrize(("source", "hidden", "members"), [
        (INTERNAL, (), {"internal"}),
        (PARTNER, ("secure", "tok"), {"partners"}),
        (EXTERNAL, ("billing", "secure", "tok"), set()),
    ], ids=["internal", "partner", "external"])
    def test_lists_the_visible_servers(self, stack: Stack, source: str, hidden: tuple[str, ...],
                                       members: set[str]) -> None:
        """Byte for byte the registry of a gateway configured without the hidden servers."""
        response = stack.get(source, "/mcp")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        expected = without(stack.config, *hidden).registry(
            Placement("", frozenset(members)))
        assert response.content == expected
        listed = [s["name"] for s in response.json()["servers"]]
        assert listed == [n for n in ("pub", "billing", "secure", "tok") if n not in hidden]
        assert response.json()["servers"][0] == {
            "name": "pub", "title": "Public tools", "description": "whoami, add and wait.",
            "path": "/mcp/pub"}

    def test_other_methods_are_an_unknown_path(self, stack: Stack) -> None:
        """Only GET lists: a POST to /mcp gets what any unknown path gets."""
        post = stack.post(INTERNAL, "/mcp", INITIALIZE)
        unknown = stack.post(INTERNAL, "/mcp/nope", INITIALIZE)
        assert post.status_code == unknown.status_code == 404
        assert post.content == unknown.content


class TestDiscoveryFlow:
    def test_an_internal_caller_discovers_and_calls(self, stack: Stack) -> None:
        """The MCP SDK client: 401, the gateway's metadata, the token, the call."""
        before = len(stack.upstream_requests())
        result = asyncio.run(_call_with_own_token(stack.base, INTERNAL, "secure",
                                                  f"http://127.0.0.1:{stack.as_port}"))
        assert result.structured_content["server"] == "secure"
        assert result.structured_content["authorization"].startswith("Bearer at-")
        seen = [(r["upstream"], r["method"], r["path"])
                for r in stack.upstream_requests()[before:]]
        # Through Envoy: the refused call, then the metadata (at the upstream's own path);
        # directly: the authorization server's metadata and token; then the calls.
        assert seen[:4] == [("mcp", "POST", "/mcp/secure"),
                            ("mcp", "GET", f"{PRM}/mcp/secure"),
                            ("as", "GET", "/.well-known/oauth-authorization-server"),
                            ("as", "POST", "/token")]
        assert seen[4:]
        assert all(s == ("mcp", "POST", "/mcp/secure") for s in seen[4:])

    def test_the_challenge_names_the_gateway(self, stack: Stack) -> None:
        """The upstream's 401 keeps its parameters; its metadata URL becomes the gateway's."""
        response = stack.post(INTERNAL, "/mcp/secure", INITIALIZE)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == (
            'Bearer error="invalid_token", error_description="Authentication required", '
            f'resource_metadata="{stack.base}{PRM}/mcp/secure"')

    def test_the_metadata_names_the_gateway(self, stack: Stack) -> None:
        """RFC 9728's check: `resource` is the URL the client called, at the gateway."""
        through = stack.get(INTERNAL, f"{PRM}/mcp/secure")
        direct = httpx.get(f"http://127.0.0.1:{stack.rs_port}{PRM}/mcp/secure", timeout=10)
        assert through.status_code == direct.status_code == 200
        assert through.json() == {**direct.json(), "resource": f"{stack.base}/mcp/secure"}
        assert direct.json()["resource"] == f"http://127.0.0.1:{stack.rs_port}/mcp/secure"
        assert int(through.headers["content-length"]) == len(through.content)

    def test_the_host_the_caller_used_is_named(self, stack: Stack) -> None:
        """The resource follows the caller's Host (a client checks it against its own URL);
        its scheme is the connection's, which Envoy, at the edge, writes over a caller's
        X-Forwarded-Proto (behind a trusted load balancer, that one's says)."""
        port = stack.base.rsplit(":", 1)[1]
        through = stack.get(INTERNAL, f"{PRM}/mcp/secure",
                            headers={"host": f"localhost:{port}",
                                     "x-forwarded-proto": "https"})
        assert through.json()["resource"] == f"http://localhost:{port}/mcp/secure"


# Hosts whose origin cannot be said (routing.origin): another host in disguise, a list, too
# long. The SDK server's DNS-rebinding check would refuse them: these go to its metadata path.
UNSAYABLE_HOSTS = ["gw%2eexample", "user@gw", "a,b", "g" * 300]


class TestUnsayableOrigins:
    @pytest.mark.parametrize("host", UNSAYABLE_HOSTS, ids=["percent", "userinfo", "comma", "long"])
    def test_no_document_names_the_upstream(self, stack: Stack, host: str) -> None:
        """Where the gateway URL the caller used cannot be said, a visible server's metadata
        is the unknown server's answer: never the upstream's document, which names its own
        internal URLs."""
        visible = stack.get(INTERNAL, f"{PRM}/mcp/secure", headers={"host": host})
        unknown = stack.get(INTERNAL, f"{PRM}/mcp/nope", headers={"host": host})
        assert visible.status_code == unknown.status_code
        assert visible.status_code in (400, 404)  # Envoy may refuse the Host itself
        assert visible.content == unknown.content
        assert f":{stack.rs_port}" not in visible.text
        assert f":{stack.as_port}" not in visible.text

    def test_a_challenge_without_an_origin_has_no_dangling_comma(self, stack: Stack) -> None:
        """An upstream's 401 where the origin cannot be said: its metadata URL is dropped
        with the comma that joined it, and every other parameter stays."""
        response = stack.post(INTERNAL, "/mcp/secure", INITIALIZE, host="a,b")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == (
            'Bearer error="invalid_token", error_description="Authentication required"')


HIDDEN_PATHS = [
    f"{PRM}/mcp/{{server}}", f"{PRM}/mcp/{{server}}/", f"{PRM}/mcp/{{server}}?x=1",
    f"{PRM}/mcp/{{server}}/mcp", "/.well-known/oauth-authorization-server/mcp/{server}",
    "/.well-known/openid-configuration/mcp/{server}", "/mcp/{server}",
    "/mcp/{server}/.well-known/oauth-protected-resource",
]


class TestHiddenServers:
    @pytest.mark.parametrize("template", HIDDEN_PATHS)
    def test_every_discovery_path_is_the_unknown_servers_404(self, stack: Stack,
                                                             template: str) -> None:
        """An external caller cannot tell `secure` from a server that does not exist."""
        hidden = stack.get(EXTERNAL, template.format(server="secure"))
        unknown = stack.get(EXTERNAL, template.format(server="nope"))
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.content == unknown.content
        assert sorted(hidden.headers.keys()) == sorted(unknown.headers.keys())

    def test_the_root_metadata_path_names_no_server(self, stack: Stack) -> None:
        """Several servers share the gateway's origin: the root form is everyone's 404."""
        for source in (INTERNAL, EXTERNAL):
            response = stack.get(source, PRM)
            assert response.status_code == 404


class TestInjectedTokens:
    def test_no_discovery_where_the_gateway_holds_the_token(self, stack: Stack) -> None:
        """`tok` is visible to this caller, but its metadata path is an unknown server's."""
        tok = stack.get(INTERNAL, f"{PRM}/mcp/tok")
        unknown = stack.get(INTERNAL, f"{PRM}/mcp/nope")
        assert tok.status_code == unknown.status_code == 404
        assert tok.content == unknown.content

    def test_the_upstreams_challenge_is_not_passed_on(self, stack: Stack) -> None:
        """The upstream refuses the gateway's token: 401, with no URL of the upstream's."""
        response = stack.post(INTERNAL, "/mcp/tok", INITIALIZE)
        assert response.status_code == 401
        assert "www-authenticate" not in response.headers


class _Storage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def _call_with_own_token(base: str, source: str, server: str, issuer: str) -> Any:
    url = f"{base}/mcp/{server}"
    auth = ClientCredentialsOAuthProvider(
        server_url=url, storage=_Storage(), client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        scope="mcp", issuer=issuer)
    async with mcp_client(url, source, auth=auth) as mcp:
        return await mcp.call_tool("whoami", {})


class TestAnyMethodAndBody:
    @pytest.mark.parametrize("late_body", [False, True], ids=["whole", "body-late"])
    @pytest.mark.parametrize("template", [f"{PRM}/mcp/{{server}}", "/mcp/{server}"])
    @pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
    def test_a_hidden_server_answers_as_an_unknown_one(self, stack: Stack, template: str,
                                                       method: str, late_body: bool) -> None:
        """Whatever the method and body, headers included (`connection: close` among them):
        `secure` (hidden from outside) and a server that does not exist answer alike."""
        hidden, unknown = (raw_request(stack.base, method, template.format(server=server),
                                       json.dumps(INITIALIZE), MCP_HEADERS, EXTERNAL,
                                       late_body) for server in ("secure", "nope"))
        assert hidden == unknown
        assert hidden[0] == 404
