"""Per-user upstream credentials (RFC 8693) through Envoy, in both data paths.

A real authorization server (Authlib's, with a token-exchange grant: tests/exchange_idp.py)
exchanges each caller's JWT, which Envoy's jwt_authn verified, for a token naming that user.
One sidecar; an Envoy per data path. `crm` is the official MCP SDK's server (its `whoami`
tool shows the Authorization it got), its client authenticating with a secret; `files` is a
resource server that checks the IdP's tokens (401 for a revoked one), its client with
private_key_jwt and the gateway's own token as the actor. The exchange cache is the
sidecar's, shared by both Envoys: each data path has users of its own.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from ext_authz.demo.mcp_server import redact_authorization
from ext_authz.render.options import DATA_PATHS
from tests.e2e.harness import (
    Process,
    envoy_config,
    free_port,
    mcp_client,
    raw_request,
    start_envoy,
    start_sidecar,
    start_upstream,
)
from tests.exchange_idp import Client, IdP, ResourceServer
from tests.jwt_issuer import Issuer, b64

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

EXTERNAL = "127.0.0.2"
LOGIN, AUDIENCE = "https://login.test.local", "mcp-gateway"
PRM = "/.well-known/oauth-protected-resource"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@dataclass
class Stack:
    bases: dict[str, str]
    users: Issuer
    stranger: Issuer  # the same issuer's name and kid, another key
    idp: IdP
    files: ResourceServer
    crm: Process
    sidecar: Process
    config: Path
    admin: str

    def get(self, mode: str, path: str, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        transport = httpx.HTTPTransport(local_address=EXTERNAL)
        with httpx.Client(transport=transport, timeout=15) as http:
            return http.get(self.bases[mode] + path, headers=headers)

    def user(self, name: str, **claims: Any) -> str:
        return self.users.token(sub=name, **claims)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("exchange")
    ports = {name: free_port() for name in ("grpc", "admin", "crm", *[
        f"{mode}_{what}" for mode in DATA_PATHS for what in ("envoy", "admin")])}
    users = Issuer("login-key", LOGIN, AUDIENCE)
    stranger = Issuer("login-key", LOGIN, AUDIENCE)
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(users.jwks()))
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    (workdir / "gateway-key.pem").write_text(pem)
    (workdir / "secret").write_text("gateway-secret\n")
    idp = IdP(users.jwks(), LOGIN, AUDIENCE, [
        Client("gateway", "client_secret_basic", secret="gateway-secret"),
        Client("gateway-key", "private_key_jwt",
               public_key=ECKey.import_key(pem).as_dict(private=False))]).start()
    files = ResourceServer(idp).start()
    config = {
        "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
        "network": {"internal_ranges": ["127.0.0.1/32"]},
        "decision_log": {"include_subject": True},
        "tokens": {"retry_initial_s": 0.2},
        "jwt": {"issuer": LOGIN, "audiences": [AUDIENCE], "jwks_file": str(jwks)},
        "servers": {
            "crm": {"upstream": f"127.0.0.1:{ports['crm']}", "token_exchange": {
                "token_url": idp.token_url, "client_id": "gateway",
                "client_secret_file": str(workdir / "secret"),
                "audience": "crm", "scopes": ["crm.read"]}},
            "files": {"upstream": f"127.0.0.1:{files.port}", "token_exchange": {
                "token_url": idp.token_url, "client_id": "gateway-key",
                "auth_method": "private_key_jwt",
                "private_key_file": str(workdir / "gateway-key.pem"),
                "resource": "https://files.internal", "actor_token": True}},
            # Hidden from every caller of these tests (they come from 127.0.0.2).
            "vault": {"upstream": f"127.0.0.1:{files.port}",
                      "available_on_public_internet": False, "token_exchange": {
                          "token_url": idp.token_url, "client_id": "gateway",
                          "client_secret_file": str(workdir / "secret")}},
        },
    }
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    processes: list[Process] = []
    try:
        crm = start_upstream("crm", ports["crm"], workdir)
        processes.append(crm)
        sidecar = start_sidecar(config_path, workdir)
        processes.append(sidecar)
        crm.wait_http(f"http://127.0.0.1:{ports['crm']}/mcp/x/echo")
        sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
        for mode in DATA_PATHS:
            bootstrap = envoy_config(
                config_path, "--data-path", mode,
                "--listen", f"127.0.0.1:{ports[f'{mode}_envoy']}",
                "--admin", f"127.0.0.1:{ports[f'{mode}_admin']}")
            processes.append(start_envoy(bootstrap, workdir, ports[f"{mode}_admin"],
                                         name=f"envoy-{mode}"))
        bases = {mode: f"http://127.0.0.1:{ports[f'{mode}_envoy']}" for mode in DATA_PATHS}
        for mode in DATA_PATHS:  # the native Envoy's listener comes over ADS
            deadline = time.monotonic() + 15
            while httpx.get(bases[mode] + "/mcp/nothing").status_code != 404:
                assert time.monotonic() < deadline, f"{mode}: no listener"
                time.sleep(0.1)
        yield Stack(bases, users, stranger, idp, files, crm, sidecar, config_path,
                    f"http://127.0.0.1:{ports['admin']}")
    finally:
        for process in reversed(processes):
            process.stop()
        files.stop()
        idp.stop()


@pytest.fixture
def idp_up(stack: Stack) -> Generator[None, None, None]:
    yield
    if not stack.idp.up:
        stack.idp.start()


async def whoami(stack: Stack, mode: str, token: str) -> dict[str, Any]:
    """What crm's `whoami` tool says it got, called through the gateway by the official
    MCP client with the caller's token."""
    import httpx2

    class Bearer(httpx2.Auth):  # type: ignore[misc]
        def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
            request.headers["authorization"] = f"Bearer {token}"
            yield request

    async with mcp_client(f"{stack.bases[mode]}/mcp/crm", EXTERNAL, auth=Bearer()) as mcp:
        result = await mcp.call_tool("whoami", {})
        assert not result.is_error, result
        return dict(result.structured_content or json.loads(result.content[0].text))


