"""The gRPC edge: a real grpc.aio server on 127.0.0.1:0, called over real channels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ext_authz._proto.envoy.config.core.v3 import base_pb2
from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.contract import AUTHZ_SERVICE as SERVICE_NAME
from ext_authz.policy import decision as decision_module
from ext_authz.policy.config import Config
from ext_authz.server import Sidecar
from tests.conftest import make_config
from tests.token_endpoint import TokenEndpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "envoy-1.40-check-request.bin"


def check_request(peer: str = "127.0.0.1", path: str = "/mcp/pub", xff: str | None = None,
                  **extensions: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = peer
    attributes.source.address.socket_address.port_value = 40000
    http = attributes.request.http
    http.method, http.path, http.host = "POST", path, "gw.example:8080"
    http.headers.update({":path": path, ":authority": "gw.example:8080", ":method": "POST",
                         "authorization": "Bearer caller-own"})
    if xff is not None:
        http.headers["x-forwarded-for"] = xff
    attributes.context_extensions.update(extensions)
    return request


async def start(config: Config) -> Sidecar:
    sidecar = Sidecar(config, grace_s=1)
    await sidecar.start()
    return sidecar


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    running = await start(make_config())
    yield running
    await running.stop()


@pytest.fixture
async def stub(sidecar: Sidecar) -> AsyncIterator[external_auth_pb2_grpc.AuthorizationStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    return dict(response.dynamic_metadata.items())


class TestDecisions:
    async def test_public_server_from_external(self, stub: Any) -> None:
        """A public server is visible to an external caller; nothing is injected."""
        response = await stub.Check(check_request(peer="127.0.0.2"))
        assert response.status.code == 0
        assert response.WhichOneof("http_response") == "ok_response"
        assert list(response.ok_response.headers) == []
        meta = metadata(response)
        assert meta["server"] == "pub"
        assert meta["network"] == "external"
        assert meta["client_ip"] == "127.0.0.2"
        assert meta["reason"] == "allowed"
        assert meta["decision_id"]

    async def test_internal_server_from_internal(self, stub: Any) -> None:
        """An internal caller sees an internal-only server."""
        response = await stub.Check(check_request(path="/mcp/priv/messages"))
        assert response.status.code == 0
        assert metadata(response)["network"] == "internal"

    async def test_hidden_and_unknown_are_indistinguishable(self, stub: Any) -> None:
        """Hidden and unknown servers answer 404 with byte-identical denied responses."""
        hidden = await stub.Check(check_request(peer="127.0.0.2", path="/mcp/priv"))
        unknown = await stub.Check(check_request(peer="127.0.0.2", path="/mcp/nope"))
        for response in (hidden, unknown):
            assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert response.denied_response.status.code == 404
            assert json.loads(response.denied_response.body) == {"error": "not_found"}
        assert (hidden.denied_response.SerializeToString()
                == unknown.denied_response.SerializeToString())
        assert hidden.status.SerializeToString() == unknown.status.SerializeToString()

    async def test_spoofed_xff_from_untrusted_peer(self, stub: Any) -> None:
        """An external peer claiming an internal address in XFF stays external."""
        response = await stub.Check(check_request(peer="127.0.0.2", path="/mcp/priv",
                                                  xff="127.0.0.1"))
        assert response.denied_response.status.code == 404

    async def test_trusted_proxy_forwarding_internal_client(self, stub: Any) -> None:
        """Through a trusted proxy, the rightmost untrusted XFF entry is the client."""
        inside = await stub.Check(check_request(peer="127.0.0.3", path="/mcp/priv",
                                                xff="127.0.0.1"))
        forged = await stub.Check(check_request(peer="127.0.0.3", path="/mcp/priv",
                                                xff="127.0.0.1, 127.0.0.2"))
        assert inside.status.code == 0
        assert forged.denied_response.status.code == 404
        assert metadata(forged)["client_ip"] == "127.0.0.2"

    async def test_context_extension_wins_over_path(self, stub: Any) -> None:
        """The route's context extension names the server; the path is not consulted."""
        response = await stub.Check(check_request(peer="127.0.0.2", path="/mcp/pub",
                                                  mcp_server="priv"))
        assert response.denied_response.status.code == 404

    async def test_no_http_attributes_is_bad_request(self, stub: Any) -> None:
        """A CheckRequest without HTTP attributes is a 400 denial, not an RPC error."""
        response = await stub.Check(external_auth_pb2.CheckRequest())
        assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert response.denied_response.status.code == 400
        assert json.loads(response.denied_response.body) == {"error": "bad_request"}

    async def test_internal_error_denies(self, stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """An exception inside the decision becomes a denial; the servicer never raises."""
        def broken(*args: object) -> None:
            raise RuntimeError("boom")
        monkeypatch.setattr("ext_authz.edges.pipeline.decide", broken)
        response = await stub.Check(check_request())
        assert response.status.code == grpc.StatusCode.INTERNAL.value[0]
        assert response.denied_response.status.code == 500
        assert decision_module.OUTCOMES["internal_error"] == (13, 500)

    async def test_envoy_fixture_request(self, sidecar: Sidecar) -> None:
        """The bytes Envoy 1.40 really sent parse and get a well-formed answer."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            raw = await call(FIXTURE.read_bytes())
        response = external_auth_pb2.CheckResponse.FromString(raw)
        # /api/v1/items names no server: 404, from the internal peer 127.0.0.1.
        assert response.denied_response.status.code == 404
        assert metadata(response)["client_ip"] == "127.0.0.1"

    async def test_garbage_bytes(self, sidecar: Sidecar, stub: Any) -> None:
        """Undecodable bytes get a 400 bad_request denial; the server keeps serving."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            raw = await call(b"\xff\xff\xff\xff\x0f")
        response = external_auth_pb2.CheckResponse.FromString(raw)
        assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert response.denied_response.status.code == 400
        assert (await stub.Check(check_request())).status.code == 0


async def check_with_token_server(
    token_endpoint: TokenEndpoint, *, wait_warm: bool = False, deadline_s: float = 2
) -> external_auth_pb2.CheckResponse:
    """Start a sidecar whose server `gh` has oauth2 settings, check /mcp/gh once, stop."""
    config = make_config(servers={"gh": {"oauth2": {
        "token_url": token_endpoint.url, "client_id": "gw", "client_secret": "s"}}})
    sidecar = await start(config)
    try:
        if wait_warm:
            await asyncio.wait_for(sidecar.tokens.wait_ready(), 5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response: external_auth_pb2.CheckResponse = await stub.Check(
                check_request(path="/mcp/gh"), timeout=deadline_s)
            return response
    finally:
        await sidecar.stop()


class TestTokens:
    async def test_injects_bearer_overwriting_callers(
        self, token_endpoint: TokenEndpoint
    ) -> None:
        """An oauth2 server gets `authorization: Bearer <token>`, append=false, OVERWRITE."""
        response = await check_with_token_server(token_endpoint, wait_warm=True)
        [header] = response.ok_response.headers
        assert header.header.key == "authorization"
        assert header.header.value == f"Bearer {token_endpoint.issued[0]}"
        assert header.HasField("append")
        assert header.append.value is False
        assert header.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert token_endpoint.count == 1

    async def test_unobtainable_token_is_503_before_the_deadline(
        self, token_endpoint: TokenEndpoint
    ) -> None:
        """A fetch that cannot finish inside the gRPC deadline answers 503 itself."""
        token_endpoint.delay_s = 3
        response = await check_with_token_server(token_endpoint, deadline_s=0.3)
        assert response.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert response.denied_response.status.code == 503
        assert json.loads(response.denied_response.body) == {
            "error": "upstream_credentials_unavailable"}
        assert list(response.ok_response.headers) == []

    async def test_failing_endpoint_is_503(self, token_endpoint: TokenEndpoint) -> None:
        """An endpoint answering 500 yields 503 with the reason in metadata, never an allow."""
        token_endpoint.mode = "status"
        response = await check_with_token_server(token_endpoint)
        assert response.denied_response.status.code == 503
        assert metadata(response)["reason"] == "upstream_credentials_unavailable"


def tool_request(body: bytes | str | None, peer: str = "127.0.0.2",
                 **headers: str) -> external_auth_pb2.CheckRequest:
    """A Check for /mcp/gh carrying a body, as Envoy's with_request_body sends one."""
    request = check_request(peer=peer, path="/mcp/gh")
    http = request.attributes.request.http
    http.headers.update({"content-type": "application/json", **headers})
    if isinstance(body, bytes):
        http.raw_body = body
    elif isinstance(body, str):
        http.body = body
    http.size = len(body) if body is not None else 0
    return request


HIDDEN_CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}}'


