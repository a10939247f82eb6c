"""The control plane edge: a real grpc.aio sidecar, xDS streams as Envoy opens them.

ADS carries a `--data-path native` Envoy's listener, clusters and token secrets; the SDS
service carries secrets alone. tests/e2e/test_data_paths.py proves a real Envoy takes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from google.protobuf import json_format, struct_pb2

from ext_authz._proto.envoy.service.discovery.v3 import ads_pb2_grpc
from ext_authz._proto.envoy.service.discovery.v3 import discovery_pb2 as pb
from ext_authz._proto.envoy.service.secret.v3 import sds_pb2_grpc
from ext_authz.contract import NODE_KEY, token_secret_name
from ext_authz.demo.ports import free_port
from ext_authz.edges.xds import CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE
from ext_authz.policy.config import load_config
from ext_authz.render.options import DataPlane, HostPort
from ext_authz.server import Sidecar
from tests.token_endpoint import TokenEndpoint

GH, NOPE = token_secret_name("gh"), token_secret_name("nope")


ADMIN = free_port()  # a real port: the watchdog's health checks are rendered to reach it


def config_text(token_url: str, **gh: Any) -> str:
    return yaml.safe_dump({
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"listen": f"127.0.0.1:{ADMIN}"},
        "reload": {"watch": False},
        "tokens": {"expiry_buffer_s": 0, "min_ttl_s": 0.1, "retry_initial_s": 5,
                   "retry_max_s": 5},
        "servers": {"pub": {"upstream": "127.0.0.1:9"},
                    "priv": {"upstream": "127.0.0.1:9", "available_on_public_internet": False},
                    "gh": {"upstream": "127.0.0.1:9", **gh, "oauth2": {
                        "token_url": token_url, "client_id": "gh", "client_secret": "s"}}},
    })


@pytest.fixture
async def sidecar(tmp_path: Path, token_endpoint: TokenEndpoint) -> AsyncIterator[Sidecar]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(config_text(token_endpoint.url))
    running = Sidecar(load_config(path), path, grace_s=0.5)
    await running.start()
    await asyncio.wait_for(running.tokens.wait_ready(), 5)
    yield running
    await running.stop()


class Stream:
    """One xDS stream, as Envoy drives it: requests in, responses read one at a time."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._read: asyncio.Task[Any] | None = None  # never cancelled: that ends the RPC

    async def ask(self, type_url: str, names: tuple[str, ...] = (), *, nonce: str = "",
                  node: dict[str, Any] | None = None, error: str = "") -> None:
        request = pb.DiscoveryRequest(type_url=type_url, resource_names=names,
                                      response_nonce=nonce)
        if node is not None:
            request.node.id = "test"
            request.node.metadata.CopyFrom(json_format.ParseDict(node, struct_pb2.Struct()))
        if error:
            request.error_detail.code = 3
            request.error_detail.message = error
        await self.call.write(request)

    def _reading(self) -> asyncio.Task[Any]:
        if self._read is None:
            self._read = asyncio.get_running_loop().create_task(self.call.read())
        return self._read

    async def next(self, within: float = 3) -> pb.DiscoveryResponse:
        done, _ = await asyncio.wait([self._reading()], timeout=within)
        assert done, f"no response within {within} s"
        response = self._reading().result()
        self._read = None
        assert response is not grpc.aio.EOF
        return response  # type: ignore[no-any-return]

    async def nothing(self, within: float = 0.3) -> None:
        done, _ = await asyncio.wait([self._reading()], timeout=within)
        assert not done, "a response came"


def secrets(response: pb.DiscoveryResponse) -> dict[str, str]:
    assert response.type_url == SECRET_TYPE
    values = {}
    for resource in response.resources:
        secret = Secret.parse(resource.value)
        assert secret.generic_secret is not None
        assert secret.generic_secret.secret is not None
        values[secret.name] = str(secret.generic_secret.secret.inline_string)
    return values


@pytest.fixture
async def ads(sidecar: Sidecar) -> AsyncIterator[Stream]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.StreamAggregatedResources()
        yield Stream(call)
        call.cancel()


NODE = {NODE_KEY: DataPlane(HostPort("127.0.0.1", 10000), {}).to_struct()}