@pytest.mark.parametrize("mode", DATA_PATHS)
class TestPerUser:
    async def test_two_users_get_their_own_tokens_exchanged_once_each(
            self, stack: Stack, mode: str) -> None:
        seen = {}
        for name in (f"alice-{mode}", f"bob-{mode}"):
            token = stack.user(name)
            got = await whoami(stack, mode, token)
            scheme, _, upstream_token = got["authorization"].partition(" ")
            assert scheme == "Bearer"
            assert upstream_token != token
            claims = claims_of(upstream_token)
            assert (claims["sub"], claims["aud"], claims["scope"]) == (name, "crm", "crm.read")
            seen[name] = upstream_token
            # A whole MCP session (discovery or initialize, the call) and one more call:
            # the IdP exchanged this user's token once.
            assert (await whoami(stack, mode, token))["authorization"] == got["authorization"]
            assert stack.idp.exchanges[name] == 1
        assert len(set(seen.values())) == 2

    def test_the_callers_own_token_never_reaches_the_upstream(
            self, stack: Stack, mode: str) -> None:
        token = stack.user(f"carol-{mode}")
        assert stack.get(mode, "/mcp/files/report", token).status_code == 200
        assert stack.get(mode, "/mcp/crm/echo", token).status_code == 200
        assert token not in stack.files.seen
        assert f"Bearer {token}" not in stack.files.seen
        for authorization in stack.files.seen:
            stack.idp.verify(authorization.removeprefix("Bearer "))  # the IdP's, every one
        logged = [value for record in stack.crm.json_lines()
                  for value in record.get("headers", {}).get("authorization", [])]
        assert logged
        assert redact_authorization(f"Bearer {token}") not in logged
        # What the log keeps of a token is its head, the IdP's (typ at+jwt), never the
        # caller's (an RS256 JWT's).
        assert set(logged) == {redact_authorization(stack.files.seen[-1])}

    def test_a_subject_token_that_will_not_do_is_401_and_never_exchanged(
            self, stack: Stack, mode: str) -> None:
        now = int(time.time())
        unsigned = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." + b64(
            json.dumps({"iss": LOGIN, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600})
            .encode()) + "."
        refused = {
            "expired": stack.user("mallory", exp=now - 120),
            "foreign key": stack.stranger.token(sub="mallory"),
            "other audience": stack.user("mallory", aud="another-gateway"),
            "unsigned": unsigned,
            "not a JWT": "opaque-token",
        }
        before = sum(stack.idp.exchanges.values())
        metadata = f"{stack.bases[mode]}/.well-known/oauth-protected-resource/mcp/files"
        for why, token in refused.items():
            answer = stack.get(mode, "/mcp/files/report", token)
            assert answer.status_code == 401, why
            assert answer.json() == {"error": "subject_token_refused"}, why
            assert answer.headers["www-authenticate"] == (
                f'Bearer error="invalid_token", resource_metadata="{metadata}"'), why
        none = stack.get(mode, "/mcp/files/report")
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == f'Bearer resource_metadata="{metadata}"'
        assert sum(stack.idp.exchanges.values()) == before
        assert "mallory" not in stack.idp.exchanges
        # The document the challenge names: the gateway is the resource, the login issuer
        # its authorization server.
        document = httpx.get(metadata)
        assert document.status_code == 200
        assert document.json() == {"resource": f"{stack.bases[mode]}/mcp/files",
                                   "authorization_servers": [LOGIN],
                                   "bearer_methods_supported": ["header"]}

    def test_idp_down_is_503_and_held_tokens_still_serve(
            self, stack: Stack, mode: str, idp_up: None) -> None:
        held = stack.user(f"dana-{mode}")
        assert stack.get(mode, "/mcp/files/report", held).status_code == 200
        stack.idp.stop()
        down = stack.get(mode, "/mcp/files/report", stack.user(f"erin-{mode}"))
        assert down.status_code == 503
        assert down.json() == {"error": "upstream_credentials_unavailable"}
        assert stack.get(mode, "/mcp/files/report", held).status_code == 200  # a hit
        stack.idp.start()
        time.sleep(0.3)  # past erin's backoff (tokens.retry_initial_s)
        assert stack.get(mode, "/mcp/files/report", stack.user(f"erin-{mode}")
                         ).status_code == 200

    def test_an_upstream_401_evicts_and_the_next_request_exchanges_once(
            self, stack: Stack, mode: str) -> None:
        name = f"frank-{mode}"
        token = stack.user(name)
        first = stack.get(mode, "/mcp/files/report", token)
        assert first.status_code == 200
        assert stack.idp.exchanges[name] == 1
        stack.idp.revoked.add(stack.files.seen[-1].removeprefix("Bearer "))
        refused = stack.get(mode, "/mcp/files/report", token)
        assert refused.status_code == 401
        # The upstream's own challenge (its metadata URL) is nothing a caller can act on.
        assert "www-authenticate" not in refused.headers
        for _ in range(3):
            assert stack.get(mode, "/mcp/files/report", token).status_code == 200
        assert stack.idp.exchanges[name] == 2

    @pytest.mark.parametrize("late_body", [False, True], ids=["whole", "body-late"])
    @pytest.mark.parametrize("template", ["/mcp/{server}", f"{PRM}/mcp/{{server}}"])
    def test_a_hidden_exchange_server_answers_as_an_unknown_one(
            self, stack: Stack, mode: str, template: str, late_body: bool) -> None:
        """With a good token, a bad one or none: byte for byte the unknown server's 404,
        and the IdP never asked."""
        before = sum(stack.idp.exchanges.values())
        for token in (stack.user(f"kim-{mode}"), "a.b.c", None):
            headers = {"content-type": "application/json",
                       **({"authorization": f"Bearer {token}"} if token else {})}
            hidden, unknown = (raw_request(stack.bases[mode], "POST",
                                           template.format(server=server), "{}", headers,
                                           EXTERNAL, late_body)
                               for server in ("vault", "nope"))
            assert hidden == unknown
            assert hidden[0] == 404
        assert sum(stack.idp.exchanges.values()) == before

    def test_private_key_jwt_and_the_gateways_actor_token(self, stack: Stack,
                                                          mode: str) -> None:
        name = f"grace-{mode}"
        answer = stack.get(mode, "/mcp/files/report", stack.user(name))
        assert answer.status_code == 200
        claims = answer.json()  # the resource server's reading of the token it got
        assert claims["sub"] == name
        assert claims["aud"] == "https://files.internal"
        assert claims["client_id"] == "gateway-key"
        assert claims["act"] == {"sub": "gateway-key"}  # the gateway acts for grace
        assert "private_key_jwt" in stack.idp.auth_methods
        assert "client_secret_basic" in stack.idp.auth_methods  # crm's client


