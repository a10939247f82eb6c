"""Tool rules that no upstream parser, header or side door gets around, through a real Envoy.

The generated config (`envoy-config`) in front of two real MCP servers:
- `py`: the official Python SDK (the demo server); its `add` is internal-only;
- `ts`: the official TypeScript SDK behind express.json(), as its docs show it; its
  `delete_repo` is internal-only;
plus `vault`, an internal-only server with tool rules, and `outage`, whose token endpoint
fails on demand. 127.0.0.1 is internal, 127.0.0.2 external; no trusted proxies.

Each bypass of issue #14 is sent as the attacker would, and must be refused (or answered as
an unknown server) with nothing reaching the upstream. Where a real server shows what the
refusal prevents, the same bytes go to it directly too.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.harness import (
    Process,
    envoy_config,
    free_port,
    start_envoy,
    start_sidecar,
    start_ts_upstream,
    start_upstream,
)
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERNAL, EXTERNAL = "127.0.0.1", "127.0.0.2"
MAX_BODY = 65536
MCP = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
NOT_FOUND = b'{"error": "not_found"}'
UNAVAILABLE = b'{"error": "upstream_credentials_unavailable"}'


def call(name: str, rpc_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": name, "arguments": {}}}


@dataclass
class Gateway:
    base: str
    port: int
    config: Path
    ts_direct: str
    sidecar: Process
    envoy: Process
    upstreams: dict[str, Process]
    outage: TokenEndpoint

    def post(self, server: str, body: bytes | str,
             headers: list[tuple[str, str]] | dict[str, str] | None = None,
             source: str = EXTERNAL) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        sent = list(MCP.items()) if headers is None else (
            [*MCP.items(), *headers.items()] if isinstance(headers, dict) else headers)
        with httpx.Client(transport=transport, timeout=10) as http:
            return http.post(f"{self.base}/mcp/{server}", content=body, headers=sent)

    def received(self, upstream: str) -> list[dict[str, Any]]:
        """The requests an upstream logged (each prints one JSON line per request)."""
        return [r for r in self.upstreams[upstream].json_lines() if "method" in r]

    def decisions(self) -> list[dict[str, Any]]:
        return self.sidecar.json_lines()

    def new_decisions(self, since: int, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            records = self.decisions()[since:]
            if len(records) >= count:
                return records
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} decisions logged")

    def access_log(self) -> list[dict[str, Any]]:
        return self.envoy.json_lines()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("bypass")
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin", "py",
                                             "ts")}
    processes: list[Process] = []
    with ThreadedTokenEndpoint() as tokens, ThreadedTokenEndpoint() as outage:
        outage.expires_in = 3
        try:
            upstreams = {"py": start_upstream("py", ports["py"], workdir),
                         "ts": start_ts_upstream("ts", ports["ts"], workdir)}
            processes += upstreams.values()

            def oauth2(endpoint: TokenEndpoint) -> dict[str, str]:
                return {"token_url": endpoint.url, "client_id": "bypass",
                        "client_secret": "bypass-secret"}

            hidden = {"available_on_public_internet": False}
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"]},
                "mcp": {"max_body_bytes": MAX_BODY},
                "tokens": {"expiry_buffer_s": 0, "min_ttl_s": 1, "retry_initial_s": 0.2,
                           "retry_max_s": 0.5},
                "servers": {
                    "py": {"oauth2": oauth2(tokens), "tools": {"add": hidden}},
                    "ts": {"oauth2": oauth2(tokens), "tools": {"delete_repo": hidden}},
                    "vault": {**hidden, "tools": {"add": {}}},
                    "outage": {"oauth2": oauth2(outage), "tools": {"add": hidden}},
                },
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config))
            upstream_of = {"py": "py", "ts": "ts", "vault": "py", "outage": "py"}
            bootstrap = envoy_config(
                config_path, "--listen", f"127.0.0.1:{ports['envoy']}",
                "--admin", f"127.0.0.1:{ports['envoy_admin']}",
                *[arg for server, upstream in upstream_of.items()
                  for arg in ("--upstream", f"{server}=127.0.0.1:{ports[upstream]}")])
            sidecar = start_sidecar(config_path, workdir)
            processes.append(sidecar)
            upstreams["py"].wait_http(f"http://127.0.0.1:{ports['py']}/mcp/py/echo")
            upstreams["ts"].wait_http(f"http://127.0.0.1:{ports['ts']}/mcp/ts/echo")
            sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
            envoy = start_envoy(bootstrap, workdir, ports["envoy_admin"])
            processes.append(envoy)
            yield Gateway(f"http://127.0.0.1:{ports['envoy']}", ports["envoy"], config_path,
                          f"http://127.0.0.1:{ports['ts']}", sidecar, envoy, upstreams,
                          outage)
        finally:
            for process in reversed(processes):
                process.stop()


def refused(gateway: Gateway, response: httpx.Response, since: int, words: str) -> None:
    """A 400 whose JSON-RPC error says why, logged as bad_mcp_request."""
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]
    records = gateway.new_decisions(since, 2)
    assert [r["reason"] for r in records if r["phase"] == "body"] == ["bad_mcp_request"]


class TestGoDecoding:
    """Go's encoding/json matches keys case-insensitively, folds long s and Kelvin, last wins."""

    @pytest.mark.parametrize(
        "body",
        [
            '{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call",'
            '"params":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_repos",'
            '"Name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","param\u017f":{"name":"delete_repo"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo",'
            '"argument\u017f":{}}}',
        ],
        ids=["Method", "METHOD-last", "Name-last", "long-s", "long-s-arguments"],
    )
    def test_folded_keys_are_refused(self, gateway: Gateway, body: str) -> None:
        """Each of these runs delete_repo on a Go server: refused, nothing forwarded."""
        since, before = len(gateway.decisions()), len(gateway.received("ts"))
        response = gateway.post("ts", body.encode())
        refused(gateway, response, since, " case")
        assert len(gateway.received("ts")) == before

    def test_case_variants_inside_arguments_pass(self, gateway: Gateway) -> None:
        """Inside arguments the keys are the tool's own: `ID` beside `id` reaches the server."""
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "add", "arguments": {"a": 1, "b": 2, "A": 3, "id": 4,
                                                        "ID": 5}}}
        response = gateway.post("ts", json.dumps(body), source=INTERNAL)
        assert response.status_code == 200
        assert '"structuredContent":{"result":3}' in response.text


