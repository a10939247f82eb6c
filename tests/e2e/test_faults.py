"""Token-endpoint fault matrix through a real Envoy: what the client sees, what is counted
and logged, and recovery within one backoff period once the endpoint is healthy.

Each fault has its own server (own client id, own token endpoint), so all run on one
stack: Envoy -> sidecar (subprocess) -> eight token endpoints in a thread. The stack runs
once per data path, from `envoy-config`: in `ext_authz` the sidecar answers 503 itself; in
`native` Envoy holds an empty secret for the server until a token arrives, and answers
the same 503 from its credential injector's failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    start_envoy,
    start_sidecar,
    start_upstream,
    until,
)
from tests.loop_thread import LoopThread
from tests.token_endpoint import TokenEndpoint

pytestmark = pytest.mark.e2e

RETRY_MAX_S = 0.5
TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Fault:
    name: str
    setup: dict[str, Any]
    outcome: str  # the token_fetches_total outcome label
    detail: str  # in the decision log's detail


FAULTS = [
    Fault("down", {}, "TokenEndpointError", "ConnectError"),
    # Hanging and dripping endpoints race the fetch timeout against the check's own
    # budget (both 1 s here): either message names the time limit.
    Fault("hang", {"delay_s": 3.0}, "TokenEndpointError", "within"),
    Fault("e500", {"mode": "status", "status": 500}, "TokenEndpointError", "HTTP 500"),
    Fault("e503", {"mode": "status", "status": 503}, "TokenEndpointError", "HTTP 503"),
    Fault("e401", {"mode": "status", "status": 401}, "CredentialsRefusedError",
          "credentials refused: token endpoint"),
    Fault("badjson", {"mode": "garbage"}, "TokenResponseError", "not JSON"),
    Fault("html", {"mode": "html"}, "TokenResponseError", "not JSON"),
    Fault("drip", {"mode": "drip"}, "TokenEndpointError", "within"),
]


class Endpoints:
    """One TokenEndpoint per fault on a shared event loop in a thread."""

    def __init__(self) -> None:
        self.thread = LoopThread()
        self.run = self.thread.run
        self.by_name: dict[str, TokenEndpoint] = {}

    def add(self, fault: Fault) -> TokenEndpoint:
        endpoint = TokenEndpoint(port=free_port())
        for key, value in fault.setup.items():
            setattr(endpoint, key, value)
        if fault.name != "down":  # "down": nothing listens until it heals
            self.run(endpoint.start())
        self.by_name[fault.name] = endpoint
        return endpoint

    def heal(self, name: str) -> None:
        endpoint = self.by_name[name]

        async def heal() -> None:
            endpoint.healthy()
            if endpoint._server is None:
                await endpoint.start()

        self.run(heal())

    def close(self) -> None:
        for endpoint in self.by_name.values():
            self.run(endpoint.stop())
        self.thread.close()


@dataclass
class Stack:
    mode: str
    base: str
    admin: str
    sidecar: Process
    envoy: Process
    endpoints: Endpoints


@pytest.fixture(scope="module", params=DATA_PATHS)
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"faults-{mode}")
    ports = {n: free_port() for n in ("grpc", "admin", "envoy_admin", "envoy", "up")}
    endpoints = Endpoints()
    processes: list[Process] = []
    try:
        servers = {f.name: {"upstream": f"127.0.0.1:{ports['up']}",
                            "oauth2": {"token_url": endpoints.add(f).url,
                                       "client_id": f"client-{f.name}", "client_secret": "s"}}
                   for f in FAULTS}
        config = {
            "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
            "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
            "tokens": {"timeout_s": TIMEOUT_S, "retry_initial_s": 0.2,
                       "retry_max_s": RETRY_MAX_S},
            "servers": servers,
        }
        path = workdir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        processes.append(start_upstream("pub", ports["up"], workdir))
        sidecar = start_sidecar(path, workdir)
        processes.append(sidecar)
        admin = f"http://127.0.0.1:{ports['admin']}"
        sidecar.wait_http(f"{admin}/healthz")
        processes[0].wait_http(f"http://127.0.0.1:{ports['up']}/mcp/x/echo")
        envoy = start_envoy(envoy_config(path, "--data-path", mode,
                                         "--listen", f"127.0.0.1:{ports['envoy']}",
                                         "--admin", f"127.0.0.1:{ports['envoy_admin']}"),
                            workdir, ports["envoy_admin"])
        processes.append(envoy)
        yield Stack(mode, f"http://127.0.0.1:{ports['envoy']}", admin, sidecar, envoy,
                    endpoints)
    finally:
        for process in reversed(processes):
            process.stop()
        endpoints.close()


def fetches(stack: Stack, server: str, outcome: str) -> float:
    text = httpx.get(f"{stack.admin}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "mcp_ext_authz_token_fetches_total"
                    and sample.labels == {"server": server, "outcome": outcome}):
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_then_recovery(stack: Stack, fault: Fault) -> None:
    """503 with the reason while the endpoint is broken; 200 with a token soon after it heals."""
    url = f"{stack.base}/mcp/{fault.name}/echo"
    response = httpx.get(url, timeout=10)
    assert response.status_code == 503
    assert response.json() == {"error": "upstream_credentials_unavailable"}
    if stack.mode == "ext_authz":
        record = stack.sidecar.last_line("server", fault.name)
        assert record["reason"] == "upstream_credentials_unavailable"
        assert fault.detail in record["detail"]
    else:
        # Envoy's access log names the server and why: the watchdog found the sidecar with
        # no token (or, before its first check, the injector had none). The sidecar's own
        # log says why it has none.
        record = stack.envoy.last_line("path", f"/mcp/{fault.name}/echo")
        assert (record["status"], record["server"]) == (503, fault.name)
        assert record["details"] in ("no_healthy_upstream", "failed_to_inject_credential")
        until(lambda: fault.detail in stack.sidecar.output())
    assert fetches(stack, fault.name, fault.outcome) >= 1
    stack.endpoints.heal(fault.name)
    healed = time.monotonic()
    deadline = healed + RETRY_MAX_S + TIMEOUT_S + 1.0  # one backoff period, one fetch, slack
    while True:
        response = httpx.get(url, timeout=10)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    waited = time.monotonic() - healed
    assert response.status_code == 200, f"not recovered {waited:.2f}s after healing"
    seen = response.json()["headers"]["authorization"]
    assert seen == f"Bearer {stack.endpoints.by_name[fault.name].issued[-1]}"
    assert fetches(stack, fault.name, "ok") == 1
