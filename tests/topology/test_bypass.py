"""A bypass battery through the generated Envoy config, in both routing modes.

Path mode is the compose stack itself (envoy/compose/envoy.yaml is `envoy-config` output).
Host mode is the same sidecar config switched to `routing.host_suffix`, plus a server with
no oauth2 settings, rendered by the real `mcp-ext-authz envoy-config` command and served by
a second sidecar and Envoy in the same namespaces.

Every request is sent as raw bytes (no client library normalizing it) and carries an
`x-case` header, so the upstream's own access log (ext_authz.demo.mcp_server.log_requests) shows
what, if anything, it received for that case. Each case must answer what the design's
decision table says: allowed (the upstream's answer, with the server's injected token),
`404 {"error": "not_found"}` from the sidecar, or a rejection by Envoy before any check.
Set MCP_EXT_AUTHZ_BATTERY_REPORT=FILE to write the observed table as Markdown.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.demo.mcp_server import redact_authorization
from tests.e2e.harness import health_flags
from tests.raw_http import RawResponse, http_request
from tests.topology.compose import Service
from tests.topology.stack import TOOL_SERVERS, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WHOAMI = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "whoami", "arguments": {}}}).encode()
MCP = (("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"))
NOT_FOUND = b'{"error": "not_found"}'
HOST_SUFFIX = ".mcp.example"
ATTACKER_TOKEN = "Bearer attacker-chosen-credential"


@dataclass(frozen=True)
class Case:
    """One request and the answer the decision table demands for it."""

    id: str
    target: str
    expect: str  # "public", "internal", "open" (allowed, reaching it), "not_found", or "envoy"
    host: str | None = "{envoy}"
    headers: tuple[tuple[str, str], ...] = ()
    client: str = "client-external"
    method: str = "POST"
    envoy_status: int | None = None  # for expect="envoy"

    def request(self, envoy: str) -> bytes:
        host = None if self.host is None else self.host.format(envoy=envoy)
        headers = [*MCP, ("x-case", self.id), *self.headers]
        return http_request(self.method, self.target.format(envoy=envoy), host, headers, WHOAMI)


FORGED_ORIGIN = (
    ("Forwarded", "for=172.30.1.20;proto=https"),
    ("X-Real-IP", "172.30.1.20"),
    ("X-Envoy-External-Address", "172.30.1.20"),
    ("X-Envoy-Internal", "true"),
    ("True-Client-IP", "172.30.1.20"),
)

# Headers Envoy itself reads or writes: a caller's copies would steer Envoy, or reach the
# upstream and the access log as if Envoy had set them.
FORGED_ENVOY = tuple((name, value) for name, value in (
    ("x-envoy-attempt-count", "9"),
    ("x-envoy-original-dst-host", "172.30.3.10:8000"),
    ("x-envoy-peer-metadata", "Cg0KA2FwcBIGEgRmYWtl"),
    ("x-envoy-peer-metadata-id", "sidecar~10.0.0.1~forged"),
    ("x-envoy-auth-partial-body", "true"),
    ("x-envoy-auth-failure-mode-allowed", "true"),
    ("x-envoy-original-path", "/forged/path"),
    ("x-envoy-decorator-operation", "forged-operation"),
    ("x-envoy-downstream-service-cluster", "forged-cluster"),
    ("x-envoy-downstream-service-node", "forged-node"),
    ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-expected-rq-timeout-ms", "1"),
    ("x-envoy-retry-on", "5xx"),
    ("x-envoy-max-retries", "7"),
    ("x-envoy-force-trace", "true"),
    ("x-envoy-ip-tags", "internal"),
    ("x-envoy-hedge-on-per-try-timeout", "true"),
    ("X-Envoy-Upstream-Alt-Stat-Name", "forged"),
))

COMMON_CASES = [
    # X-Forwarded-For and the other headers that claim an origin: the peer decides.
    Case("xff-internal", "{path}internal", "not_found",
         headers=(("X-Forwarded-For", "172.30.1.20"),)),
    Case("xff-two-headers", "{path}internal", "not_found",
         headers=(("X-Forwarded-For", "172.30.1.20"), ("X-Forwarded-For", "172.30.1.20"))),
    Case("xff-naming-lb", "{path}internal", "not_found",
         headers=(("X-Forwarded-For", "172.30.1.20, 172.30.4.10"),)),
    Case("origin-headers-hidden", "{path}internal", "not_found", headers=FORGED_ORIGIN),
    Case("origin-headers-public", "{path}public", "public", headers=FORGED_ORIGIN),
    # A caller's own credential never reaches an oauth2 server beside (or instead of) ours.
    Case("authorization-oauth2-server", "{path}public", "public",
         headers=(("Authorization", ATTACKER_TOKEN),)),
    Case("authorization-twice", "{path}public", "public",
         headers=(("Authorization", ATTACKER_TOKEN), ("authorization", "Basic YTpi"))),
    Case("authorization-internal-caller", "{path}internal", "internal",
         client="client-internal", headers=(("Authorization", ATTACKER_TOKEN),)),
    Case("authorization-hidden", "{path}internal", "not_found",
         headers=(("Authorization", ATTACKER_TOKEN),)),
    # A caller's own x-envoy-* headers never reach the upstream (asserted for every case).
    Case("envoy-internal-claimed", "{path}internal", "internal", client="client-internal",
         headers=(("x-envoy-internal", "true"),)),
    Case("envoy-headers-forged", "{path}public", "public", headers=FORGED_ENVOY),
    Case("envoy-headers-forged-internal", "{path}internal", "internal",
         client="client-internal", headers=FORGED_ENVOY),
]

PATH_CASES = [
    Case("public", "/mcp/public", "public"),
    Case("hidden", "/mcp/internal", "not_found"),
    Case("unknown", "/mcp/missing", "not_found"),
    Case("internal-caller", "/mcp/internal", "internal", client="client-internal"),
    Case("dotdot", "/mcp/public/../internal", "not_found"),
    Case("dotdot-encoded", "/mcp/public/%2e%2e/internal", "not_found"),
    Case("dotdot-mixed", "/mcp/public/.%2E/internal", "not_found"),
    Case("backslash", "/mcp/public\\..\\internal", "not_found"),
    Case("encoded-slash", "/mcp/public%2F..%2Finternal", "envoy", envoy_status=400),
    Case("encoded-slash-lower", "/mcp/public%2f..%2finternal", "envoy", envoy_status=400),
    Case("double-slash", "//mcp//internal", "not_found"),
    Case("semicolon", "/mcp/internal;x=1", "not_found"),
    Case("semicolon-dotdot", "/mcp/public;/../internal", "not_found"),
    Case("upper-case", "/MCP/INTERNAL", "not_found"),
    Case("mixed-case", "/mcp/Internal", "not_found"),
    Case("trailing-dot", "/mcp/internal.", "not_found"),
    Case("trailing-slash", "/mcp/internal/", "not_found"),
    Case("encoded-letter", "/mcp/%69nternal", "not_found"),
    Case("nul", "/mcp/internal%00", "envoy", envoy_status=400),
    Case("semicolon-public", "/mcp/public;x=1", "not_found"),
    Case("query", "/mcp/internal?x=/mcp/public", "not_found"),
    Case("query-dotdot", "/mcp/public?/../internal", "public"),
    Case("fragment", "/mcp/public#/../internal", "envoy", envoy_status=400),
    Case("absolute-form", "http://{envoy}/mcp/internal", "not_found", host="public.example"),
    Case("absolute-form-public", "http://evil.example/mcp/public", "public"),
    Case("long-path-hidden", "/mcp/internal/" + "a" * 8000, "not_found"),
    Case("long-path-public", "/mcp/public/" + "a" * 8000, "public"),
    Case("too-long-path", "/mcp/public/" + "a" * 70000, "envoy", envoy_status=431),
    Case("host-names-internal", "/mcp/public", "public", host="internal.mcp.example"),
    Case("no-host", "/mcp/internal", "envoy", host=None, envoy_status=400),
    Case("two-hosts", "/mcp/internal", "not_found", headers=(("Host", "x.example"),)),
    Case("not-mcp", "/", "not_found"),
    *[replace(c, target=c.target.format(path="/mcp/")) for c in COMMON_CASES],
]

HOST_CASES = [
    Case("public", "/mcp/public", "public", host="public.mcp.example"),
    Case("hidden", "/mcp/public", "not_found", host="internal.mcp.example"),
    Case("unknown", "/mcp/public", "not_found", host="missing.mcp.example"),
    Case("internal-caller", "/mcp/internal", "internal", host="internal.mcp.example",
         client="client-internal"),
    Case("host-with-port", "/mcp/internal", "not_found", host="internal.mcp.example:10001"),
    Case("host-upper-case", "/mcp/internal", "not_found", host="INTERNAL.MCP.EXAMPLE"),
    Case("host-trailing-dot", "/mcp/internal", "not_found", host="internal.mcp.example."),
    Case("host-prefix", "/mcp/internal", "not_found", host="xinternal.mcp.example"),
    Case("host-userinfo", "/mcp/internal", "not_found",
         host="public.mcp.example@internal.mcp.example"),
    Case("host-suffix-only", "/mcp/internal", "not_found", host=".mcp.example"),
    Case("host-other-domain", "/mcp/internal", "not_found", host="internal.mcp.example.evil"),
    Case("absolute-form", "http://internal.mcp.example/mcp/internal", "not_found",
         host="public.mcp.example"),
    Case("absolute-form-public", "http://public.mcp.example/mcp/public", "public",
         host="internal.mcp.example"),
    Case("x-forwarded-host", "/mcp/public", "public", host="public.mcp.example",
         headers=(("X-Forwarded-Host", "internal.mcp.example"),)),
    Case("two-hosts", "/mcp/public", "not_found", host="public.mcp.example",
         headers=(("Host", "internal.mcp.example"),)),
    Case("path-names-internal", "/mcp/internal", "public", host="public.mcp.example"),
    Case("no-host", "/mcp/internal", "envoy", host=None, envoy_status=400),
    # A server without oauth2 settings: the caller's own Authorization passes, unchanged.
    Case("authorization-no-oauth2", "/mcp/public", "open", host="open.mcp.example",
         headers=(("Authorization", ATTACKER_TOKEN),)),
    *[replace(c, target=c.target.format(path="/mcp/"),
              host=f"{c.target.format(path='').split('/')[0]}{HOST_SUFFIX}")
      for c in COMMON_CASES],
]


@dataclass
class Gateway:
    """One Envoy of the battery: where clients reach it, and the processes to read logs of."""

    name: str
    port: int
    sidecar: str
    envoy: str


# Each battery server, the compose service that serves it, and whether a token is injected.
UPSTREAMS = {"public": "mcp-public", "internal": "mcp-internal", "open": "mcp-public"}
INJECTS_TOKEN = {"public": True, "internal": True, "open": False}


def envoy_address(stack: Stack, client: str) -> str:
    network = next(iter(stack.topology.services[client].addresses))
    return str(stack.topology.services["envoy"].address(network))


def render_envoy_config(stack: Stack, config: Path, listen: str, admin: str,
                        sidecar: str) -> Path:
    """`mcp-ext-authz envoy-config` for a sidecar config and the stack's data path, written
    to the stack's workdir."""
    service = stack.topology.services["sidecar"]
    data = yaml.safe_load(config.read_text())
    servers = data["servers"]
    argv = [sys.executable, "-m", "ext_authz", "envoy-config", "--config", str(config),
            "--listen", listen, "--admin", admin, "--sidecar", sidecar,
            "--data-path", stack.data_path]
    if data["grpc"].get("tls"):  # the compose Envoy's client certificate (`certs` made it)
        certs = stack.workdir / "volumes" / "certs" / "envoy"
        argv += ["--sidecar-ca", str(certs / "ca.pem"), "--sidecar-cert",
                 str(certs / "envoy.pem"), "--sidecar-key", str(certs / "envoy.key"),
                 "--sidecar-sni", "sidecar"]
    argv += [arg for name in servers for arg in ("--upstream", f"{name}={UPSTREAMS[name]}:8000")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, **service.environment})
    assert result.returncode == 0, result.stderr
    path = stack.workdir / f"envoy-{config.stem}.yaml"
    path.write_text(result.stdout)
    return path


