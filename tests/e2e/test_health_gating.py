"""Envoy's health checks of the sidecar, as the generated config sets them, through a real
Envoy: what a lone sidecar that is not warm gets, how soon Envoy sees it recover, and that a
hung worker among several is passed over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.harness import (
    Process,
    client,
    envoy_config,
    free_port,
    health_flags,
    start_envoy,
    start_upstream,
    until,
)
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LIST = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@dataclass
class Gateway:
    base: str
    envoy_admin: int
    sidecar: Process
    bootstrap: dict[str, Any]  # Envoy's, from envoy-config: each test starts it when it will

    def post(self, path: str) -> tuple[int, str]:
        with client("127.0.0.1") as http:
            response = http.post(f"{self.base}{path}", content=LIST, headers=HEADERS)
        return response.status_code, response.text

    def sidecar_hosts(self) -> list[str]:
        """The health flags of each sidecar endpoint, as Envoy's admin lists them."""
        return health_flags(f"127.0.0.1:{self.envoy_admin}", "mcp_ext_authz::")


@pytest.fixture
def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
        tuple[Gateway, TokenEndpoint]]:
    workers = getattr(request, "param", 1)
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin", "pub")}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        try:
            processes.append(start_upstream("pub", ports["pub"], tmp_path))
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32"]},
                "tokens": {"retry_initial_s": 0.5, "retry_max_s": 1},
                "servers": {
                    "pub": {"upstream": f"127.0.0.1:{ports['pub']}"},
                    "tok": {"upstream": f"http://127.0.0.1:{ports['pub']}/mcp/pub", "oauth2": {
                        "token_url": tokens.url, "client_id": "c", "client_secret": "s"}}},
            }
            path = tmp_path / "sidecar.yaml"
            path.write_text(yaml.safe_dump(config))
            bootstrap = envoy_config(path, "--listen", f"127.0.0.1:{ports['envoy']}",
                                     "--admin", f"127.0.0.1:{ports['envoy_admin']}",
                                     "--workers", str(workers))
            sidecar = Process("sidecar", [sys.executable, "-m", "ext_authz", "serve",
                                          "--config", str(path), "--workers", str(workers)],
                              tmp_path)
            processes.append(sidecar)
            processes[0].wait_port(ports["pub"])
            yield Gateway(f"http://127.0.0.1:{ports['envoy']}", ports["envoy_admin"],
                          sidecar, bootstrap), tokens
        finally:
            for process in reversed(processes):
                process.stop()


def test_a_lone_sidecar_not_yet_warm_still_decides(
        gateway: tuple[Gateway, TokenEndpoint], tmp_path: Path) -> None:
    """Its health is NOT_SERVING while the token endpoint fails; Envoy (panic routing with
    every endpoint unhealthy) asks it anyway, and it answers each server for itself: the one
    without oauth2 is served, the one whose token it lacks gets 503 with the reason. Once the
    token comes, Envoy sees it healthy within a check or two (2 s apart), not after the 60 s
    Envoy leaves a cluster with no traffic."""
    stack, tokens = gateway
    tokens.mode, tokens.status = "status", 500
    until(lambda: tokens.count >= 1)
    envoy = start_envoy(stack.bootstrap, tmp_path, stack.envoy_admin)
    try:
        assert stack.sidecar_hosts() == ["/failed_active_hc"]
        status, body = stack.post("/mcp/pub")
        assert status == 200, body
        status, body = stack.post("/mcp/tok")
        assert (status, json.loads(body)) == (503, {"error": "upstream_credentials_unavailable"})
        tokens.healthy()
        took = until(lambda: stack.sidecar_hosts() == ["healthy"], timeout=10)
        print(f"sidecar seen healthy {took:.1f} s after its token came")
        assert stack.post("/mcp/tok")[0] == 200
    finally:
        envoy.stop()


@pytest.mark.parametrize("gateway", [2], indirect=True)
def test_a_hung_worker_is_passed_over(gateway: tuple[Gateway, TokenEndpoint],
                                      tmp_path: Path) -> None:
    """Of two workers, one stops answering (SIGSTOP): after its failed checks Envoy sends
    every request to the other, and none fails."""
    stack, _ = gateway
    envoy = start_envoy(stack.bootstrap, tmp_path, stack.envoy_admin)
    children: list[int] = []
    try:
        until(lambda: stack.sidecar_hosts() == ["healthy", "healthy"], timeout=10)
        children += workers_of(stack.sidecar.popen.pid)
        assert len(children) == 2
        hung = children[1]
        os.kill(hung, signal.SIGSTOP)
        until(lambda: [flags.startswith("/failed_active_hc") for flags in stack.sidecar_hosts()]
              == [False, True], timeout=15)
        started = time.monotonic()
        statuses = [stack.post(path)[0] for _ in range(10) for path in ("/mcp/pub", "/mcp/tok")]
        assert statuses == [200] * 20
        assert time.monotonic() - started < 10  # none waited on the hung worker's timeout
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
        envoy.stop()


def workers_of(pid: int) -> list[int]:
    """The child processes of `pid`, oldest first (worker 0 first)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:  # ppid
                found.append((int(fields[19]), int(stat.parent.name)))  # start time
    return [child for _, child in sorted(found)]
