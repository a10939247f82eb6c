"""The Python floor: a grpc.aio ext_authz servicer that allows everything and does nothing.

    python bench/noop_authz.py --port 9300 [--loop uvloop|asyncio]

Same generated stubs and the same event-loop choice as the sidecar, so the difference
between the two is the sidecar's own work.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.cli import run_loop

ALLOW = external_auth_pb2.CheckResponse()
ALLOW.status.code = 0
ALLOW.ok_response.SetInParent()


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: Any, context: Any) -> Any:
        return ALLOW


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", default="auto")
    args = parser.parse_args()
    run_loop(serve(args.port), args.loop)


if __name__ == "__main__":
    main()