def start_gateway(stack: Stack, name: str, sidecar_config: Path | None,
                  envoy_config: Path) -> None:
    """Start (a sidecar and) an Envoy beside the compose ones, in the same namespaces."""
    sidecar = stack.topology.services["sidecar"]
    envoy = stack.topology.services["envoy"]
    if sidecar_config is not None:
        stack.start(f"sidecar-{name}", [sys.executable, "-m", "ext_authz", "serve",
                                        "--config", str(sidecar_config)],
                    "sidecar", sidecar.environment)
        admin = yaml.safe_load(sidecar_config.read_text())["admin"]["listen"]
        check = ("import urllib.request; urllib.request.urlopen("
                 f"'http://127.0.0.1:{admin.rpartition(':')[2]}/readyz', timeout=2)")
        stack.wait_ready(Service(sidecar.name, "app", (), {}, sidecar.addresses, (),
                                 (sys.executable, "-c", check)), f"sidecar-{name}")
    # Access log lines out within 0.1 s (Envoy's default is 10 s), for tests that read them.
    stack.start(f"envoy-{name}", [*envoy.argv[:1], "-c", str(envoy_config),
                                  "--disable-hot-restart", "-l", "warning",
                                  "--file-flush-interval-msec", "100"], "envoy")
    stack.wait_ready(Service(envoy.name, "envoy", (envoy.argv[0], "-c", str(envoy_config)),
                             {}, envoy.addresses, (), None), f"envoy-{name}")
    if stack.data_path == "native":
        # A native Envoy serves an oauth2 server once it holds its token (the watchdog asks
        # the sidecar for this Envoy): a moment after it is ready.
        admin = yaml.safe_load(envoy_config.read_text())["admin"]["address"]["socket_address"]
        _until_every_host_is_healthy(stack, admin["address"], admin["port_value"])


