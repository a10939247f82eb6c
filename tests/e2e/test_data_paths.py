"""Both data paths decide alike: one sidecar, two real Envoys from `envoy-config`.

`ext_authz` asks the sidecar about every request; `native` (`--data-path native`) takes its
listener, clusters and tokens from the same sidecar over xDS and enforces visibility with
RBAC and injects tokens itself, asking the sidecar only on tool-rule routes. Every table
here runs against both, and where the answer is a 404 the bytes must be the unknown
server's, in each mode and across them.

Callers: 127.0.0.1 and ::1 internal, 127.0.0.2 external, 127.0.0.3 the trusted proxy (an
LB), 127.0.0.4 in the `partners` network.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ext_authz.render.options import DATA_PATHS
from tests.e2e.harness import (
    Process,
    envoy_config,
    free_port,
    mcp_client,
    start_envoy,
    start_sidecar,
    start_upstream,
    until,
)
from tests.e2e.test_envoy import TRUSTED_PROXY_XFF
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERNAL, EXTERNAL, PROXY, PARTNER, INTERNAL6 = (
    "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "::1")
CALLERS = {"internal": INTERNAL, "internal-v6": INTERNAL6, "external": EXTERNAL,
           "partner": PARTNER, "lb-itself": PROXY}
SECRET = "gh-secret-Zq8vN2pLx7"

SERVERS: dict[str, dict[str, Any]] = {
    "pub": {},
    "priv": {"available_on_public_internet": False},
    "part": {"available_on_public_internet": False, "visible_to": ["partners"]},
    "tl": {"tools": {"add": {"available_on_public_internet": False}}},
}
TOKEN_SERVERS = {"gh": True, "jira": False}  # oauth2 servers, and whether public
# Who sees which server: the decision table, for every caller.
SEES = {
    "internal": {"pub", "priv", "part", "tl", "gh", "jira"},
    "internal-v6": {"pub", "priv", "part", "tl", "gh", "jira"},
    "partner": {"pub", "part", "tl", "gh"},
    "external": {"pub", "tl", "gh"},
    "lb-itself": {"pub", "tl", "gh"},  # a trusted proxy is not itself an internal client
}


@dataclass
class Stack:
    bases: dict[str, str]  # data path -> http://127.0.0.1:PORT (the listener is [::])
    envoys: dict[str, Process]
    sidecar: Process
    admin: str
    config_path: Path
    config: dict[str, Any]
    tokens: TokenEndpoint

    def get(self, mode: str, source: str, path: str,
            headers: dict[str, str] | None = None) -> httpx.Response:
        base = self.bases[mode]
        if ":" in source:
            base = base.replace("127.0.0.1", "[::1]")
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as http:
            return http.get(base + path, headers=headers or {})

    def checks(self) -> float:
        """Every Check the sidecar has answered."""
        text = httpx.get(f"{self.admin}/metrics").text
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "mcp_ext_authz_checks_total")

    def access_log(self, mode: str) -> list[dict[str, Any]]:
        return self.envoys[mode].json_lines()

    def reload(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))
        self.sidecar.popen.send_signal(signal.SIGHUP)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("data-paths")
    ports = {name: free_port() for name in ("grpc", "admin", "upstream", "tl", *[
        f"{mode}_{what}" for mode in DATA_PATHS for what in ("envoy", "admin")])}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        try:
            upstream = start_upstream("any", ports["upstream"], workdir)
            processes.append(upstream)
            # An MCP server answers at /mcp/ITS-NAME: the tool-rule server's own.
            processes.append(start_upstream("tl", ports["tl"], workdir))
            at = f"127.0.0.1:{ports['upstream']}"
            servers = {name: {**settings, "upstream": at} for name, settings in SERVERS.items()}
            servers["dead"] = {"upstream": f"127.0.0.1:{free_port()}"}  # nothing listens
            servers["tl"]["upstream"] = f"127.0.0.1:{ports['tl']}"
            for name, public in TOKEN_SERVERS.items():
                servers[name] = {"upstream": at, "available_on_public_internet": public,
                                 "oauth2": {"token_url": tokens.url, "client_id": f"{name}-id",
                                            "client_secret": SECRET}}
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"],
                            "trusted_proxies": [f"{PROXY}/32"],
                            "networks": {"partners": [f"{PARTNER}/32"]}},
                "tokens": {"retry_initial_s": 0.2, "retry_max_s": 1},
                "reload": {"watch": False},
                "servers": servers,
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config))
            sidecar = start_sidecar(config_path, workdir)
            processes.append(sidecar)
            upstream.wait_http(f"http://{at}/mcp/x/echo")
            processes[1].wait_http(f"http://127.0.0.1:{ports['tl']}/mcp/x/echo")
            admin = f"http://127.0.0.1:{ports['admin']}"
            sidecar.wait_http(f"{admin}/readyz")
            envoys = {}
            for mode in DATA_PATHS:
                bootstrap = envoy_config(
                    config_path, "--data-path", mode,
                    "--listen", f"[::]:{ports[f'{mode}_envoy']}",
                    "--admin", f"127.0.0.1:{ports[f'{mode}_admin']}")
                envoys[mode] = start_envoy(bootstrap, workdir, ports[f"{mode}_admin"],
                                           name=f"envoy-{mode}")
                processes.append(envoys[mode])
            bases = {mode: f"http://127.0.0.1:{ports[f'{mode}_envoy']}" for mode in DATA_PATHS}
            yield Stack(bases, envoys, sidecar, admin, config_path, config, tokens)
        finally:
            for process in reversed(processes):
                process.stop()


def same_answer(a: httpx.Response, b: httpx.Response) -> None:
    """Status, body and every header but the date: byte for byte."""
    assert (a.status_code, a.content) == (b.status_code, b.content)
    assert ([(k, v) for k, v in a.headers.items() if k != "date"]
            == [(k, v) for k, v in b.headers.items() if k != "date"])


@pytest.mark.parametrize("mode", DATA_PATHS)
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("server", [*SERVERS, *TOKEN_SERVERS, "nope"])
def test_visibility_table(stack: Stack, mode: str, caller: str, server: str) -> None:
    """Each caller sees exactly its servers; the others answer the unknown server's bytes."""
    response = stack.get(mode, CALLERS[caller], f"/mcp/{server}/echo")
    if server in SEES[caller]:
        assert response.status_code == 200, response.text
        assert response.json()["path"] == f"/mcp/{server}/echo"
    else:
        same_answer(response, stack.get(mode, EXTERNAL, "/mcp/nope/echo"))
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}


