"""`mcp-ext-authz demo`, driven as a user would: the MCP SDK client, internal and external."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.harness import ROOT, client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    out = tmp_path_factory.mktemp("demo") / "demo.out"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ext_authz", "demo", "--base-port", "0"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 90
            while "ready" not in out.read_text().splitlines():
                assert process.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            text = out.read_text()
            base = re.search(r"Envoy listens on (http://127\.0\.0\.1:\d+)", text)
            assert base is not None, text
            yield base.group(1), text
        finally:
            process.send_signal(signal.SIGINT)
            code = process.wait(30)
    assert code == 0, out.read_text()
    final = out.read_text()
    assert "demo stopped" in final
    logs = Path(re.search(r"logs: (\S+)", final).group(1))  # type: ignore[union-attr]
    # Ctrl-C stopped everything it started: the sidecar drained and said so.
    assert "stopped" in (logs / "sidecar.log").read_text()


async def test_external_client_lists_public_tools(demo: tuple[str, str]) -> None:
    """An external MCP client lists the public server's tools and sees the injected bearer."""
    base, _ = demo
    transport = httpx2.AsyncHTTPTransport(local_address="127.0.0.2")  # an external caller
    async with httpx2.AsyncClient(transport=transport) as http, Client(
        streamable_http_client(f"{base}/mcp/public", http_client=http)
    ) as mcp:
        tools = await mcp.list_tools()
        result = await mcp.call_tool("whoami", {})
    assert {tool.name for tool in tools.tools} == {"whoami", "add", "wait"}
    seen = result.structured_content or json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert seen["server"] == "public"
    assert seen["authorization"].startswith("Bearer demo-demo-public-")


def test_external_client_gets_404_for_internal(demo: tuple[str, str]) -> None:
    """The internal-only server answers 404 to an external caller, forged XFF or not."""
    base, _ = demo
    with client("127.0.0.2") as http:
        for headers in ({}, {"x-forwarded-for": "127.0.0.1"}):
            response = http.post(f"{base}/mcp/internal", headers=headers, json={})
            assert response.status_code == 404
            assert response.json() == {"error": "not_found"}


async def test_internal_client_sees_internal_server(demo: tuple[str, str]) -> None:
    """From 127.0.0.1 the internal server is visible, with its own token."""
    base, _ = demo
    async with Client(f"{base}/mcp/internal") as mcp:
        result = await mcp.call_tool("whoami", {})
    seen = result.structured_content or json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert seen["authorization"].startswith("Bearer demo-demo-internal-")


def test_printed_commands_work(demo: tuple[str, str]) -> None:
    """The printed `check` command runs and explains the external denial."""
    base, text = demo
    line = next(x for x in text.splitlines() if x.startswith("mcp-ext-authz check"))
    argv = line.split()[1:]
    result = subprocess.run([sys.executable, "-m", "ext_authz", *argv], capture_output=True,
                            text=True, check=True, timeout=60)
    assert json.loads(result.stdout)["http_status"] == 404
    assert httpx.get(f"{base}/mcp/nope").status_code == 404