def _until_every_host_is_healthy(stack: Stack, host: str, port: int) -> None:
    def healthy() -> bool:
        flags = health_flags(f"{host}:{port}")
        return bool(flags) and all(flag == "healthy" for flag in flags)

    deadline = time.monotonic() + 10
    while not stack.in_namespace("envoy", healthy):
        assert time.monotonic() < deadline, "the Envoy's hosts did not turn healthy in 10 s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def host_mode(compose: Stack) -> Gateway:
    """The compose sidecar config in host mode with an `open` server, and its Envoy."""
    # As the compose sidecar reads it: its certificates where the `certs` service put them.
    mounted = Path(compose.topology.services["sidecar"].argv[-1])
    data = yaml.safe_load(mounted.read_text())
    data["grpc"]["listen"] = "0.0.0.0:9291"
    data["admin"]["listen"] = "0.0.0.0:9292"
    data["routing"] = {"path_prefix": None, "host_suffix": HOST_SUFFIX}
    data["servers"]["open"] = {"available_on_public_internet": True}
    config = compose.workdir / "sidecar-host.yaml"
    config.write_text(yaml.safe_dump(data))
    envoy = render_envoy_config(compose, config, "[::]:10001", "127.0.0.1:9902", "sidecar:9291")
    start_gateway(compose, "host", config, envoy)
    return Gateway("host", 10001, "sidecar-host", "envoy-host")


