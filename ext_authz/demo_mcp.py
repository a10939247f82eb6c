"""The demo's MCP server (official `mcp` SDK): `whoami` and `add` tools, and a header echo.

Imported only by `python -m ext_authz.demo mcp-server`; needs the `demo` extra.
"""

from __future__ import annotations

from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse


def build_mcp_server(name: str) -> MCPServer:
    """An MCP server named `name`; GET /mcp/<any>/echo answers the request headers it got."""
    server = MCPServer(name, instructions=f"The {name} demo MCP server behind mcp-ext-authz.")

    @server.tool()
    def whoami(ctx: Context) -> dict[str, str | None]:
        """Say which server answered and which credential the gateway injected."""
        headers = ctx.headers or {}
        return {"server": name, "authorization": headers.get("authorization")}

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.custom_route("/mcp/{target}/echo", methods=["GET"])  # type: ignore[untyped-decorator]
    async def echo(request: Request) -> JSONResponse:
        # Shows what Envoy forwarded (X-Forwarded-For, the injected Authorization).
        return JSONResponse({"upstream": name, "path": request.url.path,
                             "headers": dict(request.headers.items())})

    return server
