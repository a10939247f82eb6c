"""The status page's HTTP surface on a real sidecar: what it serves, to whom, and what it
keeps (nothing). The page itself runs in a real browser in tests/e2e/test_page_browser.py."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ext_authz.policy.config import load_config, parse_yaml
from ext_authz.server import Sidecar
from tests.token_endpoint import TokenEndpoint

TOKEN = "s3cret-admin-token-0123456789"
PAGE = Path(__file__).resolve().parents[1] / "ext_authz/ops/page"


def config(token_url: str, **admin: Any) -> dict[str, Any]:
    return {
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0", **admin},
        "network": {"internal_ranges": ["10.0.0.0/8"],
                    "networks": {"partners": ["198.51.100.0/24"]}},
        "tokens": {"retry_initial_s": 0.1, "retry_max_s": 0.2},
        "servers": {
            "pub": {"title": "<img src=x onerror=alert(1)>",
                    "tools": {"delete": {"available_on_public_internet": False}}},
            "crm": {"available_on_public_internet": False, "visible_to": ["partners"],
                    "oauth2": {"token_url": token_url, "client_id": "crm",
                               "client_secret": "the-client-secret"}},
        },
    }


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


async def start(path: Path, data: dict[str, Any]) -> Sidecar:
    write(path, data)
    sidecar = Sidecar(load_config(path), path, grace_s=0.5)
    await sidecar.start()
    return sidecar


@pytest.fixture
async def page(tmp_path: Path, token_endpoint: TokenEndpoint) -> AsyncIterator[
        tuple[Sidecar, httpx.AsyncClient]]:
    sidecar = await start(tmp_path / "c.yaml", config(token_endpoint.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sidecar.admin_port}") as http:
        yield sidecar, http
    await sidecar.stop()


class TestServed:
    async def test_the_page_and_its_files(self, page: tuple[Sidecar, httpx.AsyncClient]
                                          ) -> None:
        _, http = page
        for path, kind in (("/", "text/html"), ("/page.js", "text/javascript"),
                           ("/page.css", "text/css")):
            response = await http.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(kind)
            assert response.headers["content-security-policy"].startswith("default-src 'self'")
            assert response.headers["x-content-type-options"] == "nosniff"

    def test_nothing_inline_and_nothing_elsewhere(self) -> None:
        """No inline script or style, no handler attribute, no URL of another origin, and
        the script never writes HTML (every string goes in as text)."""
        html = (PAGE / "index.html").read_text()
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
        assert not re.search(r"\son[a-z]+=|\sstyle=|<style", html)
        script = (PAGE / "page.js").read_text()
        for text in (html, script, (PAGE / "page.css").read_text()):
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text)
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(",
                             script)

    async def test_status(self, page: tuple[Sidecar, httpx.AsyncClient],
                          token_endpoint: TokenEndpoint) -> None:
        sidecar, http = page
        await sidecar.tokens.wait_ready()
        status = (await http.get("/api/status")).json()
        servers = {s["name"]: s for s in status["servers"]}
        assert servers["pub"]["badge"] == "Public"
        assert servers["pub"]["title"] == "<img src=x onerror=alert(1)>"  # as data, escaped by JSON
        assert servers["pub"]["rules"] == {"tools": 1, "prompts": 0, "resources": 0}
        assert servers["crm"]["badge"] == "visible to: partners"
        assert servers["crm"]["token"]["state"] == "warm"
        assert servers["pub"]["token"] == {"state": "none"}
        assert status["you"]["client_ip"] == "127.0.0.1"
        assert status["matrix"]["callers"] == ["external", "internal", "partners"]
        cells = {r["item"]: r["cells"] for r in status["matrix"]["rows"]}
        assert cells["servers.crm"] == {"external": "hidden", "internal": "visible",
                                        "partners": "visible"}
        assert cells["servers.pub.tools.delete"]["external"] == "hidden"
        text = json.dumps(status)
        assert "the-client-secret" not in text
        assert all(token not in text for token in token_endpoint.issued)

    async def test_a_failing_token_is_said_with_its_reason(
            self, tmp_path: Path, token_endpoint: TokenEndpoint) -> None:
        token_endpoint.mode, token_endpoint.status = "status", 401
        sidecar = await start(tmp_path / "c.yaml", config(token_endpoint.url))
        try:
            async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{sidecar.admin_port}") as http:
                for _ in range(100):
                    crm = next(s for s in (await http.get("/api/status")).json()["servers"]
                               if s["name"] == "crm")
                    if crm["token"]["state"] == "failing":
                        break
            assert crm["token"]["state"] == "failing"
            assert "credentials refused" in crm["token"]["error"]
            assert "the-client-secret" not in json.dumps(crm)
        finally:
            await sidecar.stop()

    async def test_a_reload_and_a_refused_one(self, page: tuple[Sidecar, httpx.AsyncClient],
                                              tmp_path: Path, token_endpoint: TokenEndpoint
                                              ) -> None:
        sidecar, http = page
        data = config(token_endpoint.url)
        data["servers"]["new"] = {}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        assert await sidecar.reload()
        status = (await http.get("/api/status")).json()
        assert (status["generation"], status["last_reload"]["ok"]) == (2, True)
        assert "new" in [s["name"] for s in status["servers"]]
        data["servers"]["new"] = {"visible_to": ["nobody"]}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        assert not await sidecar.reload()
        status = (await http.get("/api/status")).json()
        assert status["generation"] == 2
        assert status["last_reload"]["ok"] is False
        assert any(p.startswith("servers.new.visible_to") for p in
                   status["last_reload"]["problems"])

    async def test_decisions_as_the_log_has_them(
            self, page: tuple[Sidecar, httpx.AsyncClient]) -> None:
        sidecar, http = page
        policy = sidecar.serving.state.policy
        from ext_authz.policy.decision import RequestFacts, decide

        for peer, path in (("203.0.113.9", "/mcp/crm"), ("198.51.100.7", "/mcp/crm"),
                           ("203.0.113.9", "/mcp/pub")):
            facts = RequestFacts(peer, None, path, "gw")
            sidecar.serving.record(decide(facts, policy), "id", facts, 0.001)
        found = (await http.get("/api/decisions", params={"server": "crm"})).json()
        assert [(d["network"], d["reason"]) for d in found["decisions"]] == [
            ("partners", "allowed"), ("external", "not_found")]
        assert set(found["decisions"][0]) >= {"time", "decision_id", "server", "client_ip",
                                             "reason", "allowed", "rule", "path"}
        refused = (await http.get("/api/decisions", params={"reason": "not_found"})).json()
        assert [d["server"] for d in refused["decisions"]] == ["crm"]


class TestAsked:
    async def test_try_is_what_check_says(self, page: tuple[Sidecar, httpx.AsyncClient],
                                          tmp_path: Path) -> None:
        _, http = page
        body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete"}}'
        tried = (await http.post("/api/try", json={
            "peer": "203.0.113.9", "path": "/mcp/pub", "body": body})).json()
        checked = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "ext_authz", "check", "--config", str(tmp_path / "c.yaml"),
            "--peer", "203.0.113.9", "--path", "/mcp/pub", "--body", body, "--host",
            "gateway"], capture_output=True, text=True, timeout=60, check=True)
        assert tried == json.loads(checked.stdout)
        assert (tried["reason"], tried["allowed"], tried["renamed"]) == (
            "tool_hidden", False, True)

    async def test_preview_a_toggle_and_a_paste(
            self, page: tuple[Sidecar, httpx.AsyncClient], tmp_path: Path) -> None:
        sidecar, http = page
        before = (tmp_path / "c.yaml").read_text()
        toggled = (await http.post("/api/preview", json={"toggle_public": "crm"})).json()
        assert toggled["valid"]
        assert toggled["diff"]["widens_external"]
        assert [(c["caller"], c["item"], c["after"]) for c in toggled["diff"]["changes"]] == [
            ("external", "servers.crm", "visible")]
        # The YAML to commit is the running config with the flag turned, and valid.
        proposed = parse_yaml(toggled["yaml"], env={"REDACTED": "x"}, secrets=False)
        assert proposed.servers["crm"].available_on_public_internet is True
        assert "the-client-secret" not in json.dumps(toggled)  # written inline: redacted
        assert "client_secret: ${REDACTED}" in toggled["yaml"]
        assert (tmp_path / "c.yaml").read_text() == before  # nothing written
        assert sidecar.serving.state.generation == 1  # nothing applied
        broken = (await http.post("/api/preview", json={"config": "servers: {a: {bad: 1}}"})
                  ).json()
        assert broken["valid"] is False
        assert broken["problems"] == [
            "servers.a.bad: is not a setting here (misspelt, or in the wrong section?)"]

    @pytest.mark.parametrize(("path", "send", "status"), [
        ("/api/try", {"content": b"peer=1", "headers": {"content-type": "text/plain"}}, 415),
        ("/api/preview", {"content": b"{}" + b" " * 300_000,
                          "headers": {"content-type": "application/json"}}, 413),
        ("/api/try", {"content": b"[1]", "headers": {"content-type": "application/json"}}, 400),
        ("/api/preview", {"json": {"toggle_public": "nope"}}, 400),
        ("/api/status", {"json": {}}, 405),
    ])
    async def test_what_is_refused(self, page: tuple[Sidecar, httpx.AsyncClient], path: str,
                                   send: dict[str, Any], status: int) -> None:
        _, http = page
        assert (await http.post(path, **send)).status_code == status

    async def test_a_burst_is_limited(self, page: tuple[Sidecar, httpx.AsyncClient]) -> None:
        _, http = page
        codes = [(await http.post("/api/preview", json={"toggle_public": "crm"})).status_code
                 for _ in range(30)]
        assert codes[:10] == [200] * 10
        assert 429 in codes


class TestAuth:
    @pytest.fixture
    async def guarded(self, tmp_path: Path, token_endpoint: TokenEndpoint) -> AsyncIterator[
            httpx.AsyncClient]:
        (tmp_path / "token").write_text(f"  {TOKEN}\n")
        sidecar = await start(tmp_path / "c.yaml", config(
            token_endpoint.url, auth={"token_file": str(tmp_path / "token")}))
        async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{sidecar.admin_port}") as http:
            yield http
        await sidecar.stop()

    @pytest.mark.parametrize("path", ["/", "/page.js", "/api/status", "/api/decisions"])
    async def test_the_page_takes_the_token(self, guarded: httpx.AsyncClient,
                                            path: str) -> None:
        refused = await guarded.get(path)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith('Basic realm="mcp-ext-authz"')
        assert TOKEN not in refused.text
        assert (await guarded.get(path, headers={"authorization": f"Bearer {TOKEN}"})
                ).status_code == 200
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert (await guarded.get(path, headers={"authorization": f"Basic {basic}"})
                ).status_code == 200
        for wrong in (f"Bearer {TOKEN}x", "Bearer x", f"Token {TOKEN}",
                      "Basic " + base64.b64encode(b"anyone:nope").decode(), "Basic %%%"):
            assert (await guarded.get(path, headers={"authorization": wrong})
                    ).status_code == 401

    @pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/tokens/crm"])
    async def test_the_rest_stays_open(self, guarded: httpx.AsyncClient, path: str) -> None:
        assert (await guarded.get(path)).status_code != 401

    async def test_a_page_off_is_not_found(self, tmp_path: Path,
                                           token_endpoint: TokenEndpoint) -> None:
        sidecar = await start(tmp_path / "c.yaml", config(token_endpoint.url, page=False))
        try:
            async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{sidecar.admin_port}") as http:
                assert (await http.get("/")).status_code == 404
                assert (await http.get("/api/status")).status_code == 404
                assert (await http.get("/healthz")).status_code == 200
        finally:
            await sidecar.stop()