@pytest.fixture(scope="module")
def path_mode(compose: Stack) -> Gateway:
    return Gateway("path", 10000, "sidecar", "envoy")


@dataclass
class Observed:
    case: Case
    response: RawResponse
    upstream: list[dict[str, Any]]


REPORT: list[tuple[str, Observed]] = []


def send(stack: Stack, gateway: Gateway, case: Case) -> RawResponse:
    envoy = envoy_address(stack, case.client)
    return stack.request(case.client, envoy, gateway.port,
                         case.request(f"{envoy}:{gateway.port}"))


def upstream_record(stack: Stack, case: Case, upstream: str) -> list[dict[str, Any]]:
    return [r for r in stack.json_lines(upstream) if r["headers"].get("x-case") == [case.id]]


def check(stack: Stack, gateway: Gateway, case: Case) -> None:
    before = {u: len(upstream_record(stack, case, u)) for u in ("mcp-public", "mcp-internal")}
    decisions = len(stack.json_lines(gateway.sidecar))
    response = send(stack, gateway, case)
    # One line for the check; on a server with tool rules, one more for its body (ext_proc).
    # In the native data path Envoy alone decides every other request: none.
    asked = case.expect in TOOL_SERVERS or (
        stack.data_path == "ext_authz" and case.expect != "envoy")
    expected = 1 + (case.expect in TOOL_SERVERS) if asked else 0
    records = stack.new_lines(gateway.sidecar, decisions, expected)
    if not asked:
        assert [r for r in records if r.get("phase")] == []
    received = []
    for upstream in ("mcp-public", "mcp-internal"):
        received += upstream_record(stack, case, upstream)[before[upstream]:]
    REPORT.append((gateway.name, Observed(case, response, received)))
    if case.expect == "envoy":
        assert response.status == case.envoy_status, response.raw[:300]
        assert received == []
        return
    if case.expect == "not_found":
        assert (response.status, response.body) == (404, NOT_FOUND), response.raw[:300]
        assert response.header("content-type") == "application/json"
        if asked:
            [decision] = [r for r in records if r["phase"] == "check"]
            assert decision["reason"] == "not_found"
        assert received == []
        return
    decision = {}
    if asked:
        [decision] = [r for r in records if r["phase"] == "check"]
        assert decision["reason"] == "allowed", decision
        assert decision["server"] == case.expect
    if case.expect in TOOL_SERVERS:
        [body] = [r for r in records if r["phase"] == "body"]
        assert (body["reason"], body["network"]) == ("allowed", decision["network"])
    upstream = UPSTREAMS[case.expect]
    [record] = received
    assert record["upstream"] == upstream.removeprefix("mcp-")
    # Whatever origin the caller claimed, this header holds the address the sidecar judged
    # (native: Envoy's own judgement, the same XFF walk).
    if asked:
        assert record["headers"]["x-envoy-external-address"] == [decision["client_ip"]]
    # No x-envoy-* header a caller sent reaches the upstream; only the one Envoy sets itself.
    assert {k for k in record["headers"] if k.startswith("x-envoy-")} == {
        "x-envoy-external-address"}
    authorization = record["headers"].get("authorization", [])
    if INJECTS_TOKEN[case.expect]:
        assert len(authorization) == 1
        assert authorization[0].startswith(f"Bearer demo-demo-{upstream.removeprefix('mcp-')}")
    else:
        own = [redact_authorization(v) for k, v in case.headers if k.lower() == "authorization"]
        assert authorization == own


