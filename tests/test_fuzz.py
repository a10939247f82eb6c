"""Fuzzing the service edge over a real gRPC channel: every input gets a well-formed answer.

The oracle is independent of the decision code: an allow for the internal-only server must
come from an internal address that the request itself shows (the peer, or an XFF entry
behind the trusted proxy), and only configured servers are ever allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.server import Sidecar
from tests.conftest import make_config
from tests.loop_thread import LoopThread

INTERNAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
TRUSTED = ipaddress.ip_address("127.0.0.3")
METHOD = "/envoy.service.auth.v3.Authorization/Check"


class ThreadedSidecar:
    """A sidecar on its own event loop in a thread, for synchronous (hypothesis) clients."""

    def __init__(self) -> None:
        self.sidecar = Sidecar(make_config(decision_log={"enabled": False}), grace_s=1)

    def __enter__(self) -> Sidecar:
        self._thread = LoopThread()
        self._thread.run(self.sidecar.start())
        return self.sidecar

    def __exit__(self, *exc: object) -> None:
        self._thread.run(self.sidecar.stop())
        self._thread.close()


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    with ThreadedSidecar() as sidecar, grpc.insecure_channel(
        f"127.0.0.1:{sidecar.grpc_port}",
        options=[("grpc.max_send_message_length", 8 * 1024 * 1024)],
    ) as channel:
        yield channel


addresses = st.one_of(
    st.sampled_from(["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "::ffff:127.0.0.1",
                     "[::1]:80", "127.0.0.1:99", "", " ", "localhost", "0.0.0.0"]),
    st.ip_addresses().map(str),
    st.text(max_size=80),
)
xff_values = st.one_of(
    st.none(),
    st.lists(addresses, max_size=60).map(", ".join),
    st.text(max_size=2000),
    st.integers(1, 30_000).map(lambda n: "127.0.0.1," * n),
)
headers = st.dictionaries(
    st.text(min_size=1, max_size=40).map(str.lower), st.text(max_size=500), max_size=20)
paths = st.one_of(
    st.sampled_from(["/mcp/pub", "/mcp/priv", "/mcp/priv/x?y=1", "/mcp/", "/mcp//priv",
                     "/mcp/PRIV", "/mcp/priv%2F", "/", ""]),
    st.text(max_size=300).map(lambda t: "/mcp/" + t),
)


@st.composite
def check_requests(draw: Any) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    if draw(st.booleans()):
        attributes.source.address.socket_address.address = draw(addresses)
    elif draw(st.booleans()):
        attributes.source.address.pipe.path = draw(st.text(max_size=20))
    if draw(st.integers(0, 9)):  # now and then, no HTTP attributes at all
        http = attributes.request.http
        http.headers.update(draw(headers))
        xff = draw(xff_values)
        if xff is not None:
            http.headers["x-forwarded-for"] = xff
        http.path = draw(paths)
        http.host = draw(st.text(max_size=60))
        if draw(st.booleans()):
            http.headers[":path"] = http.path
    if draw(st.booleans()):
        attributes.context_extensions.update(draw(st.dictionaries(
            st.sampled_from(["mcp_server", "other"]),
            st.sampled_from(["pub", "priv", "", "nope", "PRIV"]) | st.text(max_size=20),
            max_size=2)))
    return request


def check_oracle(request: external_auth_pb2.CheckRequest,
                 response: external_auth_pb2.CheckResponse) -> None:
    kind = response.WhichOneof("http_response")
    meta = dict(response.dynamic_metadata.items())
    assert meta["decision_id"]
    if response.status.code != 0:
        assert kind == "denied_response"
        assert response.denied_response.status.code in (400, 404, 500, 503)
        return
    assert kind == "ok_response"
    assert meta["server"] in ("pub", "priv")
    if meta["server"] == "priv":
        assert meta["network"] == "internal"
        client = ipaddress.ip_address(meta["client_ip"])
        assert any(client in network for network in INTERNAL)
        http = request.attributes.request.http
        shown = request.attributes.source.address.socket_address.address
        xff = http.headers.get("x-forwarded-for", "")
        # The internal address is the request's own: its peer, or (behind the trusted
        # proxy) an entry of its X-Forwarded-For.
        assert meta["client_ip"] in shown or meta["client_ip"] in xff
        if meta["client_ip"] not in shown:
            peer = shown.strip("[]").rsplit(":", 1)[0] if shown.count(":") == 1 else shown
            assert ipaddress.ip_address(peer.strip("[]")) == TRUSTED


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(request=check_requests())
    def test_every_request_gets_a_well_formed_answer(
        self, channel: grpc.Channel, request: external_auth_pb2.CheckRequest
    ) -> None:
        """Random CheckRequests: a CheckResponse every time, never an allow the table forbids."""
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(request, timeout=10)
        check_oracle(request, response)

    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=4096))
    def test_garbage_bytes(self, channel: grpc.Channel, data: bytes) -> None:
        """Raw bytes to Check: a well-formed CheckResponse (usually bad_request), no crash."""
        raw = channel.unary_unary(METHOD)(data, timeout=10)
        response = external_auth_pb2.CheckResponse.FromString(raw)
        assert response.WhichOneof("http_response") in ("ok_response", "denied_response")
        if response.status.code == 0:
            check_oracle(external_auth_pb2.CheckRequest.FromString(data), response)

    @pytest.mark.parametrize("field", ["x-forwarded-for", "user-agent", ":path"])
    def test_one_megabyte_values(self, channel: grpc.Channel, field: str) -> None:
        """A 1 MB header value is answered like any other, and cannot make a caller internal."""
        request = external_auth_pb2.CheckRequest()
        request.attributes.source.address.socket_address.address = "127.0.0.3"
        http = request.attributes.request.http
        http.path = "/mcp/priv"
        http.headers[field] = "127.0.0.1, " * (1024 * 1024 // 11)
        response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
        if field == "x-forwarded-for":
            assert response.denied_response.status.code == 404
        check_oracle(request, response)

    def test_still_serving_afterwards(self, channel: grpc.Channel) -> None:
        """After all of the above the server still answers ordinary checks."""
        request = external_auth_pb2.CheckRequest()
        request.attributes.source.address.socket_address.address = "127.0.0.1"
        request.attributes.request.http.path = "/mcp/priv"
        response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
        assert response.status.code == 0
