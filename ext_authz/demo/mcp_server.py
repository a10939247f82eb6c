"""The demo's MCP server (official `mcp` SDK): `whoami`, `add` and `wait` tools, two prompts,
two resources and a resource template (one of each fit to hide), completions, and a header
echo.

Imported only by `python -m ext_authz.demo mcp-server`; needs the `demo` extra.
"""

from __future__ import annotations

import asyncio
import json
import sys

from mcp.server.caching import CacheableMethod, CacheHint
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)
from mcp.types import Completion, JSONRPCMessage
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

_SHOWN_CREDENTIAL = 20  # characters of an Authorization credential the access log keeps


# What a server may say of its lists (protocol 2026-07-28): that a shared cache may keep them
# for ten minutes, for everyone.
LISTS: tuple[CacheableMethod, ...] = ("tools/list", "prompts/list", "resources/list",
                                      "resources/templates/list")


def build_mcp_server(name: str, public_lists: bool = False) -> MCPServer:
    """An MCP server named `name`; GET /mcp/<any>/echo answers the request headers it got.
    `public_lists`: its lists say `cacheScope: public` (the gateway makes them private)."""
    hints = {method: CacheHint(ttl_ms=600_000, scope="public") for method in LISTS}
    server = MCPServer(name, instructions=f"The {name} demo MCP server behind mcp-ext-authz.",
                       cache_hints=hints if public_lists else None)

    @server.tool()
    def whoami(ctx: Context) -> dict[str, str | None]:
        """Say which server answered and which credential the gateway injected."""
        headers = ctx.headers or {}
        return {"server": name, "authorization": headers.get("authorization")}

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool()
    async def wait(seconds: float) -> str:
        """Answer after this many seconds (at most an hour): a long-running tool call."""
        await asyncio.sleep(max(0.0, min(seconds, 3600.0)))
        return f"waited {seconds:g} s"

    @server.prompt()
    def summarize(text: str) -> str:
        """Summarize a text."""
        return f"Summarize this: {text}"

    @server.prompt()
    def delete_help() -> str:
        """How to delete a repository (an internal runbook)."""
        return "Call delete_repo with the repository's name; it cannot be undone."

    @server.resource("repo://docs/readme")
    def readme() -> str:
        """The public readme."""
        return "Welcome."

    @server.resource("repo://victim/delete")
    def delete_victim() -> str:
        """Reading it deletes the victim repository (an internal resource with a side
        effect)."""
        print(json.dumps({"upstream": name, "side_effect": "repo://victim/delete"}), flush=True)
        return "deleted"

    @server.resource("repo://{owner}/secrets")
    def secrets(owner: str) -> str:
        """An owner's secrets."""
        return f"the secrets of {owner}"

    @server.completion()  # type: ignore[no-untyped-call, untyped-decorator]
    async def complete(ref: object, argument: object, context: object) -> Completion:
        # Every prompt argument completes to the names of internal tools.
        return Completion(values=["delete_repo", "whoami"])

    @server.custom_route("/mcp/{target}/echo", methods=["GET"])  # type: ignore[untyped-decorator]
    async def echo(request: Request) -> JSONResponse:
        # Shows what Envoy forwarded (X-Forwarded-For, the injected Authorization).
        return JSONResponse({"upstream": name, "path": request.url.path,
                             "headers": dict(request.headers.items())})

    return server


class MemoryEventStore(EventStore):
    """Every event of every stream, in memory: the resumability of the SDK's own example
    (a client that lost a stream asks for what came after an event with Last-Event-ID)."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, EventId, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = f"ev-{len(self._events) + 1}"
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId,
                                  send_callback: EventCallback) -> StreamId | None:
        found = [index for index, (_, event_id, _) in enumerate(self._events)
                 if event_id == last_event_id]
        if not found:
            return None
        stream_id = self._events[found[0]][0]
        for stream, event_id, message in self._events[found[0] + 1:]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def redact_authorization(authorization: str) -> str:
    """Cut an Authorization credential to its first characters, for the access log."""
    scheme, _, credential = authorization.partition(" ")
    if len(credential) <= _SHOWN_CREDENTIAL:
        return authorization
    return f"{scheme} {credential[:_SHOWN_CREDENTIAL]}..."


def log_requests(app: ASGIApp, name: str) -> ASGIApp:
    """Wrap an ASGI app to print one JSON line per request: exactly what this upstream got.

    The raw request target and every header, so that what the gateway forwarded can be
    checked from outside (the topology tests read it; `docker compose logs` shows it). An
    Authorization credential is cut to its first characters: enough to tell the gateway's
    demo token from one a caller sent, not enough to reuse it.
    """

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers: dict[str, list[str]] = {}
            for raw_key, raw_value in scope["headers"]:
                key, value = raw_key.decode("latin-1"), raw_value.decode("latin-1")
                if key == "authorization":
                    value = redact_authorization(value)
                headers.setdefault(key, []).append(value)
            record = {"upstream": name, "method": scope["method"],
                      "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                      "query": scope.get("query_string", b"").decode("latin-1"),
                      "peer": (scope.get("client") or ("", 0))[0], "headers": headers}
            print(json.dumps(record), file=sys.stdout, flush=True)
        await app(scope, receive, send)

    return logged