class TestPathMode:
    """envoy/compose/envoy.yaml: routes by path, each naming its server."""

    @pytest.mark.parametrize("case", PATH_CASES, ids=[c.id for c in PATH_CASES])
    def test_case(self, compose: Stack, path_mode: Gateway, case: Case) -> None:
        """The answer is the decision table's; the upstream got only what was allowed."""
        check(compose, path_mode, case)


class TestHostMode:
    """The same sidecar config with `routing.host_suffix`, rendered by `envoy-config`."""

    @pytest.mark.parametrize("case", HOST_CASES, ids=[c.id for c in HOST_CASES])
    def test_case(self, compose: Stack, host_mode: Gateway, case: Case) -> None:
        """The answer is the decision table's; the upstream got only what was allowed."""
        check(compose, host_mode, case)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    path = os.environ.get("MCP_EXT_AUTHZ_BATTERY_REPORT")
    if not path:
        return
    lines = ["| mode | case | client | request | answer | upstream received |",
             "|---|---|---|---|---|---|"]
    for mode, seen in REPORT:
        request = seen.case.request("ENVOY").split(b"\r\n", 1)[0].decode("latin-1")
        if len(request) > 70:
            request = request[:60] + "..." + request[-8:]
        answer = f"{seen.response.status} {seen.response.body[:40].decode('latin-1')}"
        got = "; ".join(
            f"{r['upstream']} {r['raw_path'][:40]}{'?' + r['query'] if r['query'] else ''}"
            f" auth={r['headers'].get('authorization')}"
            for r in seen.upstream) or "nothing"
        lines.append(f"| {mode} | {seen.case.id} | {seen.case.client.removeprefix('client-')}"
                     f" | `{request}` | {answer.replace('|', '/')} | {got} |")
    Path(path).write_text("\n".join(lines) + "\n")


def masked(response: RawResponse) -> bytes:
    """The response bytes with the Date header's value blanked (it names the second)."""
    return re.sub(rb"(?im)^(date:)[^\r\n]*", rb"\1 *", response.raw)


