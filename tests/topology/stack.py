"""Bring a compose Topology up in network namespaces, and act from inside them.

One namespace per service, one bridge per compose network (in the Lab's hub namespace),
each service's real process started with `ip netns exec` in dependency order, each waited
for by its own health check (or, lacking one, its listening port or Envoy's /ready).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import Process
from tests.raw_http import RawResponse, raw_exchange
from tests.topology.compose import ROOT, Service, Topology
from tests.topology.netns import Lab, netns_exec, run_in

# The compose servers whose tool rules the sidecar judges on the body: in the native data
# path the only ones whose requests the sidecar sees.
TOOL_SERVERS = frozenset(
    name for name, server in yaml.safe_load(
        (ROOT / "envoy/compose/sidecar.yaml").read_text())["servers"].items()
    if (server or {}).get("tools"))

START_TIMEOUT_S = 60


def _http_get(host: str, port: int, path: str) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _envoy_admin_port(service: Service) -> int:
    config = Path(service.argv[service.argv.index("-c") + 1])
    admin = yaml.safe_load(config.read_text())["admin"]["address"]["socket_address"]
    return int(admin["port_value"])


class Stack:
    """A Topology running in a Lab: namespaces, links, processes; `down()` stops them."""

    def __init__(self, topology: Topology, lab: Lab, workdir: Path,
                 data_path: str = "ext_authz") -> None:
        self.topology = topology
        self.lab = lab
        self.workdir = workdir
        self.data_path = data_path  # which envoy-config output the compose Envoy runs
        self.namespaces: dict[str, str] = {}
        self.processes: dict[str, Process] = {}

    def sidecar_decides(self, server: str) -> bool:
        """Whether the sidecar is asked about this server's requests (and logs a decision):
        always in the ext_authz data path, in the native one only where tool rules are."""
        return self.data_path == "ext_authz" or server in TOOL_SERVERS

    def up(self) -> Stack:
        """Build the networks, then start every service once its dependencies are healthy."""
        bridges = {name: self.lab.bridge(name, network.gateways())
                   for name, network in self.topology.networks.items()}
        for service in self.topology.services.values():
            namespace = self.lab.namespace(service.name)
            self.namespaces[service.name] = namespace
            for index, (network, addresses) in enumerate(service.addresses.items()):
                self.lab.link(namespace, f"eth{index}", bridges[network], addresses)
            self.lab.write_hosts(namespace, self.topology.hosts_for(service.name))
        for service in self.topology.start_order():
            if service.kind != "client":
                self.start(service.name, list(service.argv), service.name,
                           service.environment)
                if service.runs_once:
                    self._wait_done(self.processes[service.name])
                else:
                    self.wait_ready(service)
        return self

    def start(self, name: str, argv: list[str], service: str,
              env: dict[str, str] | None = None) -> Process:
        """Start a process inside a service's namespace (logs in the workdir)."""
        process = Process(name, netns_exec(self.namespaces[service], argv), self.workdir, env)
        self.processes[name] = process
        return process

    def wait_ready(self, service: Service, name: str | None = None) -> None:
        """Wait for the service's health check, Envoy's /ready, or its --port to listen."""
        process = self.processes[name or service.name]
        namespace = self.namespaces[service.name]
        argv = list(service.argv)
        if service.healthcheck is not None:
            def check() -> bool:
                return subprocess.run(netns_exec(namespace, list(service.healthcheck or ())),
                                      capture_output=True, timeout=10,
                                      check=False).returncode == 0
        elif service.kind == "envoy":
            port = _envoy_admin_port(service)

            def check() -> bool:
                return run_in(namespace, lambda: _http_get("127.0.0.1", port, "/ready")) == 200
        else:
            port = int(argv[argv.index("--port") + 1])

            def check() -> bool:
                run_in(namespace, lambda: socket.create_connection(("127.0.0.1", port), 1)
                       .close())
                return True
        self._poll(process, check)

    @staticmethod
    def _wait_done(process: Process) -> None:
        try:
            code = process.popen.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise RuntimeError(f"{process.name} ended with {code}, not 0:\n{process.output()}")

    def _poll(self, process: Process, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n"
                                   f"{process.output()}")
            try:
                if check():
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"{process.name} not ready in {START_TIMEOUT_S} s ({last}):\n"
                           f"{process.output()}")

    def in_namespace(self, service: str, function: Callable[[], Any], timeout: float = 60
                     ) -> Any:
        """Run `function` from inside a service's namespace (its sockets are born there)."""
        return run_in(self.namespaces[service], function, timeout)

    def request(self, service: str, host: str, port: int, request: bytes) -> RawResponse:
        """Send raw HTTP/1.1 bytes from a service's namespace."""
        return self.in_namespace(service, lambda: raw_exchange(host, port, request))

    def host_request(self, host: str, port: int, request: bytes) -> RawResponse:
        """Send raw HTTP/1.1 bytes from the hub namespace, as the Docker host would."""
        return run_in(self.lab.hub, lambda: raw_exchange(host, port, request))

    def json_lines(self, process: str) -> list[dict[str, Any]]:
        """The JSON lines a process has printed so far (decision logs, access logs)."""
        lines = self.processes[process].stdout_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def new_lines(self, process: str, since: int, count: int = 1,
                  timeout: float = 5) -> list[dict[str, Any]]:
        """The JSON lines printed after the first `since`, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.json_lines(process)[since:]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def down(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