class TestToolRules:
    """The Check side of tool rules: with the body (Istio), or leaving it to ext_proc."""

    @pytest.fixture
    async def tools(self) -> AsyncIterator[Any]:
        config = make_config(servers={"gh": {"tools": {"delete_repo": {
            "available_on_public_internet": False}}}})
        sidecar = await start(config)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            yield external_auth_pb2_grpc.AuthorizationStub(channel)
        await sidecar.stop()

    async def test_a_body_in_the_check_is_judged(self, tools: Any) -> None:
        """With the body in the CheckRequest, a hidden tool is answered there."""
        response = await tools.Check(tool_request(HIDDEN_CALL))
        assert response.denied_response.status.code == 200
        assert "Unknown tool: delete_repo" in response.denied_response.body

    @pytest.mark.parametrize(
        ("request_of", "words"),
        [
            (lambda: tool_request(None), "did not reach the sidecar"),
            (lambda: tool_request(HIDDEN_CALL.decode()), "as text"),
            (lambda: tool_request(HIDDEN_CALL, **{"x-envoy-auth-partial-body": "true"}),
             "part of the body"),
        ],
        ids=["missing", "text", "partial"],
    )
    async def test_a_body_not_sent_whole_as_bytes_is_refused(self, tools: Any,
                                                             request_of: Any,
                                                             words: str) -> None:
        """No body, a body as text (no pack_as_bytes), or part of one: a 400 saying so."""
        response = await tools.Check(request_of())
        assert response.denied_response.status.code == 400
        assert words in response.denied_response.body

    async def test_a_route_left_to_ext_proc_needs_no_body(self, tools: Any) -> None:
        """envoy-config's tool routes: the server alone, and where the caller was placed."""
        request = tool_request(None, peer="127.0.0.1")
        request.attributes.context_extensions["mcp_tool_rules"] = "ext_proc"
        response = await tools.Check(request)
        assert response.WhichOneof("http_response") == "ok_response"
        meta = metadata(response)
        assert (meta["server"], meta["network"], meta["networks"]) == ("gh", "internal",
                                                                      "internal")

    async def test_token_outage_comes_before_the_tool_rules(
            self, token_endpoint: TokenEndpoint) -> None:
        """While no token can be had, a hidden tool gets the 503 a missing tool gets."""
        token_endpoint.mode = "status"
        config = make_config(servers={"gh": {
            "oauth2": {"token_url": token_endpoint.url, "client_id": "gw",
                       "client_secret": "s"},
            "tools": {"delete_repo": {"available_on_public_internet": False}}}})
        sidecar = await start(config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                missing = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}'
                answers = [await stub.Check(tool_request(body), timeout=2)
                           for body in (HIDDEN_CALL, missing)]
        finally:
            await sidecar.stop()
        assert [a.denied_response.status.code for a in answers] == [503, 503]
        assert answers[0].denied_response.body == answers[1].denied_response.body


