"""An MCP server that wants its caller's own token, and the authorization server that issues it.

    python tests/e2e/auth_upstream.py --name secure --port 8001 --as-port 8002 \
        --client-id c --client-secret s

The MCP server is the official Python SDK's, with a token verifier and `AuthSettings`: it
answers 401 with an RFC 9728 challenge, and serves its protected-resource metadata at
`/.well-known/oauth-protected-resource/mcp/<name>`. The authorization server publishes RFC
8414 metadata and grants client_credentials to one client. Both run in this process, so the
verifier knows exactly the tokens issued. Each request is printed as a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time

import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

ISSUED: dict[str, AccessToken] = {}


class IssuedTokens:
    """The MCP server's token verifier: a token is good if this process issued it."""

    async def verify_token(self, token: str) -> AccessToken | None:
        found = ISSUED.get(token)
        if found is None or (found.expires_at is not None and found.expires_at < time.time()):
            return None
        return found


def authorization_server(issuer: str, client_id: str, client_secret: str) -> Starlette:
    async def metadata(_: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": issuer, "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token", "response_types_supported": ["code"],
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "scopes_supported": ["mcp"]})

    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        given_id, given_secret = form.get("client_id"), form.get("client_secret")
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic "):
            given_id, _, given_secret = base64.b64decode(basic[6:]).decode().partition(":")
        if (given_id, given_secret) != (client_id, client_secret):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        value = f"at-{secrets.token_hex(16)}"
        ISSUED[value] = AccessToken(token=value, client_id=client_id, scopes=["mcp"],
                                    expires_at=int(time.time()) + 3600,
                                    resource=str(form.get("resource") or "") or None)
        return JSONResponse({"access_token": value, "token_type": "Bearer",
                             "expires_in": 3600, "scope": "mcp"})

    return Starlette(routes=[
        Route("/.well-known/oauth-authorization-server", metadata),
        Route("/token", token, methods=["POST"]),
    ])


def mcp_server(name: str, port: int, issuer: str) -> ASGIApp:
    server = MCPServer(name, token_verifier=IssuedTokens(), auth=AuthSettings(
        issuer_url=issuer, resource_server_url=f"http://127.0.0.1:{port}/mcp/{name}",
        required_scopes=["mcp"], validate_token_resource=False))

    @server.tool()
    def whoami(ctx: Context) -> dict[str, str | None]:
        """Say which server answered, and whose token it took."""
        headers = ctx.headers or {}
        return {"server": name, "authorization": (headers.get("authorization") or "")[:12]}

    return server.streamable_http_app(streamable_http_path=f"/mcp/{name}", stateless_http=True,
                                      json_response=True, host="127.0.0.1")


def logged(app: ASGIApp, label: str) -> ASGIApp:
    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1")[:24] for k, v in scope["headers"]}
            print(json.dumps({"upstream": label, "method": scope["method"],
                              "path": scope["path"], "headers": headers}), flush=True)
        await app(scope, receive, send)

    return wrapper


async def serve(args: argparse.Namespace) -> None:
    issuer = f"http://127.0.0.1:{args.as_port}"
    servers = [
        uvicorn.Server(uvicorn.Config(logged(mcp_server(args.name, args.port, issuer), "mcp"),
                                      host="127.0.0.1", port=args.port, log_level="warning")),
        uvicorn.Server(uvicorn.Config(
            logged(authorization_server(issuer, args.client_id, args.client_secret), "as"),
            host="127.0.0.1", port=args.as_port, log_level="warning")),
    ]
    await asyncio.gather(*(server.serve() for server in servers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--as-port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