@pytest.mark.parametrize("mode", DATA_PATHS)
def test_one_404_for_everything_hidden(stack: Stack, mode: str) -> None:
    """A hidden server, an unknown one and a path no route knows: one answer, byte for byte."""
    answers = [stack.get(mode, EXTERNAL, path) for path in (
        "/mcp/priv", "/mcp/nope/echo", "/elsewhere", "/mcp/jira/x?y=1",
        "/.well-known/oauth-protected-resource/mcp/priv")]
    for answer in answers[1:]:
        same_answer(answer, answers[0])


@pytest.mark.parametrize("mode", DATA_PATHS)
def test_envoys_own_answers_stay_its_own(stack: Stack, mode: str) -> None:
    """Only RBAC's denial and a missing token are made the sidecar's; an upstream that is
    down is Envoy's 503, as in the ext_authz mode."""
    response = stack.get(mode, EXTERNAL, "/mcp/dead/echo")
    assert response.status_code == 503
    assert response.text.startswith("upstream connect error")


def test_the_404_is_the_same_in_both_modes(stack: Stack) -> None:
    """The same status, body and headers; Envoy orders a local reply's headers its own way
    (content-length first), which tells the modes apart but no server from another."""
    ours, native = (stack.get(mode, EXTERNAL, "/mcp/priv") for mode in DATA_PATHS)
    assert (ours.status_code, ours.content) == (native.status_code, native.content)
    assert ({k: v for k, v in ours.headers.items() if k != "date"}
            == {k: v for k, v in native.headers.items() if k != "date"})


# Where the two modes part, each on the safe side: Envoy's XFF extension reads no
# `ip:port` entry, and falls back to the proxy's own address, which RBAC turns away.
XFF_DIFFERENCES = {f"{INTERNAL}:5000": {"ext_authz": 200, "native": 404}}