class TestIdenticalAnswers:
    """A hidden server and an unknown one answer the same bytes, headers included."""

    @pytest.mark.parametrize(
        ("mode", "requests"),
        [("path", [("/mcp/internal", "{envoy}"), ("/mcp/missing", "{envoy}"),
                   ("/elsewhere", "{envoy}"), ("/mcp/internal;x", "{envoy}")]),
         ("host", [("/mcp/public", "internal.mcp.example"), ("/mcp/public", "missing.mcp.example"),
                   ("/mcp/public", "elsewhere.example"), ("/", "internal.mcp.example.")])],
    )
    def test_byte_identical(self, compose: Stack, path_mode: Gateway, host_mode: Gateway,
                            mode: str, requests: list[tuple[str, str]]) -> None:
        """Every not_found answer from an external caller is the same bytes."""
        gateway = path_mode if mode == "path" else host_mode
        envoy = envoy_address(compose, "client-external")
        answers = set()
        for target, host in requests:
            case = Case("identical", target, "not_found", host=host)
            response = compose.request("client-external", envoy, gateway.port,
                                       case.request(f"{envoy}:{gateway.port}"))
            assert response.status == 404
            answers.add(masked(response))
        assert len(answers) == 1, answers


# -- what the generated config must say, shown by what goes wrong without it -------------

def connection_manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap's HTTP connection manager, to be changed in place."""
    listener = bootstrap["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def start_variant(stack: Stack, name: str, port: int, change: Callable[[dict[str, Any]], None]
                  ) -> Gateway:
    """envoy/compose/envoy.yaml with one safety setting changed, as another Envoy (read as
    the compose Envoy reads it: its certificate where the `certs` service put it)."""
    envoy = stack.topology.services["envoy"]
    bootstrap = yaml.safe_load(Path(envoy.argv[envoy.argv.index("-c") + 1]).read_text())
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = port - 1000
    change(bootstrap)
    path = stack.workdir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    start_gateway(stack, name, None, path)
    return Gateway(name, port, "sidecar", f"envoy-{name}")


def dead_sidecar(bootstrap: dict[str, Any]) -> None:
    [authz] = [c for c in bootstrap["static_resources"]["clusters"]
               if c["name"] == "mcp_ext_authz"]
    endpoint = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = 9  # nothing listens there


