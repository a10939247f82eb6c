"""A fleet: eight Envoys on the native data path, fed by one sidecar, 10-second tokens.

Each Envoy comes from its own `envoy-config --data-path native` (its own listen and admin
ports, its own node id), `--concurrency 1`. Load runs through all of them the whole time, to
an upstream that records every request's bearer token and when it came; the token endpoint
records when it issued each token and for how long. In order:
1. every Envoy serves the oauth2 server within a bound;
2. through three refreshes and a reload, no request fails, and the token endpoint sees one
   POST per refresh for the whole fleet; the sidecar's CPU per refresh is printed;
3. SIGKILL of the sidecar: every Envoy answers 503 for the oauth2 server within the
   watchdog's bound, and the public server never fails;
4. after a restart, every Envoy serves again within a bound, and no request ever reached the
   upstream with a token past its lifetime.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.harness import Process, envoy_config, free_port, start_envoy, start_sidecar
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

ENVOYS = 8
TOKEN_S = 10  # the token endpoint's expires_in
# Used for 8 s (expires_in - expiry_buffer_s), refreshed after 6.4 s.
TOKENS = {"expiry_buffer_s": 2, "min_ttl_s": 1, "retry_initial_s": 0.2, "retry_max_s": 1}
SERVING_BOUND_S = 10.0  # from an Envoy's start (or the sidecar's restart) to its first 200
WATCHDOG_BOUND_S = 3.0  # 2 failed health checks 1 s apart, and a poll's slack


class Upstream(http.server.ThreadingHTTPServer):
    """Records (when, bearer token) of every request; answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Recorder)


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:  # the http.server method's name
        with self.server.lock:
            self.server.seen.append((time.monotonic(), self.headers.get("authorization", "")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Fleet:
    workdir: Path
    config_path: Path
    admin: int
    bases: list[str]
    tokens: TokenEndpoint
    upstream: Upstream
    processes: list[Process]
    sidecars: list[Process] = field(default_factory=list)

    @property
    def sidecar(self) -> Process:
        return self.sidecars[-1]

    def start_sidecar(self) -> None:
        sidecar = start_sidecar(self.config_path, self.workdir,
                                name=f"sidecar-{len(self.sidecars)}")
        self.sidecars.append(sidecar)
        self.processes.append(sidecar)
        sidecar.wait_http(f"http://127.0.0.1:{self.admin}/readyz")

    def cpu_s(self) -> float:
        """The sidecar's user and system CPU so far (clock ticks from /proc)."""
        fields = Path(f"/proc/{self.sidecar.popen.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = (int(value) for value in fields.split()[11:13])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _get(http: httpx.Client, url: str) -> int:
    try:
        return http.get(url).status_code
    except httpx.HTTPError:
        return 0


def until_status(base: str, server: str, status: int, bound: float) -> float:
    """Seconds until `base` answers `status` for `server` (polled); past `bound`, a failure."""
    started = time.monotonic()
    with httpx.Client(timeout=2) as http:
        while time.monotonic() - started < bound:
            if _get(http, f"{base}/mcp/{server}") == status:
                return time.monotonic() - started
            time.sleep(0.05)
    raise AssertionError(f"{base} did not answer {status} for {server} within {bound} s")


class Load:
    """Requests through every Envoy, to both servers, until stopped: (when, Envoy, server,
    status) of each."""

    def __init__(self, bases: list[str]) -> None:
        self.bases = bases
        self.results: list[tuple[float, int, str, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(len(bases))]

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                for server in ("tok", "pub"):
                    status = _get(http, f"{self.bases[index]}/mcp/{server}")
                    self.results.append((time.monotonic(), index, server, status))
                self._stop.wait(0.1)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def failed(self, since: float, server: str | None = None) -> list[tuple[float, int, str, int]]:
        return [r for r in self.results
                if r[0] >= since and r[3] != 200 and (server is None or r[2] == server)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    grpc, admin = free_port(), free_port()
    upstream = Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens:
        tokens.expires_in = TOKEN_S
        config = {
            "grpc": {"listen": f"127.0.0.1:{grpc}"},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "decision_log": {"enabled": False},
            "reload": {"watch": False},
            "tokens": TOKENS,
            "servers": {
                "pub": {"upstream": f"127.0.0.1:{upstream.server_port}"},
                "tok": {"upstream": f"127.0.0.1:{upstream.server_port}", "oauth2": {
                    "token_url": tokens.url, "client_id": "fleet", "client_secret": "s"}}},
        }
        config_path = workdir / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config))
        fleet = Fleet(workdir, config_path, admin, [], tokens, upstream, processes)
        try:
            fleet.start_sidecar()
            for index in range(ENVOYS):
                listen, envoy_admin = free_port(), free_port()
                bootstrap = envoy_config(
                    config_path, "--listen", f"127.0.0.1:{listen}",
                    "--admin", f"127.0.0.1:{envoy_admin}", "--data-path", "native",
                    "--sidecar", f"127.0.0.1:{grpc}", "--node-id", f"fleet-{index}")
                processes.append(start_envoy(bootstrap, workdir, envoy_admin,
                                             name=f"envoy-{index}"))
                fleet.bases.append(f"http://127.0.0.1:{listen}")
            yield fleet
        finally:
            for process in reversed(processes):
                process.stop()
            upstream.shutdown()
            upstream.server_close()


def test_a_fleet_of_envoys(fleet: Fleet) -> None:
    # 1. Every Envoy serves the oauth2 server within the bound.
    serving = [until_status(base, "tok", 200, SERVING_BOUND_S) for base in fleet.bases]
    print(f"\nfleet of {ENVOYS}: first 200 after {max(serving):.2f} s at most")

    with Load(fleet.bases) as load:
        # 2. Three refreshes (every 6.4 s) and a reload: nothing fails; one POST a refresh.
        started, posts, cpu = time.monotonic(), fleet.tokens.count, fleet.cpu_s()
        time.sleep(10)
        config = yaml.safe_load(fleet.config_path.read_text())
        config["servers"]["pub"]["title"] = "Reloaded"
        fleet.config_path.write_text(yaml.safe_dump(config))
        fleet.sidecar.popen.send_signal(signal.SIGHUP)
        time.sleep(11)
        refreshes = fleet.tokens.count - posts
        spent = fleet.cpu_s() - cpu
        # 21 s at one refresh every 6.4 s: three or four, each one POST for all eight.
        assert refreshes in (3, 4), refreshes
        assert load.failed(started) == []
        print(f"healthy: {len(load.results)} requests, {refreshes} refreshes and a reload,"
              f" sidecar CPU {spent:.2f} s ({spent / refreshes:.3f} s per refresh)")

        # 3. SIGKILL: 503 for the oauth2 server within the watchdog's bound, everywhere.
        killed = time.monotonic()
        fleet.sidecar.popen.kill()
        fleet.sidecar.popen.wait(10)
        down = [until_status(base, "tok", 503, WATCHDOG_BOUND_S) for base in fleet.bases]
        print(f"sidecar killed: 503 on every Envoy within {max(down):.2f} s")
        # Down until every token the Envoys hold has expired: a request that carried one
        # after the restart would show.
        newest = max(at for at, _ in fleet.tokens.lifetimes.values())
        time.sleep(max(0.0, newest + TOKEN_S + 0.5 - time.monotonic()))

        # 4. A restart: every Envoy serves again within the bound, never an expired token.
        restarted = time.monotonic()
        fleet.start_sidecar()
        back = [until_status(base, "tok", 200, SERVING_BOUND_S) for base in fleet.bases]
        print(f"sidecar restarted: every Envoy serves again within {max(back):.2f} s")
        time.sleep(2)
    assert load.failed(started, "pub") == []  # the public server never needed the sidecar
    stale = [(at, token) for at, token in list(fleet.upstream.seen)
             if token.startswith("Bearer ")
             and at > (fleet.tokens.lifetimes[token[len("Bearer "):]][0] + TOKEN_S)]
    assert stale == [], f"{len(stale)} requests with an expired token"
    assert all(token.startswith("Bearer tok-") for _, token in fleet.upstream.seen
               if token), "a request reached the upstream with another credential"
    print(f"outage {restarted - killed:.1f} s: {len(fleet.upstream.seen)} upstream requests,"
          " none with an expired token")
