"""The token exchange step as Envoy meets it: CheckRequests carrying jwt_authn's verified
payload and the caller's Authorization, answered by a running sidecar exchanging with a real
token endpoint on loopback (tests/token_endpoint.py answers RFC 8693)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.contract import JWT_FILTER
from ext_authz.ops.decision_log import DecisionLog
from ext_authz.server import Sidecar
from tests.conftest import make_config
from tests.test_exchange import jwt
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

ISSUER = "https://idp.example"
HOST = "gw.example:8080"
METADATA_URL = f"http://{HOST}/.well-known/oauth-protected-resource/mcp/crm"


def config(token_url: str, **extra: Any) -> Any:
    exchange = {"token_url": token_url, "client_id": "gateway", "client_secret": "s",
                "audience": "crm"}
    return make_config(
        jwt={"issuer": ISSUER, "jwks_file": "/etc/jwks.json"},
        tokens={"retry_initial_s": 0.2, "retry_max_s": 0.2},
        servers={"crm": {"token_exchange": exchange},
                 "hidden": {"available_on_public_internet": False, "token_exchange": exchange}},
        **extra)


def check(path: str = "/mcp/crm", *, token: str | None = None,
          verified: dict[str, Any] | None = None, peer: str = "127.0.0.2",
          server: str = "crm", kind: str = "mcp") -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it: the Authorization header as the caller wrote it,
    and the payload jwt_authn verified (None: it verified none)."""
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = peer
    http = attributes.request.http
    http.method, http.path, http.host = "GET", path, HOST
    http.headers.update({":path": path, ":authority": HOST})
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    attributes.context_extensions.update({"mcp_server": server, "mcp_ext_authz_kind": kind})
    if verified is not None:
        attributes.metadata_context.filter_metadata[JWT_FILTER].CopyFrom(json_format.ParseDict(
            {"mcp_ext_authz": verified}, struct_pb2.Struct()))
    return request


def user(sub: str, lasts: float = 3600) -> tuple[str, dict[str, Any]]:
    """A caller's token and the payload Envoy verified of it."""
    exp = int(time.time() + lasts)
    return jwt(sub, exp, ISSUER), {"iss": ISSUER, "sub": sub, "exp": exp}


def headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    which = response.WhichOneof("http_response")
    found = response.ok_response.headers if which == "ok_response" else (
        response.denied_response.headers)
    return {option.header.key: option.header.value for option in found}


@pytest.fixture
async def running(token_endpoint: TokenEndpoint) -> AsyncIterator[
        tuple[external_auth_pb2_grpc.AuthorizationStub, TokenEndpoint, Sidecar]]:
    sidecar = Sidecar(config(token_endpoint.url), grace_s=1)
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            yield external_auth_pb2_grpc.AuthorizationStub(channel), token_endpoint, sidecar
    finally:
        await sidecar.stop()


async def test_the_callers_token_is_replaced_by_its_exchanged_one(running: Any) -> None:
    stub, idp, _ = running
    token, verified = user("alice")
    for _ in range(3):
        response = await stub.Check(check(token=token, verified=verified))
        assert response.status.code == 0
        sent = headers(response)["authorization"]
        assert sent.startswith("Bearer tx-alice-")
        assert token not in sent
    assert idp.exchanges == {"alice": 1}
    exchanged = response.dynamic_metadata["exchanged"]
    assert len(exchanged) == 64
    assert "alice" not in exchanged


@pytest.mark.parametrize(("why", "token", "verified", "challenge"), [
    ("no token", None, None, f'Bearer resource_metadata="{METADATA_URL}"'),
    ("not verified", "a.b.c", None,
     f'Bearer error="invalid_token", resource_metadata="{METADATA_URL}"'),
    ("not the one verified", user("mallory")[0], user("alice")[1],
     f'Bearer error="invalid_token", resource_metadata="{METADATA_URL}"'),
    ("expired", *user("alice", lasts=-60),
     f'Bearer error="invalid_token", resource_metadata="{METADATA_URL}"'),
])
async def test_a_subject_that_will_not_do_is_a_401_without_an_exchange(
        running: Any, why: str, token: str | None, verified: dict[str, Any] | None,
        challenge: str) -> None:
    stub, idp, _ = running
    response = await stub.Check(check(token=token, verified=verified))
    assert response.denied_response.status.code == 401, why
    assert json.loads(response.denied_response.body) == {"error": "subject_token_refused"}
    assert headers(response)["www-authenticate"] == challenge
    assert "authorization" not in headers(response)
    assert idp.count == 0