class TestUnsafeVariants:
    """Each Envoy setting the generator emits for safety, removed: the attack then works."""

    @pytest.fixture(autouse=True)
    def _ext_authz_only(self, compose: Stack) -> None:
        if compose.data_path != "ext_authz":
            pytest.skip("variants of envoy/compose/envoy.yaml (the native config's own"
                        " safety settings are shown in tests/e2e/test_data_paths.py)")

    def test_without_path_normalization(self, compose: Stack, path_mode: Gateway) -> None:
        """Unnormalized, `/mcp/public/../internal` is authorized as public and handed on."""
        def unsafe(bootstrap: dict[str, Any]) -> None:
            manager = connection_manager(bootstrap)
            for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
                manager.pop(key)

        case = Case("unsafe-dotdot", "/mcp/public/../internal", "not_found")
        assert send(compose, path_mode, case).body == NOT_FOUND
        gateway = start_variant(compose, "unnormalized", 10011, unsafe)
        since = len(compose.json_lines("mcp-public"))
        send(compose, gateway, case)
        [record] = compose.new_lines("mcp-public", since)
        # The public server's token, on a path that resolves to the hidden server: an
        # upstream that removes dot segments (many do) serves /mcp/internal to the internet.
        assert record["raw_path"] == "/mcp/public/../internal"
        assert posixpath.normpath(record["raw_path"]) == "/mcp/internal"
        assert record["headers"]["authorization"][0].startswith("Bearer demo-demo-public")

    def test_without_failing_closed(self, compose: Stack) -> None:
        """With the sidecar unreachable, failure_mode_allow lets an outsider in; ours is 503."""
        def closed(bootstrap: dict[str, Any]) -> None:
            dead_sidecar(bootstrap)

        def open_(bootstrap: dict[str, Any]) -> None:
            dead_sidecar(bootstrap)
            [authz] = [f["typed_config"] for f in connection_manager(bootstrap)["http_filters"]
                       if f["name"] == "envoy.filters.http.ext_authz"]
            authz["failure_mode_allow"] = True

        case = Case("unsafe-fail-open", "/mcp/internal", "not_found")
        safe = start_variant(compose, "dead-sidecar", 10012, closed)
        assert send(compose, safe, case).status == 503
        unsafe = start_variant(compose, "fail-open", 10013, open_)
        since = len(compose.json_lines("mcp-internal"))
        response = send(compose, unsafe, case)
        assert response.status == 200
        [record] = compose.new_lines("mcp-internal", since)
        assert record["headers"]["x-forwarded-for"] == [
            str(compose.topology.services["client-external"].address("external"))]
        assert "authorization" not in record["headers"]

    def test_without_catch_all_naming_no_server(self, compose: Stack) -> None:
        """An unnamed catch-all lets path routing 'allow' a request Envoy then 404s itself."""
        def unsafe(bootstrap: dict[str, Any]) -> None:
            routes = connection_manager(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]
            routes[-1].pop("typed_per_filter_config")

        gateway = start_variant(compose, "unnamed-catch-all", 10014, unsafe)
        since = len(compose.json_lines("sidecar"))
        response = send(compose, gateway, Case("unsafe-catch-all", "/mcp/public;x", "public"))
        [decision] = [r for r in compose.new_lines("sidecar", since) if r["phase"] == "check"]
        # Path routing names `public`, which has tool rules: it wants the body this route
        # does not send (400), where the generated catch-all answers not_found.
        assert (decision["reason"], decision["server"]) == ("bad_mcp_request", "public")
        assert response.status == 400
        assert response.body != NOT_FOUND

    def test_without_stripping_caller_envoy_headers(self, compose: Stack) -> None:
        """Without the first filter, a caller's x-envoy-* headers reach the upstream, and a
        forged x-envoy-original-path becomes the path of Envoy's access log."""
        def unsafe(bootstrap: dict[str, Any]) -> None:
            manager = connection_manager(bootstrap)
            manager["http_filters"] = [f for f in manager["http_filters"]
                                       if f["name"] != "envoy.filters.http.header_mutation"]

        def sent(gateway: Gateway, case: Case) -> tuple[dict[str, list[str]], str]:
            upstream, access = (len(compose.json_lines(p)) for p in ("mcp-public", gateway.envoy))
            send(compose, gateway, case)
            [record] = compose.new_lines("mcp-public", upstream)
            [logged] = compose.new_lines(gateway.envoy, access)
            return record["headers"], logged["path"]

        case = Case("unsafe-envoy-headers", "/mcp/public", "public", headers=FORGED_ENVOY)
        headers, path = sent(start_variant(compose, "as-generated", 10018, lambda _: None), case)
        assert [k for k in headers if k.startswith("x-envoy-")] == ["x-envoy-external-address"]
        assert path == "/mcp/public"
        headers, path = sent(start_variant(compose, "unstripped", 10017, unsafe), case)
        forged = {name.lower() for name, _ in FORGED_ENVOY}
        assert {"x-envoy-attempt-count", "x-envoy-original-path", "x-envoy-peer-metadata",
                "x-envoy-auth-failure-mode-allowed"} <= forged & set(headers)
        assert path == "/forged/path"

    def test_without_overwriting_external_address(self, compose: Stack) -> None:
        """Left to Envoy (and unstripped), a caller's own x-envoy-external-address reaches the
        upstream."""
        def unsafe(bootstrap: dict[str, Any]) -> None:
            manager = connection_manager(bootstrap)
            manager["route_config"].pop("request_headers_to_add")
            manager["http_filters"] = [f for f in manager["http_filters"]
                                       if f["name"] != "envoy.filters.http.header_mutation"]

        gateway = start_variant(compose, "forwarded-address", 10015, unsafe)
        since = len(compose.json_lines("mcp-public"))
        send(compose, gateway, Case("unsafe-address", "/mcp/public", "public",
                                    headers=(("X-Envoy-External-Address", "172.30.1.20"),)))
        [record] = compose.new_lines("mcp-public", since)
        assert record["headers"]["x-envoy-external-address"] == ["172.30.1.20"]

    def test_without_ipv4_preferred_dns(self, compose: Stack) -> None:
        """Envoy's default DNS family picks the AAAA record: the IPv4-only upstream is lost."""
        def unsafe(bootstrap: dict[str, Any]) -> None:
            for cluster in bootstrap["static_resources"]["clusters"]:
                cluster.pop("dns_lookup_family", None)

        gateway = start_variant(compose, "dns-auto", 10016, unsafe)
        response = send(compose, gateway, Case("unsafe-dns", "/mcp/public", "public"))
        assert response.status == 503
        assert b"upstream connect error" in response.body