class TestSecrets:
    async def test_tokens_and_unknown_names(self, sidecar: Sidecar, ads: Stream,
                                            token_endpoint: TokenEndpoint) -> None:
        """Each server's token under its name; a name we do not know is an empty secret."""
        await ads.ask(SECRET_TYPE, (GH, NOPE), node=NODE)
        assert secrets(await ads.next()) == {GH: token_endpoint.issued[-1], NOPE: ""}

    async def test_the_sds_service_serves_the_same(self, sidecar: Sidecar,
                                                   token_endpoint: TokenEndpoint) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
            stream = Stream(stub.StreamSecrets())
            await stream.ask(SECRET_TYPE, (GH,))
            assert secrets(await stream.next()) == {GH: token_endpoint.issued[-1]}
            stream.call.cancel()

    async def test_a_refreshed_token_is_pushed_and_an_expired_one_withdrawn(
            self, tmp_path: Path, token_endpoint: TokenEndpoint) -> None:
        """Refresh at 80% of a 0.6 s lifetime: pushed. Then the endpoint fails: at the end of
        the lifetime the secret is emptied, never left to be injected."""
        token_endpoint.expires_in = 0.6
        path = tmp_path / "sidecar.yaml"
        path.write_text(config_text(token_endpoint.url).replace(str(ADMIN), "0"))
        running = Sidecar(load_config(path), path, grace_s=0.5)
        await running.start()
        try:
            await asyncio.wait_for(running.tokens.wait_ready(), 5)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
                stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
                stream = Stream(stub.StreamSecrets())
                await stream.ask(SECRET_TYPE, (GH,))
                first = secrets(await stream.next())[GH]
                response = await stream.next(2)
                await stream.ask(SECRET_TYPE, (GH,), nonce=response.nonce)  # ACK
                second = secrets(response)[GH]
                assert first != second == token_endpoint.issued[-1]
                token_endpoint.mode, token_endpoint.status = "status", 500
                assert secrets(await stream.next(2)) == {GH: ""}
                stream.call.cancel()
        finally:
            await running.stop()

    async def test_a_rejected_secret_is_counted_and_never_quoted(
            self, sidecar: Sidecar, ads: Stream, caplog: pytest.LogCaptureFixture) -> None:
        await ads.ask(SECRET_TYPE, (GH,), node=NODE)
        response = await ads.next()
        with caplog.at_level(logging.ERROR):
            await ads.ask(SECRET_TYPE, (GH,), nonce=response.nonce,
                          error="rejected secret tok-SECRET-VALUE")
            await ads.nothing()
        assert "rejected the secrets" in caplog.text
        assert "tok-SECRET-VALUE" not in caplog.text
        assert sidecar.metrics.xds_rejections.labels("secret")._value.get() == 1


class TestListenerAndClusters:
    async def test_rendered_from_the_config_and_envoys_flags(self, ads: Stream) -> None:
        await ads.ask(CLUSTER_TYPE, node=NODE)
        clusters = [Cluster.parse(r.value) for r in (await ads.next()).resources]
        assert [c.name for c in clusters] == ["mcp_gh", "mcp_priv", "mcp_pub"]
        assert [c.name for c in clusters if c.health_checks] == ["mcp_gh"]  # the watchdog
        await ads.ask(LISTENER_TYPE)
        [listener] = [Listener.parse(r.value) for r in (await ads.next()).resources]
        assert listener.name == "mcp_ingress"
        assert listener.address.socket_address.port_value == 10000  # type: ignore[union-attr]

    async def test_an_envoy_without_our_node_metadata_gets_nothing(
            self, ads: Stream, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.ERROR):
            await ads.ask(LISTENER_TYPE, node={})
            await ads.nothing()
        assert "node metadata has no 'mcp_ext_authz'" in caplog.text

    async def test_a_reload_is_pushed_and_a_bad_one_is_not(
            self, sidecar: Sidecar, ads: Stream, token_endpoint: TokenEndpoint) -> None:
        await ads.ask(CLUSTER_TYPE, node=NODE)
        first = await ads.next()
        await ads.ask(CLUSTER_TYPE, nonce=first.nonce)
        assert sidecar.config_path is not None
        sidecar.config_path.write_text("servers: [")
        assert not await sidecar.reload()
        await ads.nothing()
        sidecar.config_path.write_text(config_text(token_endpoint.url, upstream="127.0.0.1:10"))
        assert await sidecar.reload()
        second = await ads.next()
        assert second.version_info != first.version_info
        [gh] = [c for c in (Cluster.parse(r.value) for r in second.resources)
                if c.name == "mcp_gh"]
        assert gh.load_assignment is not None
        endpoint = gh.load_assignment.endpoints[0].lb_endpoints[0].endpoint
        assert endpoint is not None
        assert endpoint.address is not None
        assert endpoint.address.socket_address is not None
        assert endpoint.address.socket_address.port_value == 10


async def test_the_watchdog_path(sidecar: Sidecar, token_endpoint: TokenEndpoint) -> None:
    """GET /tokens/NAME on the admin listener: 200 while a usable token is held."""
    base = f"http://127.0.0.1:{sidecar.admin_port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{base}/tokens/gh")).status_code == 200
        assert (await http.get(f"{base}/tokens/pub")).status_code == 503  # none to hold
        assert (await http.get(f"{base}/tokens/nope")).status_code == 503


