"""An upstream MCP server (the official `mcp` SDK) that also echoes what it received.

    python -m tests.e2e.upstream --name pub --port 8001

Serves the MCP streamable-HTTP endpoint at /mcp/<name> with a `whoami` tool, and
GET /mcp/<any>/echo answering the request's headers as JSON, so tests can see exactly
what Envoy forwarded (X-Forwarded-For, the injected Authorization).
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse


def build(name: str) -> MCPServer:
    server = MCPServer(name)

    @server.tool()
    def whoami(ctx: Context) -> dict[str, str | None]:
        """Say which server answered and what credential reached it."""
        headers = ctx.headers or {}
        return {"server": name, "authorization": headers.get("authorization")}

    @server.custom_route("/mcp/{target}/echo", methods=["GET"])
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({
            "upstream": name,
            "path": request.url.path,
            "headers": {k: v for k, v in request.headers.items()},
        })

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build(args.name).streamable_http_app(
        streamable_http_path=f"/mcp/{args.name}", stateless_http=True, json_response=True
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
