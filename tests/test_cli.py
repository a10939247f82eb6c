"""The `check` and `validate` commands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ext_authz.cli import main
from tests.token_endpoint import TokenEndpoint

CONFIG = """
network:
  internal_ranges: [10.0.0.0/8]
  trusted_proxies: [192.168.1.0/24]
servers:
  pub: {}
  priv: {available_on_public_internet: false}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ext_authz", *argv], capture_output=True,
                          text=True, check=False, timeout=60)


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["check", *argv]) == 0
    return dict(json.loads(capsys.readouterr().out))


class TestCheck:
    def test_report_fields(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The JSON has every documented field; a denial still exits 0."""
        report = check(capsys, "--config", str(config), "--peer", "192.168.1.1",
                       "--xff", "10.0.0.1, 8.8.8.8", "--path", "/mcp/priv")
        assert report["client_ip"] == "8.8.8.8"
        assert report["network"] == "external"
        assert report["server"] == "priv"
        assert report["allowed"] is False
        assert report["http_status"] == 404
        assert report["reason"] == "not_found"
        assert report["inject_token"] is False
        assert any("first untrusted hop" in s for s in report["steps"])

    def test_allowed_internal(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An internal client via a trusted proxy sees the internal server."""
        report = check(capsys, "--config", str(config), "--peer", "192.168.1.1",
                       "--xff", "10.0.0.1", "--path", "/mcp/priv")
        assert (report["allowed"], report["http_status"], report["network"]) == (
            True, 200, "internal")

    def test_body_names_the_tool_and_the_rule(self, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """--body (or --body-file) is read as Envoy would send it; tool and rule reported."""
        path = tmp_path / "tools.yaml"
        path.write_text(CONFIG + "  gh: {tools: {delete_repo: {available_on_public_internet:"
                                 " false}}}\n")
        body = '{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_repo"}}'
        report = check(capsys, "--config", str(path), "--peer", "8.8.8.8", "--path", "/mcp/gh",
                       "--body", body)
        assert (report["reason"], report["http_status"], report["tool"]) == (
            "tool_not_found", 200, "delete_repo")
        assert report["tools_called"] == ["delete_repo"]
        assert report["rule"] == "servers.gh.tools.delete_repo.available_on_public_internet"
        assert json.loads(report["reply"])["id"] == 9
        (tmp_path / "body.json").write_text(body)
        inside = check(capsys, "--config", str(path), "--peer", "10.1.1.1", "--path", "/mcp/gh",
                       "--body-file", str(tmp_path / "body.json"))
        assert (inside["allowed"], inside["rule"]) == (True, "network.internal_ranges")

    @pytest.mark.parametrize(
        ("headers", "reason", "status", "words"),
        [
            ([], "tool_not_found", 200, None),
            (["Content-Type: application/json; charset=utf-7"], "bad_mcp_request", 400,
             "Content-Type"),
            (["Content-Type: text/plain"], "bad_mcp_request", 400, "Content-Type"),
            (["Mcp-Method: tools/call", "Mcp-Name: delete_repo", "Mcp-Name: whoami"],
             "bad_mcp_request", 400, "more than once"),
            (["Mcp-Name: =?base64?ZGVsZXRlX3JlcG8=?="], "tool_not_found", 200, None),
            (["Mcp-Name: whoami"], "bad_mcp_request", 400, "another name"),
            (["Content-Encoding: gzip"], "bad_mcp_request", 400, "Content-Encoding"),
        ],
    )
    def test_headers_are_judged_as_live(self, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        headers: list[str], reason: str, status: int,
                                        words: str | None) -> None:
        """--header dry-runs the headers that say how to read a body (repeats included)."""
        path = tmp_path / "tools.yaml"
        path.write_text(CONFIG + "  gh: {tools: {delete_repo: {available_on_public_internet:"
                                 " false}}}\n")
        body = '{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_repo"}}'
        argv = [arg for header in headers for arg in ("--header", header)]
        report = check(capsys, "--config", str(path), "--peer", "8.8.8.8", "--path", "/mcp/gh",
                       "--body", body, *argv)
        assert (report["reason"], report["http_status"]) == (reason, status)
        if words is not None:
            assert words in json.loads(report["reply"])["error"]["message"]

    @pytest.mark.parametrize("header", ["no-colon", ": empty-name", " Space: before"])
    def test_a_malformed_header_is_one_line(self, config: Path, header: str) -> None:
        """A --header that is not 'Name: value' is named, with no traceback."""
        result = run("check", "--config", str(config), "--peer", "1.2.3.4", "--header", header)
        assert result.returncode != 0
        assert "--header" in result.stderr
        assert "Traceback" not in result.stderr

    def test_untrusted_client_ip_is_null(self, config: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        """Garbage in XFF behind a trusted proxy: client_ip null, external."""
        report = check(capsys, "--config", str(config), "--peer", "192.168.1.1",
                       "--xff", "nonsense", "--context-extension", "mcp_server=pub")
        assert report["client_ip"] is None
        assert report["server"] == "pub"
        assert report["allowed"] is True

    async def test_fetch_token_prints_no_token(
        self, tmp_path: Path, token_endpoint: TokenEndpoint
    ) -> None:
        """--fetch-token reports length and lifetime, never the token or the secret."""
        path = tmp_path / "c.yaml"
        path.write_text(f"""
servers:
  gh: {{oauth2: {{token_url: "{token_endpoint.url}", client_id: c, client_secret: sekrit-123}}}}
""")
        import asyncio
        result = await asyncio.to_thread(run, "check", "--config", str(path), "--peer",
                                         "10.0.0.1", "--path", "/mcp/gh", "--fetch-token")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["token"]["fetched"] is True
        assert report["token"]["length"] == len(token_endpoint.issued[0])
        assert report["inject_token"] is True
        for text in (result.stdout, result.stderr):
            assert token_endpoint.issued[0] not in text
            assert "sekrit-123" not in text


class TestValidate:
    def test_valid(self, config: Path) -> None:
        """A valid config exits 0."""
        result = run("validate", "--config", str(config))
        assert result.returncode == 0
        assert "ok, 2 servers" in result.stdout

    def test_invalid_names_key_path_exit_2(self, tmp_path: Path) -> None:
        """Every problem is printed with its key path; exit status 2."""
        path = tmp_path / "bad.yaml"
        path.write_text("network: {trusted_proxies: [10.0.0.300/8]}\n"
                        "servers: {gh: {oauth2: {token_url: nope, client_id: x,"
                        " client_secret: y}}}\n")
        result = run("validate", "--config", str(path))
        assert result.returncode == 2
        assert "network.trusted_proxies[0]:" in result.stderr
        assert "servers.gh.oauth2.token_url:" in result.stderr

    def test_unknown_network_exits_2(self, tmp_path: Path) -> None:
        """A visible_to naming no configured network is reported with its key path."""
        path = tmp_path / "bad.yaml"
        path.write_text("servers: {b: {available_on_public_internet: false,"
                        " visible_to: [partners]}}\n")
        result = run("validate", "--config", str(path))
        assert result.returncode == 2
        assert "servers.b.visible_to[0]: unknown network 'partners'" in result.stderr

    def test_serve_with_bad_config_exits_2(self, tmp_path: Path) -> None:
        """`serve` refuses a bad config at start-up, naming the key, exit 2."""
        path = tmp_path / "bad.yaml"
        path.write_text("grpc: {listen: 'not an address'}\n")
        result = run("serve", "--config", str(path))
        assert result.returncode == 2
        assert "grpc.listen:" in result.stderr


class TestCheckSecrets:
    def test_dry_run_needs_no_secret(self, tmp_path: Path) -> None:
        """`check` without --fetch-token works when a secret's ${VAR} is unset."""
        path = tmp_path / "c.yaml"
        path.write_text("servers: {gh: {oauth2: {token_url: 'http://i/t', client_id: c,"
                        " client_secret: '${CHECK_TEST_UNSET_SECRET}'}}}\n")
        result = run("check", "--config", str(path), "--peer", "10.0.0.1", "--path", "/mcp/gh")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["inject_token"] is True
        # validate, and check --fetch-token, still insist on the variable.
        assert run("validate", "--config", str(path)).returncode == 2
        fetch = run("check", "--config", str(path), "--peer", "10.0.0.1", "--fetch-token")
        assert fetch.returncode == 2
        assert "CHECK_TEST_UNSET_SECRET" in fetch.stderr


class TestServeErrors:
    def test_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        """A listen address already taken ends `serve` with the key named, exit 1."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = tmp_path / "c.yaml"
            path.write_text(f"grpc: {{listen: '127.0.0.1:{port}'}}\nadmin: null\n")
            result = run("serve", "--config", str(path))
        assert result.returncode == 1
        assert f"grpc.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
        assert "Traceback" not in result.stderr