@pytest.mark.parametrize("mode", DATA_PATHS)
@pytest.mark.parametrize(("xff", "status"), [
    *TRUSTED_PROXY_XFF,
    (PARTNER, 404), (f"{INTERNAL6}", 200), (f"{EXTERNAL}, {PROXY}, {INTERNAL}", 200),
    (f"{INTERNAL}, {PROXY}", 200), (f"{PROXY}, {PROXY}", 404), (f"{INTERNAL}:5000", None),
])
def test_xff_through_the_trusted_proxy(stack: Stack, mode: str, xff: str | None,
                                       status: int | None) -> None:
    """Behind the trusted LB, the rightmost untrusted hop decides, in both modes."""
    headers = {"x-forwarded-for": xff} if xff else {}
    expected = status if status is not None else XFF_DIFFERENCES[str(xff)][mode]
    assert stack.get(mode, PROXY, "/mcp/priv/echo", headers).status_code == expected


@pytest.mark.parametrize("mode", DATA_PATHS)
def test_partner_through_the_proxy_sees_its_server(stack: Stack, mode: str) -> None:
    headers = {"x-forwarded-for": PARTNER}
    assert stack.get(mode, PROXY, "/mcp/part/echo", headers).status_code == 200
    assert stack.get(mode, PROXY, "/mcp/priv/echo", headers).status_code == 404


@pytest.mark.parametrize("mode", DATA_PATHS)
def test_forged_envoy_headers_change_nothing(stack: Stack, mode: str) -> None:
    """A caller's own x-envoy-* never reaches the upstream, nor steers Envoy."""
    seen = stack.get(mode, EXTERNAL, "/mcp/pub/echo", {
        "x-envoy-external-address": INTERNAL, "x-envoy-original-path": "/mcp/priv",
        "x-envoy-upstream-rq-timeout-ms": "1"}).json()
    assert seen["headers"]["x-envoy-external-address"] == EXTERNAL
    assert "x-envoy-original-path" not in seen["headers"]
    assert "x-envoy-upstream-rq-timeout-ms" not in seen["headers"]


@pytest.mark.parametrize("mode", DATA_PATHS)
def test_the_token_replaces_the_callers(stack: Stack, mode: str) -> None:
    """The upstream gets the server's token, from the sidecar's one fetch, never the caller's."""
    seen = stack.get(mode, EXTERNAL, "/mcp/gh/echo",
                     {"authorization": "Bearer caller-forged"}).json()
    token = seen["headers"]["authorization"].removeprefix("Bearer ")
    assert token in stack.tokens.issued
    assert token.startswith("tok-gh-id-")
    seen = stack.get(mode, INTERNAL, "/mcp/pub/echo", {"authorization": "Basic x"}).json()
    assert seen["headers"]["authorization"] == "Basic x"
    assert sorted(r.client_id or "" for r in stack.tokens.requests) == ["gh-id", "jira-id"]


def test_native_asks_the_sidecar_only_about_tool_rules(stack: Stack) -> None:
    """Requests to servers without tool rules never reach the sidecar in native mode."""
    before = stack.checks()
    for server in ("pub", "priv", "gh", "jira", "nope"):
        for caller in (INTERNAL, EXTERNAL):
            stack.get("native", caller, f"/mcp/{server}/echo")
    assert stack.checks() == before
    stack.get("native", EXTERNAL, "/mcp/tl/echo")
    assert stack.checks() == before + 1
    stack.get("ext_authz", EXTERNAL, "/mcp/pub/echo")
    assert stack.checks() == before + 2
    text = httpx.get(f"{stack.admin}/metrics").text
    assert 'mcp_ext_authz_xds_pushes_total{type="listener"}' in text
    assert "mcp_ext_authz_xds_rejections_total{" not in text  # Envoy took all we sent


async def _tool_names(base: str, source: str) -> set[str]:
    async with mcp_client(f"{base}/mcp/tl", source) as mcp:
        return {tool.name for tool in (await mcp.list_tools()).tools}


@pytest.mark.parametrize("mode", DATA_PATHS)
async def test_tool_rules_in_both_modes(stack: Stack, mode: str) -> None:
    """A tool-rule server is the sidecar's in both: the MCP SDK client lists `add` from
    inside only, and its call from outside is the server's own unknown-tool answer."""
    assert "add" in await _tool_names(stack.bases[mode], INTERNAL)
    assert await _tool_names(stack.bases[mode], EXTERNAL) == {"whoami", "wait"}


