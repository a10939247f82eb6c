"""mTLS between Envoy and the sidecar: a client certificate is required."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.policy.config import UpstreamAddress, load_config
from ext_authz.server import Sidecar
from tests.certs import CertFiles, make_certs
from tests.conftest import make_config
from tests.e2e.harness import free_port, start_envoy
from tests.test_service import check_request

pytestmark = pytest.mark.e2e


def bootstrap(admin: int, listener: int, sidecar: int, certs: CertFiles | None,
              with_client_cert: bool) -> dict[str, Any]:
    tls_context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {"trusted_ca": {"filename": str(certs.ca)}} if certs else {},
    }
    if certs and with_client_cert:
        tls_context["tls_certificates"] = [{
            "certificate_chain": {"filename": str(certs.client_cert)},
            "private_key": {"filename": str(certs.client_key)}}]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": listener}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "l",
                        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "direct_response": {"status": 200,
                                                            "body": {"inline_string": "up"}}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.ext_authz", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                         "ext_authz.v3.ExtAuthz",
                                "transport_api_version": "V3",
                                "status_on_error": {"code": 503},
                                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"},
                                                 "timeout": "2s"}}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                         "router.v3.Router"}},
                        ],
                    }}]}],
            }],
            "clusters": [{
                "name": "authz", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                                 "HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": sidecar}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "UpstreamTlsContext",
                    "sni": "localhost",
                    "common_tls_context": tls_context}},
            }],
        },
    }


@pytest.fixture
async def mtls_sidecar(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, CertFiles]]:
    certs = make_certs(tmp_path)
    config = make_config(grpc={"listen": "127.0.0.1:0", "tls": {
        "cert_file": str(certs.server_cert), "key_file": str(certs.server_key),
        "client_ca_file": str(certs.ca)}})
    sidecar = Sidecar(config, grace_s=1)
    await sidecar.start()
    yield sidecar, certs
    await sidecar.stop()


@pytest.mark.parametrize(("with_client_cert", "status"), [(True, 200), (False, 503)])
async def test_envoy_over_mtls(tmp_path: Path, mtls_sidecar: tuple[Sidecar, CertFiles],
                               with_client_cert: bool, status: int) -> None:
    """Envoy with a client certificate is served; without one the handshake fails (503)."""
    sidecar, certs = mtls_sidecar
    admin, listener = free_port(), free_port()
    envoy = start_envoy(bootstrap(admin, listener, sidecar.grpc_port, certs, with_client_cert),
                        tmp_path, admin)
    try:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{listener}/mcp/pub")
    finally:
        envoy.stop()
    assert response.status_code == status


async def test_grpc_client_without_certificate_is_refused(
    mtls_sidecar: tuple[Sidecar, CertFiles]
) -> None:
    """A client that trusts the server but presents no certificate cannot call Check."""
    sidecar, certs = mtls_sidecar
    target = f"127.0.0.1:{sidecar.grpc_port}"
    anonymous = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    async with grpc.aio.secure_channel(target, anonymous) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Check(check_request(), timeout=3)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    identified = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(), private_key=certs.client_key.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes())
    async with grpc.aio.secure_channel(target, identified) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        assert (await stub.Check(check_request(), timeout=3)).status.code == 0


async def test_certificates_reload(tmp_path: Path) -> None:
    """Rewritten certificate files are served to new connections after a reload."""
    first = make_certs(tmp_path)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = make_certs(second_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "grpc": {"listen": "127.0.0.1:0", "tls": {
            "cert_file": str(first.server_cert), "key_file": str(first.server_key),
            "client_ca_file": str(first.ca)}},
        "admin": None, "servers": {"pub": {}}}))
    sidecar = Sidecar(load_config(path), path, grace_s=1)
    await sidecar.start()

    async def call(certs: CertFiles, client: CertFiles) -> int:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.ca.read_bytes(), private_key=client.client_key.read_bytes(),
            certificate_chain=client.client_cert.read_bytes())
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{sidecar.grpc_port}", credentials,
            options=[("grpc.use_local_subchannel_pool", 1)],
        ) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            try:
                response = await stub.Check(check_request(), timeout=3)
            except grpc.aio.AioRpcError as exc:
                return exc.code().value[0]
            return response.status.code

    try:
        assert await call(first, first) == 0
        for name in ("server_cert", "server_key", "ca"):
            getattr(first, name).write_bytes(getattr(second, name).read_bytes())
        assert await sidecar.reload()
        assert await call(second, second) == 0
        # The new client CA is in force too: a certificate from another CA is refused.
        stranger_dir = tmp_path / "stranger"
        stranger_dir.mkdir()
        stranger = make_certs(stranger_dir)
        assert await call(second, stranger) == grpc.StatusCode.UNAVAILABLE.value[0]
    finally:
        await sidecar.stop()


async def test_generated_config_speaks_mtls(tmp_path: Path,
                                            mtls_sidecar: tuple[Sidecar, CertFiles]) -> None:
    """`envoy-config` output for a TLS sidecar works against it: the sidecar's own 404 body
    comes back through Envoy, so the mTLS hop carried the check."""
    from ext_authz.render.bootstrap import build_bootstrap, render
    from ext_authz.render.options import HostPort, SidecarTLS

    sidecar, certs = mtls_sidecar
    admin, listener = free_port(), free_port()
    bootstrap = build_bootstrap(
        sidecar.config, {"pub": UpstreamAddress("127.0.0.1", 9),
                         "priv": UpstreamAddress("127.0.0.1", 9)},
        listen=HostPort("127.0.0.1", listener), admin=HostPort("127.0.0.1", admin),
        sidecar=HostPort("127.0.0.1", sidecar.grpc_port),
        sidecar_tls=SidecarTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key),
                               "localhost"))
    envoy = start_envoy(yaml.safe_load(render(bootstrap)), tmp_path, admin)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):  # until Envoy's first health check of the sidecar passed
                response = await http.get(f"http://127.0.0.1:{listener}/mcp/nope")
                if response.status_code != 503:
                    break
                await asyncio.sleep(0.1)
    finally:
        envoy.stop()
    assert response.status_code == 404
    assert response.json() == {"error": "not_found"}