def test_the_decision_log_names_the_subject_and_no_token(stack: Stack) -> None:
    name = "heidi"
    assert stack.get(DATA_PATHS[0], "/mcp/files/report", stack.user(name)).status_code == 200
    assert stack.sidecar.last_line("sub", name)["reason"] == "allowed"
    assert "eyJ" not in stack.sidecar.output()  # no JWT, of the caller's or the IdP's
    metrics = httpx.get(f"{stack.admin}/metrics").text
    assert 'mcp_ext_authz_token_exchanges_total{outcome="hit",server="crm"}' in metrics
    assert 'mcp_ext_authz_token_exchanges_total{outcome="miss",server="files"}' in metrics
    assert name not in metrics


def test_check_exchanges_a_subject_token_and_prints_neither(stack: Stack,
                                                            tmp_path: Path) -> None:
    token_file = tmp_path / "subject.jwt"
    token_file.write_text(stack.user("ivan") + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "ext_authz", "check", "--config", str(stack.config),
         "--peer", EXTERNAL, "--path", "/mcp/files/report", "--host", "gateway",
         "--subject-token", str(token_file), "--fetch-token"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "eyJ" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["reason"] == "allowed"
    assert report["inject_token"] is True
    steps = {step["step"]: step for step in report["token"]["steps"]}
    assert steps["subject"]["sub"] == "ivan"
    assert steps["subject"]["issuer"] == LOGIN
    assert steps["client_credentials"]["fetched"]  # the actor token
    assert steps["token_exchange"]["fetched"]
    assert steps["token_exchange"]["actor_token"]
    assert stack.idp.exchanges["ivan"] == 1