UTF7_DELETE = (b'{"jsonrpc":"2.0","id":1,"method":"tools+AC8-call",'
               b'"params":{"name":"delete+AF8-repo","arguments":{}}}')
DELETE = json.dumps(call("delete_repo"))


class TestCharsets:
    """The TypeScript SDK behind express.json() decodes the body in the charset named."""

    @pytest.mark.parametrize(
        ("charset", "body"),
        [("utf-7", UTF7_DELETE), ("UTF-7", UTF7_DELETE),
         ("utf-16le", DELETE.encode("utf-16-le")), ("utf-16be", DELETE.encode("utf-16-be")),
         ("utf-16", DELETE.encode("utf-16")), ("utf-32", DELETE.encode("utf-32")),
         ('"utf-7"', UTF7_DELETE)],
    )
    def test_other_charsets_are_refused(self, gateway: Gateway, charset: str,
                                        body: bytes) -> None:
        """Refused by the gateway; the same bytes, sent to the server itself, delete."""
        headers = {"content-type": f"application/json; charset={charset}"}
        since, before = len(gateway.decisions()), len(gateway.received("ts"))
        refused(gateway, gateway.post("ts", body, headers), since, "Content-Type")
        assert len(gateway.received("ts")) == before
        direct = httpx.post(f"{gateway.ts_direct}/mcp/ts", content=body, timeout=10,
                            headers={**MCP, **headers})
        assert '"text":"deleted"' in direct.text  # what the refusal prevents

    def test_a_bom_is_refused(self, gateway: Gateway) -> None:
        """A byte order mark: some parsers skip it, others refuse the body."""
        since = len(gateway.decisions())
        response = gateway.post("ts", b"\xef\xbb\xbf" + DELETE.encode())
        refused(gateway, response, since, "byte order mark")