async def test_the_idp_refusing_the_subject_is_a_401_and_down_a_503(running: Any) -> None:
    stub, idp, _ = running
    token, verified = user("alice")
    idp.mode, idp.status = "status", 400  # the endpoint's error code: none, so not a refusal
    response = await stub.Check(check(token=token, verified=verified))
    assert response.denied_response.status.code == 503
    assert "authorization" not in headers(response)
    bob, bob_verified = user("bob", lasts=-1)  # the IdP is never asked for an expired one
    assert (await stub.Check(check(token=bob, verified=bob_verified))
            ).denied_response.status.code == 401


async def test_a_hidden_exchange_server_is_a_404_whatever_the_token(running: Any) -> None:
    stub, idp, _ = running
    for token, verified in (user("alice"), (None, None)):
        response = await stub.Check(check("/mcp/hidden", token=token, verified=verified,
                                          server="hidden"))
        assert response.denied_response.status.code == 404
        assert "www-authenticate" not in headers(response)
    assert idp.count == 0


async def test_its_metadata_is_the_gateways(running: Any) -> None:
    stub, _, _ = running
    response = await stub.Check(check("/.well-known/oauth-protected-resource/mcp/crm",
                                      kind="discovery"))
    assert response.denied_response.status.code == 200
    assert json.loads(response.denied_response.body) == {
        "resource": f"http://{HOST}/mcp/crm", "authorization_servers": [ISSUER],
        "bearer_methods_supported": ["header"]}


async def test_an_eviction_by_key_exchanges_again(running: Any) -> None:
    stub, idp, sidecar = running
    token, verified = user("alice")
    first = await stub.Check(check(token=token, verified=verified))
    assert sidecar.exchanges.evict_key(first.dynamic_metadata["exchanged"])
    second = await stub.Check(check(token=token, verified=verified))
    assert headers(second)["authorization"] != headers(first)["authorization"]
    assert idp.exchanges == {"alice": 2}


@pytest.mark.parametrize("include", [False, True])
async def test_the_decision_log_names_the_subject_only_when_asked(
        token_endpoint: TokenEndpoint, include: bool) -> None:
    sidecar = Sidecar(config(token_endpoint.url, decision_log={"include_subject": include}),
                      grace_s=1)
    stream = io.StringIO()
    sidecar.serving.decision_log = DecisionLog(stream)
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            token, verified = user("alice")
            await stub.Check(check(token=token, verified=verified))
    finally:
        await sidecar.stop()
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["reason"] == "allowed"
    assert ("sub" in line) is include
    assert token not in stream.getvalue()
    assert "tx-alice" not in stream.getvalue()


@pytest.fixture(scope="module")
def idp_thread() -> Iterator[TokenEndpoint]:
    """A token endpoint on a loop of its own (hypothesis runs each example in a loop of the
    test's)."""
    with ThreadedTokenEndpoint() as endpoint:
        yield endpoint


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["alice", "bob", "carol"]),
                          st.sampled_from(["mine", "none", "other's", "expired"])),
                min_size=1, max_size=12))
def test_a_sequence_never_passes_a_callers_token_and_exchanges_each_user_once(
        idp_thread: TokenEndpoint, steps: list[tuple[str, str]]) -> None:
    """Whatever the order of users and of tokens that will not do: an allowed check carries
    that user's exchanged token and nothing of any caller's; each user is exchanged once."""
    idp = idp_thread
    idp.exchanges.clear()

    async def run() -> None:
        sidecar = Sidecar(config(idp.url), grace_s=1)
        await sidecar.start()
        try:
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                tokens = {name: user(name) for name in ("alice", "bob", "carol")}
                expected: set[str] = set()
                for name, how in steps:
                    token, verified = tokens[name]
                    if how == "none":
                        verified = None
                    elif how == "other's":
                        verified = tokens["carol" if name != "carol" else "alice"][1]
                    elif how == "expired":
                        token, verified = user(name, lasts=-5)
                    response = await stub.Check(check(token=token, verified=verified))
                    sent = headers(response).get("authorization", "")
                    assert not any(t in sent for t, _ in tokens.values())
                    if how == "mine":
                        expected.add(name)
                        assert sent.startswith(f"Bearer tx-{name}-")
                    else:
                        assert response.denied_response.status.code == 401
                        assert sent == ""
                assert idp.exchanges == dict.fromkeys(expected, 1)
        finally:
            await sidecar.stop()

    asyncio.run(run())