class TestHealthAndReflection:
    async def test_health_waits_for_tokens(self, token_endpoint: TokenEndpoint) -> None:
        """Health is NOT_SERVING until every configured server's token is in hand."""
        token_endpoint.mode = "status"
        config = make_config(servers={"gh": {"oauth2": {
            "token_url": token_endpoint.url, "client_id": "gw", "client_secret": "s"}}},
            tokens={"retry_initial_s": 0.2, "retry_max_s": 0.2})
        sidecar = await start(config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                before = await health.Check(request)
                for _ in range(100):  # until the first fetch has failed
                    if "HTTP 500" in sidecar.readiness().unavailable["gh"]:
                        break
                    await asyncio.sleep(0.02)
                assert not sidecar.readiness().ready
                assert "HTTP 500" in sidecar.readiness().unavailable["gh"]
                token_endpoint.healthy()
                await asyncio.sleep(0.5)
                after = await health.Check(request)
        finally:
            await sidecar.stop()
        assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert after.status == health_pb2.HealthCheckResponse.SERVING

    async def test_reflection_lists_the_service(self, sidecar: Sidecar) -> None:
        """grpcurl-style reflection names the Authorization service."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in stub.ServerReflectionInfo(iter([request])):
                names = {s.name for s in answer.list_services_response.service}
                break
        assert "envoy.service.auth.v3.Authorization" in names
        assert "envoy.service.ext_proc.v3.ExternalProcessor" in names
        assert "grpc.health.v1.Health" in names


class TestConformance:
    async def test_envoy_data_plane_client(self, sidecar: Sidecar) -> None:
        """envoy-data-plane's full upstream API (betterproto2) talks to the trimmed protos."""
        from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
        from envoy_data_plane.envoy.service.auth.v3 import (
            AttributeContext,
            AttributeContextHttpRequest,
            AttributeContextPeer,
            AttributeContextRequest,
            AuthorizationSyncStub,
            CheckRequest,
        )

        def request(peer: str, path: str, xff: str | None = None) -> CheckRequest:
            headers = {":path": path, ":authority": "gw", ":method": "GET"}
            if xff:
                headers["x-forwarded-for"] = xff
            return CheckRequest(attributes=AttributeContext(
                source=AttributeContextPeer(address=Address(
                    socket_address=SocketAddress(address=peer, port_value=5000))),
                request=AttributeContextRequest(http=AttributeContextHttpRequest(
                    method="GET", path=path, host="gw", headers=headers, protocol="HTTP/1.1")),
                context_extensions={"tenant": "acme"},
            ))

        def call_all() -> list[Any]:
            with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = AuthorizationSyncStub(channel)
                return [
                    stub.check(request("127.0.0.2", "/mcp/pub")),
                    stub.check(request("127.0.0.2", "/mcp/priv")),
                    stub.check(request("127.0.0.3", "/mcp/priv", xff="127.0.0.1")),
                ]

        public, hidden, proxied = await asyncio.to_thread(call_all)
        assert public.status.code == 0
        assert public.ok_response is not None
        assert public.dynamic_metadata.fields["network"].string_value == "external"
        assert hidden.status.code == 7
        assert hidden.denied_response.status.code == 404
        assert hidden.denied_response.body == '{"error": "not_found"}'
        assert hidden.denied_response.headers[0].header.key == "content-type"
        assert proxied.status.code == 0
        assert proxied.dynamic_metadata.fields["client_ip"].string_value == "127.0.0.1"


class TestDiscovery:
    """The registry and the OAuth discovery metadata, as the Check answers them."""

    @staticmethod
    def get(peer: str, path: str, host: str = "gw.example:8080", proto: str | None = None,
            **extensions: str) -> external_auth_pb2.CheckRequest:
        request = check_request(peer=peer, path=path, **extensions)
        http = request.attributes.request.http
        http.method, http.host = "GET", host
        http.headers[":method"], http.headers[":authority"] = "GET", host
        if proto is not None:
            http.headers["x-forwarded-proto"] = proto
        return request

    async def test_the_registry_is_a_local_200(self, stub: Any) -> None:
        """Answered in Envoy's place, from the caller's placement: hidden servers absent."""
        outside = await stub.Check(self.get("127.0.0.2", "/mcp", mcp_server="",
                                            mcp_route="registry"))
        inside = await stub.Check(self.get("127.0.0.1", "/mcp", mcp_server="",
                                           mcp_route="registry"))
        for response, names in ((outside, ["pub"]), (inside, ["pub", "priv"])):
            assert response.WhichOneof("http_response") == "denied_response"
            assert response.denied_response.status.code == 200
            assert [(h.header.key, h.header.value) for h in response.denied_response.headers] == [
                ("content-type", "application/json")]
            body = json.loads(response.denied_response.body)
            assert [s["name"] for s in body["servers"]] == names
            assert metadata(response)["reason"] == "registry"

    @pytest.mark.parametrize(("host", "proto", "resource"), [
        ("gw.example:8080", None, "http://gw.example:8080/mcp/pub"),
        ("gw.example", "https", "https://gw.example/mcp/pub"),
        ("[2001:db8::1]:443", "https,http", "https://[2001:db8::1]:443/mcp/pub"),
    ])
    async def test_discovery_names_the_url_the_caller_used(self, stub: Any, host: str,
                                                           proto: str | None,
                                                           resource: str) -> None:
        """The answers filter is told to set `resource` to the gateway URL (RFC 9728)."""
        response = await stub.Check(self.get(
            "127.0.0.2", "/.well-known/oauth-protected-resource/mcp/pub", host, proto,
            mcp_server="pub", mcp_route="discovery"))
        assert response.WhichOneof("http_response") == "ok_response"
        meta = metadata(response)
        assert (meta["rewrite"], meta["resource"]) == ("resource", resource)

    @pytest.mark.parametrize("host", ['gw"x', "gw example", "gw\\x", "", "gw%2eexample",
                                      "user@gw", "a,b", "g" * 300])
    async def test_an_origin_that_cannot_be_said_is_the_unknown_servers_404(
            self, stub: Any, host: str) -> None:
        """A Host that cannot be echoed (it would break out of a quoted parameter, or say
        another host) gets no document at all: the unknown server's 404, never the
        upstream's own document with its internal URLs."""
        response = await stub.Check(self.get(
            "127.0.0.2", "/.well-known/oauth-protected-resource/mcp/pub", host,
            mcp_server="pub", mcp_route="discovery"))
        unknown = await stub.Check(self.get(
            "127.0.0.2", "/.well-known/oauth-protected-resource/mcp/nope", host,
            mcp_server="nope", mcp_route="discovery"))
        assert response.denied_response.status.code == 404
        assert response.denied_response.body == unknown.denied_response.body
        assert "resource" not in metadata(response)

    async def test_mcp_requests_carry_no_origin(self, stub: Any) -> None:
        """A 401's challenge is pointed at the gateway by Envoy itself (the same in both
        data paths): an MCP request's answer carries no per-request metadata."""
        response = await stub.Check(self.get("127.0.0.2", "/mcp/pub", mcp_server="pub",
                                             mcp_route="mcp"))
        assert response.status.code == 0
        assert "origin" not in metadata(response)
        assert "resource" not in metadata(response)

    async def test_a_hidden_server_has_nothing_to_discover(self, stub: Any) -> None:
        hidden = await stub.Check(self.get(
            "127.0.0.2", "/.well-known/oauth-protected-resource/mcp/priv",
            mcp_server="priv", mcp_route="discovery"))
        unknown = await stub.Check(self.get(
            "127.0.0.2", "/.well-known/oauth-protected-resource/mcp/nope",
            mcp_server="nope", mcp_route="discovery"))
        for response in (hidden, unknown):
            assert response.denied_response.status.code == 404
            assert "resource" not in metadata(response)
        assert hidden.denied_response.body == unknown.denied_response.body


class TestEncoding:
    @pytest.mark.parametrize("decision_id", ["a-1", "0123abcd-99999999999", "x" * 80])
    def test_unrolled_decision_id_entry(self, decision_id: str) -> None:
        """The unrolled per-check metadata entry is byte-for-byte the general encoding."""
        from ext_authz.edges.metadata import decision_id_entry as _decision_id_entry
        from ext_authz.edges.wire import struct_entry as _struct_entry

        assert _decision_id_entry(decision_id) == _struct_entry("decision_id", decision_id)
