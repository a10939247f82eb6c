"""An MCP upstream that answers every POST with a tools/list result written oddly.

    python -m tests.e2e.odd_upstream --port N

The request's `x-odd-answer` header picks how (Envoy passes it on): each way is one a real
server, or a proxy in front of one, can write, and that a client may read differently from
the gateway. The listed tools are always `whoami` and `delete_repo`. Other modes list
prompts, resources and templates (a hidden one among them), or answer with what the last
tools/call named (`echo-last-call`): an answer a stateful server crossed into another
exchange, as the SDK's routing by id can.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOLS = [{"name": "whoami", "description": "who you are"},
         {"name": "delete_repo", "description": "deletes a repository"}]
LISTS = {
    "prompts": [{"name": "summarize"}, {"name": "delete_help", "description": "delete_repo"}],
    "resources": [{"uri": "repo://docs/readme"}, {"uri": "repo://victim/delete"}],
    "resourceTemplates": [{"uriTemplate": "repo://{owner}/readme"},
                          {"uriTemplate": "repo://victim/{action}"}],
}
UPDATED = [{"jsonrpc": "2.0", "method": "notifications/resources/updated",
            "params": {"uri": uri}} for uri in ("repo://victim/delete", "repo://docs/readme")]
_last_call = {"name": ""}  # what the last tools/call named (a fresh name, behind the gateway)


def unknown_tool(rpc_id: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [
        {"type": "text", "text": f"Unknown tool: {_last_call['name']}"}], "isError": True}},
        separators=(",", ":")).encode()


def _listing(rpc_id: object, **result: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": {"tools": TOOLS, **result}}


def answer(mode: str, rpc_id: object) -> tuple[str | None, bytes]:
    """The media type (None: no Content-Type header) and the body of one odd answer."""
    listing = json.dumps(_listing(rpc_id), separators=(",", ":")).encode()
    if mode == "json":
        return "application/json", listing
    if mode in ("prompts", "resources", "resourceTemplates"):
        return "application/json", json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {
            mode: LISTS[mode], "cacheScope": "public", "ttlMs": 1000}}).encode()
    if mode == "echo-last-call":
        return "application/json", unknown_tool(rpc_id)
    if mode == "text-plain":
        return "text/plain", listing
    if mode == "json-rpc":
        return "application/json-rpc", listing
    if mode == "no-type":
        return None, listing
    if mode == "sse-bom":
        return "text/event-stream", b"\xef\xbb\xbfdata: " + listing + b"\n\n"
    if mode == "sse-bare":
        return "text/event-stream", listing + b"\n\n"
    if mode == "duplicate-result":
        # Python and JavaScript read the last `result`: delete_repo.
        first = json.dumps({"tools": [TOOLS[0]]}, separators=(",", ":"))
        last = json.dumps({"tools": TOOLS}, separators=(",", ":"))
        return "application/json", (f'{{"jsonrpc":"2.0","id":{json.dumps(rpc_id)},'
                                    f'"result":{first},"result":{last}}}').encode()
    if mode == "sse-split":
        # Legal SSE: one JSON text over several data: lines, which a client joins.
        text = json.dumps(_listing(rpc_id), indent=1)
        return "text/event-stream", ("".join(f"data: {line}\n" for line in text.split("\n"))
                                     + "\n").encode()
    if mode == "cache-public":
        return "application/json", json.dumps(_listing(
            rpc_id, cacheScope="public", ttlMs=600000), separators=(",", ":")).encode()
    if mode.startswith("large-"):
        # A visible tool's answer of that many bytes (`large-json-N`, `large-sse-N`; with
        # `chunked` among the words, of no stated length).
        words = mode.split("-")
        kind, size = words[1], next(word for word in words if word.isdigit())
        text = "x" * int(size)
        message = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {
            "content": [{"type": "text", "text": text}], "isError": False}},
            separators=(",", ":")).encode()
        if kind == "sse":
            return "text/event-stream", b"event: message\ndata: " + message + b"\n\n"
        return "application/json", message
    raise ValueError(f"no such mode {mode!r}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # the http.server method's name
        length = int(self.headers.get("content-length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        if isinstance(request, dict) and request.get("method") == "tools/call":
            _last_call["name"] = request["params"]["name"]
        mode = self.headers.get("x-odd-answer", "json")
        media, body = answer(mode, request.get("id"))
        self.send_response(200)
        if media is not None:
            self.send_header("Content-Type", media)
        if "chunked" in mode.split("-"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 65536):
                piece = body[start:start + 65536]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # the http.server method's name
        """The server-to-client stream, replaying a tools/list answer (as after a dropped
        POST stream, resumed with Last-Event-ID), then the last call's answer and two
        resource updates: an SSE stream of no stated length."""
        listing = json.dumps(_listing(7), separators=(",", ":")).encode()
        body = b"id: ev-3\ndata: \n\nid: ev-4\ndata: " + listing + b"\n\n"
        body += b"id: ev-5\ndata: " + unknown_tool(8) + b"\n\n"
        for index, update in enumerate(UPDATED):
            body += f"id: ev-{6 + index}\ndata: {json.dumps(update)}\n\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main()
