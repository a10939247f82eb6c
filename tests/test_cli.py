"""The `check` and `validate` commands, run as a user would."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ext_authz import __version__
from ext_authz.cli import build_parser, main
from ext_authz.policy.config import example_config, parse_yaml
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


@pytest.mark.slow  # a real Envoy or Python process per test
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

    @pytest.mark.parametrize(("peer", "listed"), [("10.0.0.1", ["pub", "priv"]),
                                                  ("8.8.8.8", ["pub"])])
    def test_registry(self, config: Path, capsys: pytest.CaptureFixture[str], peer: str,
                      listed: list[str]) -> None:
        """GET /mcp: the registry this caller would get, and why."""
        report = check(capsys, "--config", str(config), "--peer", peer, "--path", "/mcp")
        assert (report["reason"], report["route"], report["http_status"]) == (
            "registry", "registry", 200)
        assert [s["name"] for s in json.loads(report["reply"])["servers"]] == listed
        assert f"lists: {', '.join(listed)}" in report["steps"]
        post = check(capsys, "--config", str(config), "--peer", peer, "--path", "/mcp",
                     "--method", "POST")
        assert post["reason"] == "not_found"

    @pytest.mark.parametrize(("peer", "reason"), [("10.0.0.1", "allowed"),
                                                  ("8.8.8.8", "not_found")])
    def test_discovery(self, config: Path, capsys: pytest.CaptureFixture[str], peer: str,
                       reason: str) -> None:
        """A server's RFC 9728 metadata path: visible or the unknown server's 404."""
        report = check(capsys, "--config", str(config), "--peer", peer, "--host", "gw.example",
                       "--path", "/.well-known/oauth-protected-resource/mcp/priv")
        assert (report["reason"], report["route"], report["server"]) == (
            reason, "discovery", "priv")
        assert any("protected-resource metadata" in step for step in report["steps"])

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
            "tool_hidden", 200, "delete_repo")
        assert report["tools_called"] == ["delete_repo"]
        assert report["rule"] == "servers.gh.tools.delete_repo.available_on_public_internet"
        assert report["reply"] is None  # the server answers, under a fresh name
        assert any("fresh name" in step for step in report["steps"])
        (tmp_path / "body.json").write_text(body)
        inside = check(capsys, "--config", str(path), "--peer", "10.1.1.1", "--path", "/mcp/gh",
                       "--body-file", str(tmp_path / "body.json"))
        assert (inside["allowed"], inside["rule"]) == (True, "network.internal_ranges")

    @pytest.mark.parametrize(
        ("headers", "reason", "status", "words"),
        [
            ([], "tool_hidden", 200, None),
            (["Content-Type: application/json; charset=utf-7"], "bad_mcp_request", 400,
             "Content-Type"),
            (["Content-Type: text/plain"], "bad_mcp_request", 400, "Content-Type"),
            (["Mcp-Method: tools/call", "Mcp-Name: delete_repo", "Mcp-Name: whoami"],
             "bad_mcp_request", 400, "more than once"),
            (["Mcp-Name: =?base64?ZGVsZXRlX3JlcG8=?="], "tool_hidden", 200, None),
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

    async def test_a_failed_fetch_is_a_failed_check(
        self, tmp_path: Path, token_endpoint: TokenEndpoint
    ) -> None:
        """A fetch that fails exits 1, and every field and step says 503, not allowed."""
        token_endpoint.mode = "status"
        path = tmp_path / "c.yaml"
        path.write_text(f"""
servers:
  gh: {{oauth2: {{token_url: "{token_endpoint.url}", client_id: c, client_secret: s}},
        tools: {{t: {{available_on_public_internet: false}}}}}}