def test_native_access_log_says_what_rbac_did(stack: Stack) -> None:
    """What the native path logs in place of the sidecar's decision log."""
    time.sleep(0.3)  # earlier requests' lines flushed
    before = len(stack.access_log("native"))
    stack.get("native", EXTERNAL, "/mcp/priv/echo", {"x-forwarded-for": INTERNAL})
    stack.get("native", PROXY, "/mcp/priv/echo", {"x-forwarded-for": INTERNAL})
    until(lambda: len(stack.access_log("native")) >= before + 2)
    denied, allowed = stack.access_log("native")[before:before + 2]
    assert (denied["status"], denied["rbac"], denied["client_ip"], denied["server"]) == (
        404, "denied", EXTERNAL, "priv")
    assert denied["details"].startswith("rbac_access_denied")
    assert (allowed["status"], allowed["rbac"], allowed["client_ip"]) == (200, "allowed", INTERNAL)
    assert allowed["peer"] == PROXY


def test_no_secret_or_token_in_any_log(stack: Stack) -> None:
    stack.get("native", INTERNAL, "/mcp/gh/echo")
    assert stack.tokens.issued
    for process in (stack.sidecar, *stack.envoys.values()):
        text = process.output()
        for needle in (SECRET, *stack.tokens.issued):
            assert needle not in text, f"{process.name} output holds a secret or a token"


def test_a_reload_reaches_both_without_a_restart(stack: Stack) -> None:
    """Make `priv` public and `pub` internal by SIGHUP: both Envoys follow; then undo it."""
    changed = json.loads(json.dumps(stack.config))
    changed["servers"]["priv"]["available_on_public_internet"] = True
    changed["servers"]["pub"]["available_on_public_internet"] = False
    try:
        stack.reload(changed)
        for mode in DATA_PATHS:
            until(lambda m=mode: stack.get(m, EXTERNAL, "/mcp/priv/echo").status_code == 200,
                  15)
            assert stack.get(mode, EXTERNAL, "/mcp/pub/echo").status_code == 404
            assert stack.get(mode, INTERNAL, "/mcp/pub/echo").status_code == 200
    finally:
        stack.reload(stack.config)
        for mode in DATA_PATHS:
            until(lambda m=mode: stack.get(m, EXTERNAL, "/mcp/priv/echo").status_code == 404,
                  15)
    assert stack.get("native", EXTERNAL, "/mcp/pub/echo").status_code == 200


def test_a_bad_reload_keeps_both_serving(stack: Stack) -> None:
    broken = json.loads(json.dumps(stack.config))
    broken["servers"]["priv"]["visible_to"] = ["nowhere"]
    stack.reload(broken)
    time.sleep(1)
    for mode in DATA_PATHS:
        assert stack.get(mode, EXTERNAL, "/mcp/priv/echo").status_code == 404
        assert stack.get(mode, INTERNAL, "/mcp/priv/echo").status_code == 200
    stack.reload(stack.config)


def test_a_dead_sidecar_stops_native_injection_within_the_watchdog(stack: Stack) -> None:
    """Envoy keeps the last secret it was sent, so the native path health-checks each token
    server's endpoint at the sidecar: gone, no request goes out within ~2 s (the sidecar's
    503); ext_authz fails closed at once. Runs last: it kills the module's sidecar."""
    assert stack.get("native", EXTERNAL, "/mcp/gh/echo").status_code == 200
    stack.sidecar.popen.kill()
    stack.sidecar.popen.wait(10)
    assert stack.get("ext_authz", EXTERNAL, "/mcp/gh/echo").status_code == 503
    stale = 0
    started = time.monotonic()
    while (response := stack.get("native", EXTERNAL, "/mcp/gh/echo")).status_code == 200:
        stale += 1
        assert time.monotonic() - started < 10, "still injecting 10 s after the sidecar died"
        time.sleep(0.05)
    waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.json() == {"error": "upstream_credentials_unavailable"}
    print(f"native: {stale} requests with the last token in {waited:.2f} s after the kill")
    # Servers without a token to inject do not depend on the sidecar at all.
    assert stack.get("native", INTERNAL, "/mcp/priv/echo").status_code == 200
    assert stack.get("native", EXTERNAL, "/mcp/priv/echo").status_code == 404
