"""Ask the sidecar's gRPC listener for a token as an intruder would: a forged Check from
PEER (an internal client's address), and an SDS stream for a server's token secret. Run
inside a namespace:

    python -m tests.topology.control_probe HOST PORT SERVER PEER [CA [CERT KEY]]

Prints one JSON object: for "check" and "sds", "token" (one came back), "no token", or
"refused: <gRPC status>" (no answer at all). Plaintext without CA; TLS trusting CA with
it; a client certificate with CERT and KEY.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz._proto.envoy.service.discovery.v3 import discovery_pb2
from ext_authz._proto.envoy.service.secret.v3 import sds_pb2_grpc
from ext_authz.contract import token_secret_name
from ext_authz.edges.xds import SECRET_TYPE

TIMEOUT_S = 3


def _channel(target: str, files: list[str]) -> grpc.Channel:
    if not files:
        return grpc.insecure_channel(target)
    ca, *pair = (Path(f).read_bytes() for f in files)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=pair[1] if pair else None,
        certificate_chain=pair[0] if pair else None)
    return grpc.secure_channel(target, credentials)


def _check(channel: grpc.Channel, server: str, peer: str) -> str:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = peer
    attributes.source.address.socket_address.port_value = 40000
    http = attributes.request.http
    path = f"/mcp/{server}"
    http.method, http.path, http.host = "POST", path, "envoy:10000"
    http.headers.update({":path": path, ":authority": "envoy:10000", ":method": "POST"})
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    try:
        response = stub.Check(request, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return f"refused: {exc.code().name}"
    headers = response.ok_response.headers
    if any(h.header.key.lower() == "authorization" for h in headers):
        return "token"
    return f"no token ({response.status.code}, {response.denied_response.status.code})"


def _sds(channel: grpc.Channel, server: str) -> str:
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
    request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE,
                                             resource_names=[token_secret_name(server)])
    request.node.id = "intruder"
    try:
        for response in stub.StreamSecrets(iter([request]), timeout=TIMEOUT_S):
            held = [Secret.parse(r.value).generic_secret for r in response.resources]
            return "token" if any(s and s.secret and s.secret.inline_string for s in held) else (
                "no token")
    except grpc.RpcError as exc:
        return f"refused: {exc.code().name}"
    return "no token"


def main(argv: list[str]) -> int:
    host, port, server, peer, *files = argv
    with _channel(f"{host}:{port}", files) as channel:
        print(json.dumps({"check": _check(channel, server, peer),
                          "sds": _sds(channel, server)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