""")
        call = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}'
        for extra in ([], ["--body", call]):  # a hidden tool's check too: the token first
            result = await asyncio.to_thread(
                run, "check", "--config", str(path), "--peer", "8.8.8.8", "--path",
                "/mcp/gh", "--fetch-token", *extra)
            assert result.returncode == 1
            assert result.stderr.startswith("check: token fetch failed: server 'gh'")
            report = json.loads(result.stdout)
            assert (report["allowed"], report["reason"], report["http_status"]) == (
                False, "upstream_credentials_unavailable", 503)
            assert report["steps"][-1] == "decision: upstream_credentials_unavailable (HTTP 503)"
            assert report["token"]["fetched"] is False


@pytest.mark.slow  # a real Envoy or Python process per test
class TestValidate:
    def test_valid(self, config: Path) -> None:
        """A valid config exits 0."""
        result = run("validate", "--config", str(config))
        assert result.returncode == 0
        assert "ok, 2 servers" in result.stdout

    @pytest.mark.parametrize(("text", "said"), [
        ("", "(file): empty: a config names its MCP servers under `servers`"),
        ("grpc: {listen: '127.0.0.1:7000'}\nadmin: {listen: '127.0.0.1:7000'}\n"
         "servers: {a: {}}\n", "admin.listen: 127.0.0.1:7000 is where grpc.listen"),
        ("grpc: {listen: 9191}\nservers: {a: {}}\n", "grpc.listen: give host:port"),
        ("network: {networks: {p: 10.0.0.0/8}}\nservers: {a: {}}\n",
         "network.networks.p: write a network as a list of CIDRs ([10.0.0.0/8])"),
        ("servers: {a: {\n", "(yaml) line 2, column 1:"),
    ])
    def test_each_slip_is_one_line_of_its_own(self, tmp_path: Path, text: str,
                                              said: str) -> None:
        """As an operator meets them: one line under the file's name, exit 2."""
        path = tmp_path / "c.yaml"
        path.write_text(text)
        result = run("validate", "--config", str(path))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"invalid config {path}:",
                                              result.stderr.splitlines()[1]]
        assert result.stderr.splitlines()[1].strip().startswith(said)

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


@pytest.mark.slow  # a real Envoy or Python process per test
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