async def test_the_watchdog_address_is_resolved_for_envoy() -> None:
    """Envoy takes no name in a health check's address (1.40 aborts): the sidecar resolves."""
    from ext_authz.render.native import RenderError, _resolve

    assert await _resolve("localhost") == "127.0.0.1"
    assert await _resolve("::1") == "::1"
    with pytest.raises(RenderError, match=r"cannot resolve 'no-such-host\.invalid'"):
        await _resolve("no-such-host.invalid")


class TestFleet:
    """What one control plane does for many Envoys (issue #25)."""

    async def test_the_watchdog_answers_for_the_envoy_that_asks(
            self, sidecar: Sidecar, ads: Stream) -> None:
        """200 for a node only while its stream is open and it ACKed a token from this
        process: before the ACK, for another node, and after it leaves, 503."""
        base = f"http://127.0.0.1:{sidecar.admin_port}/tokens/gh"
        async with httpx.AsyncClient() as http:
            async def status(node: str) -> int:
                return (await http.get(base, params={"node": node})).status_code

            await ads.ask(SECRET_TYPE, (GH,), node=NODE)
            response = await ads.next()
            assert await status("test") == 503  # sent, not yet ACKed
            await ads.ask(SECRET_TYPE, (GH,), nonce=response.nonce)
            await ads.nothing(0.1)
            assert await status("test") == 200
            assert await status("another-envoy") == 503  # never connected (or not since)
            assert (await http.get(base)).status_code == 200  # no node: the sidecar alone
            ads.call.cancel()
            await asyncio.sleep(0.2)
            assert await status("test") == 503  # gone: it may hold a token we cannot empty

    async def test_a_token_change_pushes_secrets_only(
            self, sidecar: Sidecar, ads: Stream, monkeypatch: pytest.MonkeyPatch) -> None:
        """A refresh does not render a listener or cluster again, for any stream."""
        await ads.ask(CLUSTER_TYPE, node=NODE)
        await ads.ask(LISTENER_TYPE)
        await ads.ask(SECRET_TYPE, (GH,))
        for _ in range(3):
            response = await ads.next()
            await ads.ask(response.type_url, tuple(
                sorted(GH for _ in response.resources if response.type_url == SECRET_TYPE)),
                nonce=response.nonce)
        rendered = []
        snapshots = sidecar.control_plane._snapshots()
        original = snapshots.resources

        async def counting(*args: Any) -> Any:
            rendered.append(args)
            return await original(*args)

        monkeypatch.setattr(snapshots, "resources", counting)
        assert sidecar.tokens.on_change == sidecar.control_plane.tokens_changed
        sidecar.control_plane.tokens_changed()
        sidecar.control_plane.tokens_changed()  # several at once: one look
        await ads.nothing(0.3)  # the token is the same: nothing to send
        assert rendered == []

    async def test_one_render_per_node_shape(self, sidecar: Sidecar) -> None:
        """Envoys of one shape share a render; each is sent its own node id in the
        watchdog's path."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
            streams = [Stream(stub.StreamAggregatedResources()) for _ in range(3)]
            paths = []
            for index, stream in enumerate(streams):
                request = pb.DiscoveryRequest(type_url=CLUSTER_TYPE)
                request.node.id = f"envoy-{index}"
                request.node.metadata.CopyFrom(json_format.ParseDict(NODE, struct_pb2.Struct()))
                await stream.call.write(request)
                [gh] = [c for c in (Cluster.parse(r.value) for r in (await stream.next()).resources)
                        if c.name == "mcp_gh"]
                paths.append(gh.health_checks[0].http_health_check.path)  # type: ignore[union-attr]
            assert paths == [f"/tokens/gh?node=envoy-{index}" for index in range(3)]
            snapshots = sidecar.control_plane._snapshots()
            assert len(snapshots._built) == 1  # type: ignore[attr-defined]
            for stream in streams:
                stream.call.cancel()


async def test_each_envoy_is_said_to_connect_and_disconnect(
        sidecar: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    """The operator is told of each Envoy's stream by its node id, as it opens and ends."""
    with caplog.at_level(logging.INFO, logger="ext_authz.edges.xds"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.StreamAggregatedResources()
            stream = Stream(call)
            await stream.ask(SECRET_TYPE, (GH,), node=NODE)
            await stream.next()
            assert "Envoy 'test' connected" in caplog.messages
            call.cancel()
        for _ in range(100):
            if "Envoy 'test' disconnected" in caplog.messages:
                break
            await asyncio.sleep(0.02)
    assert "Envoy 'test' disconnected" in caplog.messages
