"""What hiding tools costs through Envoy, and whether timing tells a hidden tool from a missing one.

    python bench/hidden.py            # about 2 minutes
    python bench/hidden.py --smoke    # proves it runs (CI; no figures to read)

One sidecar and one Envoy running `envoy-config`'s listener, three times over on three ports:
  now      the generated config: ext_authz, then ext_proc on the request body and the
           answers filter on tools/call and tools/list answers, on tool-rule routes only
  before   the same with the answers filter taken out: the layout before issue #16 (a
           hidden tool answered by the sidecar, tools/list not filtered)
  none     a config with no tool rules at all: no ext_proc filter in the chain
Callers come from 127.0.0.1, which this config leaves outside the internal ranges, so `add`
is hidden from them. Part 1 (wrk, 8 and 64 connections) POSTs to an Envoy direct_response
upstream that answers JSON as an MCP server would (a call result; a tools/list of three):
  plain        tools/call to a server without tool rules (now and none: it must not pay)
  call         tools/call of a visible tool on a tool-rule route
  list         tools/list on a tool-rule route (now: `add` dropped from the answer)
  hidden       tools/call of `add`: now renamed and answered by the upstream; before, the
               sidecar's own reply (unknown_tool_reply: tool_error)
Part 2 times tools/call of the hidden `add` and of `zzz`, which no server has, through the
generated config in front of the demo's MCP server (official Python SDK), interleaved one
by one on one connection: the medians must agree (issue #16: within 10%; no threshold here,
the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import PY, Result, ensure_tools, free_port, median, ratio, wrk  # noqa: E402

from ext_authz.contract import ANSWERS_FILTER  # noqa: E402
from ext_authz.demo import ProcessGroup, envoy_binary  # noqa: E402
from ext_authz.policy.config import Config, UpstreamAddress, load_config  # noqa: E402
from ext_authz.render.bootstrap import build_bootstrap, render  # noqa: E402
from ext_authz.render.options import HostPort  # noqa: E402

TOOLS_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
              "params": {"name": "whoami", "arguments": {}}}
HIDDEN_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}
TOOLS_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
LISTED = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
    {"name": name, "description": f"The {name} tool.",
     "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    for name in ("whoami", "add", "wait")]}}
CALLED = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "3"}],
                                                 "isError": False}}


@dataclass
class Ports:
    upstream: int = field(default_factory=free_port)
    mcp: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    grpc_admin: int = field(default_factory=free_port)
    layouts: dict[str, int] = field(default_factory=lambda: {
        name: free_port() for name in ("now", "before", "none")})


def sidecar_config(p: Ports) -> dict[str, Any]:
    hidden = {"add": {"available_on_public_internet": False}}
    return {
        "grpc": {"listen": f"127.0.0.1:{p.grpc}"},
        "admin": {"listen": f"127.0.0.1:{p.grpc_admin}"},
        "reload": {"watch": False},
        # 127.0.0.1 is outside: `add` is hidden from every caller of this bench.
        "network": {"internal_ranges": ["10.0.0.0/8"]},
        "servers": {
            "plain": {"upstream": f"127.0.0.1:{p.upstream}"},
            "tools": {"upstream": f"127.0.0.1:{p.upstream}", "tools": hidden},
            "local": {"upstream": f"127.0.0.1:{p.upstream}", "tools": hidden,
                      "unknown_tool_reply": "tool_error"},
            "timed": {"upstream": f"127.0.0.1:{p.mcp}", "tools": hidden},
        },
    }


def _layout(config: Config, p: Ports, port: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rendered = yaml.safe_load(render(build_bootstrap(
        config, {name: UpstreamAddress.parse(s.upstream or "")
                 for name, s in config.servers.items()},
        listen=HostPort("127.0.0.1", port), admin=HostPort("127.0.0.1", p.admin),
        sidecar=HostPort("127.0.0.1", p.grpc))))
    [listener] = rendered["static_resources"]["listeners"]
    listener["name"] = f"layout-{port}"
    return listener, rendered["static_resources"]["clusters"]


def _without_answers(listener: dict[str, Any]) -> dict[str, Any]:
    """The listener as it was before issue #16: no answers filter."""
    before = copy.deepcopy(listener)
    manager = before["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != ANSWERS_FILTER]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.get("typed_per_filter_config", {}).pop(ANSWERS_FILTER, None)
    before["name"] = "before"
    return before


def _upstream(port: int) -> dict[str, Any]:
    """An Envoy listener answering as an MCP server would: a tools/list, or a call result."""
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        return {"direct_response": {"status": 200, "body": {"inline_string": json.dumps(body)}},
                "response_headers_to_add": [{"header": {"key": "content-type",
                                                        "value": "application/json"}}]}
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": "x-bench-answer",
                                               "string_match": {"exact": "list"}}]},
         **answer(LISTED)},
        {"match": {"prefix": "/"}, **answer(CALLED)},
    ]
    return {
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "upstream",
                "route_config": {"virtual_hosts": [{"name": "u", "domains": ["*"],
                                                    "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}]}}]}],
    }


def envoy_bootstrap(config: Config, p: Ports) -> dict[str, Any]:
    now, clusters = _layout(config, p, p.layouts["now"])
    before = _without_answers(now)
    before["address"]["socket_address"]["port_value"] = p.layouts["before"]
    plain_only = config.model_copy(update={"servers": {"plain": config.servers["plain"]}})
    none, _ = _layout(plain_only, p, p.layouts["none"])
    for cluster in clusters:
        cluster.pop("health_checks", None)  # the bench waits for readiness itself
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": p.admin}}},
        "static_resources": {"listeners": [_upstream(p.upstream), now, before, none],
                             "clusters": clusters},
    }


@contextmanager
def stack(workdir: Path) -> Iterator[Ports]:
    ports = Ports()
    procs = ProcessGroup(workdir)
    try:
        path = workdir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(sidecar_config(ports)))
        config = load_config(path)
        procs.start("mcp", [PY, "-m", "ext_authz.demo", "mcp-server", "--name", "timed",
                            "--port", str(ports.mcp)])
        procs.start("sidecar", [PY, "-m", "ext_authz", "--log-level", "WARNING", "serve",
                                "--config", str(path)])
        envoy_yaml = workdir / "envoy.yaml"
        envoy_yaml.write_text(yaml.safe_dump(envoy_bootstrap(config, ports)))
        procs.start("envoy", [str(envoy_binary()), "-c", str(envoy_yaml), "--concurrency", "1",
                              "--disable-hot-restart", "-l", "warning"])
        procs.wait_http("sidecar", f"http://127.0.0.1:{ports.grpc_admin}/readyz")
        procs.wait_http("envoy", f"http://127.0.0.1:{ports.admin}/ready")
        procs.wait_http("mcp", f"http://127.0.0.1:{ports.mcp}/mcp/timed/echo")
        yield ports
    finally:
        procs.stop()


def post_script(workdir: Path, name: str, body: dict[str, Any], list_answer: bool) -> Path:
    path = workdir / f"{name}.lua"
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    if list_answer:
        headers["X-Bench-Answer"] = "list"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# name: (layout, server, body, asks for a tools/list answer)
SETUPS = {
    "plain/now": ("now", "plain", TOOLS_CALL, False),
    "plain/none": ("none", "plain", TOOLS_CALL, False),
    "call/now": ("now", "tools", TOOLS_CALL, False),
    "call/before": ("before", "tools", TOOLS_CALL, False),
    "list/now": ("now", "tools", TOOLS_LIST, True),
    "list/before": ("before", "tools", TOOLS_LIST, True),
    "hidden/now": ("now", "tools", HIDDEN_CALL, False),
    "hidden/before": ("before", "local", HIDDEN_CALL, False),
}


def check_answers(ports: Ports) -> None:
    """Before measuring: each setup answers as it should (filtered, renamed, local)."""
    def post(layout: str, server: str, body: dict[str, Any], listing: bool) -> httpx.Response:
        headers = {"content-type": "application/json",
                   "accept": "application/json, text/event-stream"}
        if listing:
            headers["x-bench-answer"] = "list"
        return httpx.post(f"http://127.0.0.1:{ports.layouts[layout]}/mcp/{server}",
                          json=body, headers=headers, timeout=10)

    listed = post("now", "tools", TOOLS_LIST, True).json()["result"]["tools"]
    assert [t["name"] for t in listed] == ["whoami", "wait"], listed
    unfiltered = post("before", "tools", TOOLS_LIST, True).json()["result"]["tools"]
    assert len(unfiltered) == 3, unfiltered
    assert post("now", "tools", HIDDEN_CALL, False).json() == CALLED  # the upstream's
    assert "Unknown tool" in post("before", "local", HIDDEN_CALL, False).text


def timing(ports: Ports, count: int) -> tuple[list[float], list[float]]:
    """Milliseconds per tools/call of the hidden `add` and of the missing `zzz`."""
    url = f"http://127.0.0.1:{ports.layouts['now']}/mcp/timed"
    headers = {"accept": "application/json, text/event-stream"}
    times: dict[str, list[float]] = {"add": [], "zzz": []}
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=10, headers=headers) as http:
        for index in range(count):
            order = ("add", "zzz") if index % 2 else ("zzz", "add")
            for tool in order:
                body = {"jsonrpc": "2.0", "id": index, "method": "tools/call",
                        "params": {"name": tool, "arguments": {"a": 1, "b": 2}}}
                started = time.perf_counter()
                response = http.post(url, json=body)
                times[tool].append((time.perf_counter() - started) * 1e3)
                assert response.status_code == 200
                assert "Unknown tool" in response.text
            if time.monotonic() > deadline:
                break
    return times["add"], times["zzz"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each tool")
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    args = parser.parse_args()
    duration, rounds, calls = (1.0, 1, 20) if args.smoke else (
        args.duration, args.rounds, args.calls)
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-hidden-"))
    scripts = {name: post_script(workdir, name.replace("/", "-"), body, listing)
               for name, (_, _, body, listing) in SETUPS.items()}
    results: list[dict[tuple[str, int], Result]] = []
    with stack(workdir) as ports:
        check_answers(ports)
        for _ in range(rounds):
            results.append({
                (name, connections): wrk(
                    f"http://127.0.0.1:{ports.layouts[layout]}/mcp/{server}", connections,
                    duration, scripts[name])
                for connections in (8, 64) for name, (layout, server, _, _) in SETUPS.items()})
        hidden, missing = timing(ports, calls)
    through = {key: median([r[key] for r in results]) for key in results[0]}
    errors = sum(r.errors for r in through.values())
    print(f"{duration:g}s per measurement, median of {rounds} interleaved rounds;"
          f" logs in {workdir}")
    print(f"{'through Envoy (wrk)':<20}{'req/s@8':>10}{'p50@8':>9}{'req/s@64':>10}"
          f"{'p99@64':>9}{'errors':>8}")
    for name in SETUPS:
        a, b = through[(name, 8)], through[(name, 64)]
        print(f"  {name:<18}{a.rps:>10.0f}{a.p50_ms:>7.2f}ms{b.rps:>10.0f}{b.p99_ms:>7.2f}ms"
              f"{a.errors + b.errors:>8}")
    print("ratios (req/s, 64 connections)")
    for label, now, before in (
        ("server without tool rules: now vs no tool rules anywhere", "plain/now", "plain/none"),
        ("tools/call of a visible tool: now vs before #16", "call/now", "call/before"),
        ("tools/list: filtered now vs unfiltered before #16", "list/now", "list/before"),
        ("hidden tool: renamed now vs local reply before #16", "hidden/now", "hidden/before"),
        ("tool-rule route vs a server without tool rules, tools/call", "call/now",
         "plain/now"),
    ):
        print(f"  {label:<62}{ratio(through[(now, 64)].rps, through[(before, 64)].rps):>8}")
    print(f"timing, {len(hidden)} calls each through Envoy to the Python SDK server")
    for label, values in (("hidden `add`", hidden), ("missing `zzz`", missing)):
        quartiles = statistics.quantiles(values, n=4)
        print(f"  {label:<16} median {statistics.median(values):6.2f}ms"
              f"  quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}ms")
    share = statistics.median(hidden) / statistics.median(missing)
    print(f"  median hidden / missing: {share:.3f}")
    if errors:
        print(f"\n{errors} requests failed: see {workdir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