class TestRoutingHeaders:
    """MCP's Mcp-Method and Mcp-Name must say what the body says, once."""

    def test_repeated_mcp_name_is_refused(self, gateway: Gateway) -> None:
        """Envoy would join two Mcp-Name headers as "add,delete", the body's very name."""
        since, before = len(gateway.decisions()), len(gateway.received("ts"))
        headers = [*MCP.items(), ("mcp-method", "tools/call"), ("mcp-name", "add"),
                   ("mcp-name", "delete_repo")]
        response = gateway.post("ts", json.dumps(call("add,delete_repo")), headers)
        refused(gateway, response, since, "Mcp-Name header is sent more than once")
        assert len(gateway.received("ts")) == before

    def test_repeated_mcp_method_is_refused(self, gateway: Gateway) -> None:
        """A second Mcp-Method no longer turns the name check off."""
        since = len(gateway.decisions())
        headers = [*MCP.items(), ("mcp-method", "tools/call"), ("mcp-method", "tools/list"),
                   ("mcp-name", "whoami")]
        response = gateway.post("ts", json.dumps(call("delete_repo")), headers)
        refused(gateway, response, since, "Mcp-Method header is sent more than once")

    def test_mismatched_mcp_name_is_refused(self, gateway: Gateway) -> None:
        """A router that goes by Mcp-Name would call delete_repo; the body says whoami."""
        since = len(gateway.decisions())
        response = gateway.post("ts", json.dumps(call("whoami")),
                                {"mcp-method": "tools/call", "mcp-name": "delete_repo"})
        refused(gateway, response, since, "another name than the body")

    def test_base64_mcp_name_passes(self, gateway: Gateway) -> None:
        """The SDKs send a non-ASCII name as =?base64?...?=: it matches, and goes through."""
        name = "r\u00e9sum\u00e9"
        encoded = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
        since, before = len(gateway.decisions()), len(gateway.received("py"))
        response = gateway.post("py", json.dumps(call(name), ensure_ascii=False).encode(),
                                {"mcp-method": "tools/call", "mcp-name": encoded})
        assert response.status_code == 200, response.text
        assert "Unknown tool" in response.text  # the server's own answer: it has no such tool
        assert [r["reason"] for r in gateway.new_decisions(since, 2)] == ["allowed", "allowed"]
        assert len(gateway.received("py")) == before + 1


class TestBodies:
    def test_lone_surrogate_id_of_a_hidden_tool_is_a_400(self, gateway: Gateway) -> None:
        """Once a 500 with a stack trace on every request; now a clear refusal."""
        since = len(gateway.decisions())
        body = '{"jsonrpc":"2.0","id":"\\ud800","method":"tools/call","params":{"name":"add"}}'
        refused(gateway, gateway.post("py", body), since, "lone UTF-16 surrogate")
        assert "Traceback" not in gateway.sidecar.stderr_path.read_text()

    @pytest.mark.parametrize(("body", "words"), [("[]", "empty batch"),
                                                 ("hello", "not JSON"), ("", "empty")])
    def test_empty_batch_and_non_json_are_refused(self, gateway: Gateway, body: str,
                                                  words: str) -> None:
        """As README says: every body on a tool-rule server is parsed, whatever it holds."""
        since = len(gateway.decisions())
        refused(gateway, gateway.post("py", body), since, words)

    def test_body_over_the_limit_is_413_at_once(self, gateway: Gateway) -> None:
        """Over mcp.max_body_bytes, the sidecar answers 413 without waiting for the rest."""
        body = json.dumps({**call("whoami"), "params": {
            "name": "whoami", "arguments": {"pad": "x" * (4 * 1024 * 1024)}}})
        started = time.monotonic()
        response = gateway.post("py", body, source=INTERNAL)
        assert response.status_code == 413
        assert "mcp.max_body_bytes" in response.json()["error"]["message"]
        assert time.monotonic() - started < 5


def raw(port: int, request: bytes, wait: float = 3.0) -> bytes:
    """Send raw bytes from the external address; what came back within `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port), source_address=(EXTERNAL, 0)) as sock:
        sock.sendall(request)
        sock.settimeout(wait)
        received = b""
        try:
            while b"\r\n\r\n" not in received or len(received) < received.index(
                    b"\r\n\r\n") + 4 + len(NOT_FOUND):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
        return received


def masked(response: bytes) -> bytes:
    return re.sub(rb"(?im)^(date:)[^\r\n]*", rb"\1 *", response)


class TestHiddenServerWithToolRules:
    """An internal-only server with tool rules answers exactly as one that does not exist."""

    @pytest.mark.parametrize(
        "request_for",
        [
            # A 2 MB body: Envoy's 413 once told the two apart.
            lambda path: (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n").encode()
            + b"x" * (2 * 1024 * 1024),
            # A Content-Length with no body: the hidden server once hung, buffering.
            lambda path: (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
                          "\r\nContent-Length: 10\r\n\r\n").encode(),
            # A body that is still arriving.
            lambda path: (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
                          "\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[1,2,").encode(),
        ],
        ids=["2MB", "content-length-no-body", "slow-chunked"],
    )
    def test_same_answer_as_an_unknown_server(self, gateway: Gateway, request_for: Any) -> None:
        """Byte for byte the unknown server's 404, at once, whatever the body."""
        answers = []
        for path in ("/mcp/vault", "/mcp/no-such-server"):
            started = time.monotonic()
            answer = raw(gateway.port, request_for(path))
            assert time.monotonic() - started < 2, path
            assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
            assert answer.endswith(NOT_FOUND), answer[-200:]
            answers.append(masked(answer))
        assert answers[0] == answers[1]