class TestCheckExchange:
    CONFIG = ("jwt: {issuer: https://login, audiences: [gw], jwks_file: /j}\n"
              "servers: {crm: {token_exchange: {token_url: 'http://127.0.0.1:9/t',"
              " client_id: c, client_secret: s, actor_token: true}}}\n")

    def test_a_dry_run_says_the_token_would_be_exchanged(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(self.CONFIG)
        report = check(capsys, "--config", str(path), "--peer", "8.8.8.8", "--path",
                       "/mcp/crm")
        assert report["inject_token"] is True
        assert any("would be exchanged" in step and "as the actor" in step
                   for step in report["steps"])

    def test_a_subject_token_is_exchanged_only_with_fetch_token(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(self.CONFIG)
        token = tmp_path / "jwt"
        token.write_text("a.b.c")
        assert main(["check", "--config", str(path), "--peer", "8.8.8.8", "--path",
                     "/mcp/crm", "--subject-token", str(token)]) == 2
        assert "--subject-token is exchanged only with --fetch-token" in (
            capsys.readouterr().err)

    def test_a_subject_that_will_not_do_fails_the_check(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """No token endpoint is asked (its port refuses): the subject is refused first."""
        path = tmp_path / "c.yaml"
        path.write_text(self.CONFIG.replace(", actor_token: true", ""))
        token = tmp_path / "jwt"
        token.write_text("not-a-jwt")
        assert main(["check", "--config", str(path), "--peer", "8.8.8.8", "--path",
                     "/mcp/crm", "--subject-token", str(token), "--fetch-token"]) == 1
        out, err = capsys.readouterr()
        assert json.loads(out)["reason"] == "subject_token_refused"
        assert "--subject-token: not a JWT whose payload decodes" in err


@pytest.mark.slow  # a real Envoy or Python process per test
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


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A valid config, a config that is not UTF-8, and a few paths to get wrong."""
    valid = tmp_path / "valid.yaml"
    valid.write_text(CONFIG)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"servers: {a: {}}\n# caf\xe9\n")
    unwritable = tmp_path / "log-dir"
    unwritable.mkdir()
    logging_config = tmp_path / "log.yaml"
    logging_config.write_text("grpc: {listen: 127.0.0.1:0}\nadmin: null\n"
                              f"decision_log: {{path: '{unwritable}'}}\nservers: {{a: {{}}}}\n")
    huge_timeout = tmp_path / "huge.yaml"
    huge_timeout.write_text("tokens: {timeout_s: 1e12}\nservers: {a: {}}\n")
    return {"valid": valid, "latin1": latin1, "dir": tmp_path, "missing": tmp_path / "nope",
            "log": logging_config, "huge": huge_timeout}


MISTAKES = [
    # (argv, exit code, words in the one line); {name} is a path from `files`
    (["--log-level", "debugg", "validate", "--config", "{valid}"], 2, "--log-level"),
    (["frobnicate"], 2, "invalid choice"),
    (["validate"], 2, "--config"),
    (["validate", "--config", "{missing}"], 2, "cannot read"),
    (["validate", "--config", "{latin1}"], 2, "not UTF-8"),
    (["validate", "--config", "{huge}"], 2, "tokens.timeout_s: must be at most 300"),
    (["check", "--config", "{valid}", "--peer", "1.2.3.4", "--body-file", "{missing}"], 2,
     "--body-file"),
    (["check", "--config", "{valid}", "--peer", "1.2.3.4", "--body-file", "{dir}"], 2,
     "--body-file"),
    (["check", "--config", "{valid}", "--peer", "1.2.3.4", "--context-extension", "x"], 2,
     "--context-extension"),
    (["check", "--config", "{valid}", "--peer", "1.2.3.4", "--header", "x"], 2, "--header"),
    (["serve", "--config", "{log}"], 1, "decision_log.path"),
    (["serve", "--workers", "0"], 2, "--workers"),
    (["serve", "--grace", "-1"], 2, "--grace"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--output", "{dir}"], 2, "is a directory"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--output", "{missing}/envoy.yaml"], 2,
     "does not exist"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--workers", "0"], 2, "--workers"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=https://h:99999",
      "--upstream", "priv=127.0.0.1:2"], 2, "not a number from 1 to 65535"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=ftp://h",
      "--upstream", "priv=127.0.0.1:2"], 2, "only http:// and https://"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--idle-timeout", "-5"], 2, "--idle-timeout"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--sidecar", "unix:"], 2, "unix: needs a path"),
    (["envoy-config", "--config", "{valid}", "--upstream", "pub=127.0.0.1:1",
      "--upstream", "priv=127.0.0.1:2", "--upstream-ca", "{valid}"], 2,
     "no upstream is an https:// URL"),
    (["demo", "--base-port", "70000"], 2, "--base-port"),
]


@pytest.mark.slow  # a real Envoy or Python process per test
class TestMistakes:
    @pytest.mark.parametrize(("argv", "code", "words"), MISTAKES,
                             ids=[" ".join(m[0])[:60] for m in MISTAKES])
    def test_one_line_and_an_exit_code(self, files: dict[str, Path], argv: list[str],
                                       code: int, words: str) -> None:
        """Whatever the mistake, a line that names it, a non-zero exit, and no traceback."""
        result = run(*(arg.format(**files) for arg in argv))
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        # A bad config lists its problems under one heading line; anything else is one line.
        problems = lines[1:] if lines and lines[0].startswith("invalid config") else lines
        assert [line for line in problems if words in line], result.stderr
        assert len(problems) == 1, result.stderr

    def test_a_busy_demo_port_is_named_with_the_way_out(self) -> None:
        """demo on a taken port says which, and how to pick free ones."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run("demo", "--base-port", str(port))
        assert result.returncode == 1
        assert f"port {port} (envoy) is in use" in result.stderr
        assert "--base-port 0" in result.stderr
        assert "Traceback" not in result.stderr

    def test_a_failed_envoy_config_leaves_no_file(self, files: dict[str, Path]) -> None:
        """--output is written whole or not at all; a failure leaves nothing behind."""
        output = files["dir"] / "envoy.yaml"
        result = run("envoy-config", "--config", str(files["valid"]), "--upstream",
                     "pub=127.0.0.1:1", "--output", str(output))
        assert result.returncode == 2
        assert "no upstream for server(s): priv" in result.stderr
        assert not output.exists()
        assert list(files["dir"].glob(".envoy.yaml.*")) == []
        ok = run("envoy-config", "--config", str(files["valid"]), "--upstream",
                 "pub=127.0.0.1:1", "--upstream", "priv=127.0.0.1:2", "--output", str(output))
        assert ok.returncode == 0, ok.stderr
        assert output.read_text().startswith("# Generated by `mcp-ext-authz envoy-config`")


@pytest.mark.slow  # a real Envoy or Python process per test
class TestSmallThings:
    def test_version(self) -> None:
        """--version prints the package version."""
        result = run("--version")
        assert (result.returncode, result.stdout.strip()) == (0, f"mcp-ext-authz {__version__}")

    def test_every_option_has_help(self) -> None:
        """Every option of every command says what it is for."""
        parser = build_parser()
        subparsers = next(a for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction))
        for name, command in subparsers.choices.items():
            for action in command._actions:
                if action.option_strings and action.help != argparse.SUPPRESS:
                    assert action.help, f"{name} {action.option_strings}"

    def test_example_config_is_the_built_in_one(self, tmp_path: Path) -> None:
        """example-config prints the served default, comments and all, and it validates."""
        result = run("example-config")
        assert result.returncode == 0
        assert "# The built-in example config" in result.stdout
        path = tmp_path / "example.yaml"
        path.write_text(result.stdout)
        assert parse_yaml(result.stdout) == example_config()
        assert run("validate", "--config", str(path)).returncode == 0

    def test_warnings_go_to_stderr(self, tmp_path: Path) -> None:
        """A config that trusts every address validates, with a warning saying why not."""
        path = tmp_path / "c.yaml"
        path.write_text("network: {trusted_proxies: ['0.0.0.0/0']}\n")
        result = run("validate", "--config", str(path))
        assert result.returncode == 0
        assert "warning: network.trusted_proxies[0]: 0.0.0.0/0 holds every address" in (
            result.stderr)

    def test_exit_code_on_denial(self, config: Path) -> None:
        """check --exit-code: 1 when denied, 0 when allowed; without it, 0 either way."""
        base = ["check", "--config", str(config), "--peer", "8.8.8.8"]
        assert run(*base, "--path", "/mcp/priv", "--exit-code").returncode == 1
        assert run(*base, "--path", "/mcp/pub", "--exit-code").returncode == 0
        assert run(*base, "--path", "/mcp/priv").returncode == 0

    def test_a_hidden_tool_is_not_allowed(self, tmp_path: Path) -> None:
        """A hidden tool's call goes on renamed, for the server to answer: not allowed, and
        --exit-code says so; `renamed` says where it went."""
        path = tmp_path / "c.yaml"
        path.write_text("servers: {gh: {tools: {t: {available_on_public_internet: false}}}}\n")
        call = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}'
        result = run("check", "--config", str(path), "--peer", "8.8.8.8", "--path", "/mcp/gh",
                     "--body", call, "--exit-code")
        report = json.loads(result.stdout)
        assert (result.returncode, report["reason"], report["allowed"], report["renamed"]) == (
            1, "tool_hidden", False, True)

    def test_envoy_config_needs_no_secrets(self, tmp_path: Path) -> None:
        """Unset ${VAR}s and unreadable secret files do not stop envoy-config."""
        path = tmp_path / "c.yaml"
        path.write_text(f"""
servers:
  a: {{oauth2: {{token_url: "http://i/t", client_id: c, client_secret: "${{NOT_SET_ANYWHERE}}"}}}}
  b: {{oauth2: {{token_url: "http://i/t", client_id: c, client_secret_file: "{tmp_path}/x"}}}}
""")
        result = run("envoy-config", "--config", str(path), "--upstream", "a=127.0.0.1:1",
                     "--upstream", "b=127.0.0.1:2")
        assert result.returncode == 0, result.stderr
        assert "NOT_SET_ANYWHERE" not in result.stdout