FORGED_ENVOY = [
    ("x-envoy-attempt-count", "9"), ("x-envoy-original-dst-host", "127.0.0.1:1"),
    ("x-envoy-peer-metadata", "Cg0KA2FwcBIGEgRmYWtl"), ("x-envoy-auth-partial-body", "true"),
    ("x-envoy-auth-failure-mode-allowed", "true"), ("x-envoy-original-path", "/forged"),
    ("x-envoy-decorator-operation", "forged"), ("x-envoy-downstream-service-cluster", "x"),
    ("x-envoy-downstream-service-node", "x"), ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-retry-on", "5xx"), ("x-envoy-internal", "true"),
    ("x-envoy-external-address", "127.0.0.1"),
]


class TestEnvoyHeaders:
    @pytest.mark.parametrize("server", ["py", "ts"])
    def test_caller_envoy_headers_never_reach_the_upstream(self, gateway: Gateway,
                                                           server: str) -> None:
        """Without trusted proxies too: only Envoy's own x-envoy-external-address arrives."""
        before = len(gateway.received(server))
        headers = [*MCP.items(), *FORGED_ENVOY, ("x-test", f"forged-{server}")]
        response = gateway.post(server, json.dumps(call("whoami")), headers)
        assert response.status_code == 200, response.text
        [record] = gateway.received(server)[before:]
        envoy_headers = {k: v for k, v in record["headers"].items() if k.startswith("x-envoy-")}
        assert envoy_headers == {"x-envoy-external-address": [EXTERNAL]}

    def test_a_forged_original_path_is_not_the_logged_path(self, gateway: Gateway) -> None:
        """Envoy's access log names the path that was routed, not the caller's claim."""
        headers = [*MCP.items(), ("x-envoy-original-path", "/mcp/forged-log-path")]
        gateway.post("py", json.dumps(call("whoami")), headers)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            paths = [r["path"] for r in gateway.access_log()]
            if paths and paths[-1] == "/mcp/py":
                break
            time.sleep(0.1)
        assert paths[-1] == "/mcp/py"
        assert "/mcp/forged-log-path" not in paths


class TestCheckParity:
    """`check --header --body-file` gives the answer the live path gives."""

    @pytest.mark.parametrize(
        ("body", "headers"),
        [
            (json.dumps(call("add")), []),
            (json.dumps(call("whoami")), []),
            ('{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"add"}}', []),
            (json.dumps(call("add")), [("content-type", "application/json; charset=utf-7")]),
            (json.dumps(call("add")), [("mcp-name", "add"), ("mcp-name", "whoami")]),
            (json.dumps(call("whoami")), [("mcp-method", "tools/call"), ("mcp-name", "add")]),
            (json.dumps(call("add")), [("content-encoding", "gzip")]),
            ("[]", []),
        ],
    )
    def test_same_answer(self, gateway: Gateway, tmp_path: Path, body: str,
                         headers: list[tuple[str, str]]) -> None:
        """The same reason and status, for the same bytes and headers."""
        sent = [*MCP.items(), *headers] if not any(
            k == "content-type" for k, _ in headers) else [("accept", MCP["accept"]), *headers]
        since = len(gateway.decisions())
        live = gateway.post("py", body, sent)
        body_record = [r for r in gateway.new_decisions(since, 2) if r["phase"] == "body"]
        path = tmp_path / "body.json"
        path.write_text(body)
        result = subprocess.run(
            [sys.executable, "-m", "ext_authz", "check", "--config", str(gateway.config),
             "--peer", EXTERNAL, "--path", "/mcp/py", "--body-file", str(path),
             *[arg for name, value in sent for arg in ("--header", f"{name}: {value}")]],
            capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(result.stdout)
        assert report["reason"] == body_record[0]["reason"]
        expected = live.status_code if report["reason"] != "allowed" else 200
        assert report["http_status"] == expected


class TestTokenOutage:
    def test_hidden_tool_answers_as_a_missing_one(self, gateway: Gateway) -> None:
        """While the token cannot be had, a hidden tool and a missing one both get the 503."""
        gateway.outage.mode, gateway.outage.status = "status", 500
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                hidden = gateway.post("outage", json.dumps(call("add")))
                if hidden.status_code == 503:
                    break
                time.sleep(0.2)
            missing = gateway.post("outage", json.dumps(call("no-such-tool")))
            assert (hidden.status_code, hidden.content) == (503, UNAVAILABLE)
            assert (missing.status_code, missing.content) == (503, UNAVAILABLE)
        finally:
            gateway.outage.healthy()
            gateway.outage.expires_in = 3
