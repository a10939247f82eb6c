"""Hidden tools through a real Envoy: as if the server had never had them.

One Envoy (from `envoy-config`) and one sidecar in front of three MCP servers, each under the
same tool rules: the default rule `*` makes unlisted tools internal-only, `whoami` is public
and `add` is internal-only but visible to partners.
- `py`: the official Python SDK server answering JSON;
- `pysse`: the same server answering each POST with an SSE stream;
- `ts`: the official TypeScript SDK server (express), answering with SSE streams.

Callers: 127.0.0.1 (internal: every tool), 127.0.0.3 (partners: whoami, add) and 127.0.0.2
(external: whoami). Beside each server run the servers each caller should believe in: the
same SDK and name, started without the tools hidden from that caller, reached through the
same Envoy on routes without tool rules (`py_as_external` goes to a `py` without `add` and
`wait`). What a caller gets from `py` must be what it gets from `py_as_<caller>`: the
`tools/list` answer byte for byte, and for a hidden tool's call, whatever the request looks
like, the very answer a tool that does not exist gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import yaml

from ext_authz._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from tests.e2e.harness import (
    Process,
    free_port,
    mcp_client,
    rpc,
    start_envoy,
    start_sidecar,
    start_ts_upstream,
    start_upstream,
)
from tests.token_endpoint import ThreadedTokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

INTERNAL, EXTERNAL, PARTNER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
CALLERS = {"internal": INTERNAL, "partner": PARTNER, "external": EXTERNAL}
MAX_BODY = 8192
RECEIVE_TIMEOUT_S = 3  # a request must arrive and be judged in this (--receive-timeout)
FRESH_NAME = re.compile(rb"hidden-[0-9a-f]*-[0-9a-f]{24}")
RULES = {
    "*": {"available_on_public_internet": False},
    "whoami": {"available_on_public_internet": True},
    "add": {"available_on_public_internet": False, "visible_to": ["partners"]},
}
FLAVOURS = {  # server: its tools, as its SDK lists them
    "py": ("whoami", "add", "wait"),
    "pysse": ("whoami", "add", "wait"),
    "ts": ("whoami", "add", "delete_repo"),
}
MCP_HEADERS = {"content-type": "application/json",
               "accept": "application/json, text/event-stream"}


def visible(flavour: str, caller: str) -> tuple[str, ...]:
    """The tools RULES leave a caller, in the server's order."""
    tools = FLAVOURS[flavour]
    if caller == "internal":
        return tools
    return tuple(t for t in tools if t == "whoami" or (t == "add" and caller == "partner"))


@dataclass
class Stack:
    base: str
    port: int
    sidecar: Process
    upstreams: dict[str, Process]
    bootstrap: dict[str, Any]
    workdir: Path
    slow_ext_proc: SlowExtProc
    stopped: list[Process] = field(default_factory=list)

    def request(self, source: str, server: str, body: bytes | str, *, method: str = "POST",
                headers: dict[str, str] | None = None, drop: tuple[str, ...] = (),
                suffix: str = "", port: int | None = None) -> httpx.Response:
        """Send a request; its answer, read whole (a GET's stream, for a moment only)."""
        sent = {k: v for k, v in {**MCP_HEADERS, **(headers or {})}.items() if k not in drop}
        transport = httpx.HTTPTransport(local_address=source)
        base = self.base if port is None else f"http://127.0.0.1:{port}"
        # A GET may open the server's event stream, which stays open with nothing to say.
        timeout = httpx.Timeout(15, read=1.0 if method == "GET" else 15)
        with httpx.Client(transport=transport, timeout=timeout) as http:
            request = http.build_request(method, f"{base}/mcp/{server}{suffix}",
                                         content=body, headers=sent)
            for name in drop:  # httpx adds some of its own
                request.headers.pop(name, None)
            response = http.send(request, stream=True)
            content = b""
            with contextlib.suppress(httpx.ReadTimeout):
                for chunk in response.iter_raw():
                    content += chunk
            response.close()
            response._content = content  # what arrived, as .content
            return response

    def upstream_posts(self, server: str) -> list[dict[str, Any]]:
        """The requests an upstream has logged so far (one JSON line each)."""
        return [r for r in self.upstreams[server].json_lines()
                if r.get("method") in ("POST", "GET", "PUT")
                and not r.get("raw_path", "").endswith("/echo")]


class SlowExtProc:
    """An ext_proc server that reads every message and never answers (until stopped)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

        class Servicer(ext_proc_grpc.ExternalProcessorServicer):
            def Process(inner, request_iterator: Iterator[Any],
                        context: grpc.ServicerContext) -> Iterator[Any]:
                for _ in request_iterator:
                    self.release.wait(30)
                return iter(())

        ext_proc_grpc.add_ExternalProcessorServicer_to_server(Servicer(), self.server)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.release.set()
        self.server.stop(grace=None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("hidden")
    ports = {name: free_port() for name in ("grpc", "admin", "envoy", "envoy_admin")}
    processes: list[Process] = []
    upstreams: dict[str, Process] = {}
    upstream_ports: dict[str, int] = {}
    servers: dict[str, Any] = {}
    slow = SlowExtProc()
    slow.start()
    with ThreadedTokenEndpoint() as tokens:
        oauth2 = {"token_url": tokens.url, "client_id": "gateway-client",
                  "client_secret": "gateway-secret"}
        try:
            for flavour, tools in FLAVOURS.items():
                for caller in (None, "partner", "external"):
                    port = free_port()
                    without = () if caller is None else tuple(
                        t for t in tools if t not in visible(flavour, caller))
                    label = flavour if caller is None else f"{flavour}_as_{caller}"
                    if flavour == "ts":
                        process = start_ts_upstream(flavour, port, workdir, without=without,
                                                    label=label)
                    else:
                        process = start_upstream(flavour, port, workdir, without=without,
                                                 sse=flavour == "pysse", label=label)
                    processes.append(process)
                    upstreams[label] = process
                    upstream_ports[label] = port
                    address = f"http://127.0.0.1:{port}/mcp/{flavour}"
                    if caller is None:
                        servers[flavour] = {"upstream": f"127.0.0.1:{port}", "oauth2": oauth2,
                                            "tools": RULES}
                        servers[f"{flavour}_as_internal"] = {"upstream": address}
                    else:
                        servers[label] = {"upstream": address}
            config = {
                "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
                "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
                "network": {"internal_ranges": ["127.0.0.1/32"],
                            "networks": {"partners": ["127.0.0.3/32"]}},
                "mcp": {"max_body_bytes": MAX_BODY},
                "tokens": {"timeout_s": 2},
                "servers": servers,
            }
            config_path = workdir / "sidecar.yaml"
            config_path.write_text(yaml.safe_dump(config))
            rendered = _render(config_path, ports)
            sidecar = start_sidecar(config_path, workdir)
            processes.append(sidecar)
            sidecar.wait_http(f"http://127.0.0.1:{ports['admin']}/readyz")
            for label, process in upstreams.items():
                flavour = label.split("_")[0]
                process.wait_http(f"http://127.0.0.1:{upstream_ports[label]}/mcp/{flavour}/echo")
            bootstrap = yaml.safe_load(rendered)
            processes.append(start_envoy(bootstrap, workdir, ports["envoy_admin"]))
            yield Stack(f"http://127.0.0.1:{ports['envoy']}", ports["envoy"], sidecar,
                        upstreams, bootstrap, workdir, slow)
        finally:
            for process in reversed(processes):
                process.stop()
            slow.stop()


def _render(config_path: Path, ports: dict[str, int]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", "envoy-config", "--config", str(config_path),
         "--listen", f"127.0.0.1:{ports['envoy']}",
         "--admin", f"127.0.0.1:{ports['envoy_admin']}",
         "--receive-timeout", str(RECEIVE_TIMEOUT_S)],
        capture_output=True, text=True, timeout=60, check=True).stdout


def call(tool: str, rpc_id: Any = 1, arguments: Any = None) -> dict[str, Any]:
    return rpc("tools/call", {"name": tool, "arguments": {} if arguments is None else arguments},
               rpc_id)


def header_list(response: httpx.Response) -> list[tuple[str, str]]:
    """The answer's headers as a caller sees them, in order; all but the Date."""
    return [(k, v) for k, v in response.headers.multi_items() if k != "date"]


def tool_names(response: httpx.Response) -> list[str]:
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[len("data:"):] for line in text.splitlines()
                    if line.startswith("data:"))
    return [tool["name"] for tool in json.loads(text)["result"]["tools"]]


class TestToolsList:
    @pytest.mark.parametrize("caller", CALLERS)
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_is_the_list_of_a_server_without_the_hidden_tools(self, stack: Stack,
                                                              flavour: str,
                                                              caller: str) -> None:
        """Status, headers and body, byte for byte: order, framing and all."""
        body = json.dumps(rpc("tools/list"))
        seen = stack.request(CALLERS[caller], flavour, body)
        expected = stack.request(CALLERS[caller], f"{flavour}_as_{caller}", body)
        assert seen.status_code == expected.status_code == 200
        assert tool_names(seen) == list(visible(flavour, caller))
        assert header_list(seen) == header_list(expected)
        assert seen.content == expected.content

    @pytest.mark.parametrize("caller", CALLERS)
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_the_sdk_client_lists_what_the_reference_lists(self, stack: Stack, flavour: str,
                                                           caller: str) -> None:
        """The official MCP client, session and all, lists the same tools, schemas and all."""
        seen = asyncio.run(_list_tools(stack.base, CALLERS[caller], flavour))
        expected = asyncio.run(_list_tools(stack.base, CALLERS[caller],
                                           f"{flavour}_as_{caller}"))
        assert [tool["name"] for tool in seen] == list(visible(flavour, caller))
        assert seen == expected

    def test_cursor_and_meta_are_kept(self, stack: Stack) -> None:
        """A request with a cursor or _meta is filtered just the same (the server's answer)."""
        body = json.dumps(rpc("tools/list", {"_meta": {"progressToken": 5}}))
        seen = stack.request(EXTERNAL, "py", body)
        expected = stack.request(EXTERNAL, "py_as_external", body)
        assert (seen.status_code, seen.content) == (expected.status_code, expected.content)

    def test_a_batch_with_tools_list_is_filtered_message_by_message(self,
                                                                    stack: Stack) -> None:
        """A JSON batch answer (a server that takes batches) loses hidden tools in each."""
        body = json.dumps([rpc("tools/list", rpc_id=1), rpc("tools/list", rpc_id=2)])
        seen = stack.request(EXTERNAL, "py", body)
        expected = stack.request(EXTERNAL, "py_as_external", body)
        assert (seen.status_code, header_list(seen), seen.content) == (
            expected.status_code, header_list(expected), expected.content)


async def _list_tools(base: str, source: str, server: str) -> list[dict[str, Any]]:
    async with mcp_client(f"{base}/mcp/{server}", source) as mcp:
        result = await mcp.list_tools()
        return [tool.model_dump(mode="json") for tool in result.tools]


@dataclass(frozen=True)
class Variant:
    """One shape of request: what is done to the plain tools/call of a tool named NAME."""

    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)  # "{name}" is the tool's name
    drop: tuple[str, ...] = ()
    suffix: str = ""
    body: Callable[[str], Any] = lambda name: call(name)
    raw: Callable[[str], str] | None = None  # the body as text, when JSON cannot say it

    def send(self, stack: Stack, source: str, server: str, tool: str) -> httpx.Response:
        body = self.raw(tool) if self.raw else json.dumps(self.body(tool))
        headers = {k: v.format(name=tool) for k, v in self.headers.items()}
        return stack.request(source, server, body, method=self.method, headers=headers,
                             drop=self.drop, suffix=self.suffix)


def _with(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**message, **changes}


VARIANTS = {
    "plain": Variant(),
    "string-id": Variant(body=lambda n: call(n, "req-1")),
    "notification": Variant(body=lambda n: call(n, None)),
    "batch": Variant(body=lambda n: [call("whoami", 1), call(n, 2)]),
    "escaped-name": Variant(raw=lambda n: json.dumps(call("@"))
                            .replace("@", "".join(f"\\u{ord(c):04x}" for c in n))),
    "mcp-name-header": Variant(headers={"mcp-name": "{name}", "mcp-method": "tools/call"}),
    "content-type-text": Variant(headers={"content-type": "text/plain"}),
    "no-content-type": Variant(drop=("content-type",)),
    "no-accept": Variant(drop=("accept",)),
    "accept-json-only": Variant(headers={"accept": "application/json"}),
    "accept-sse-only": Variant(headers={"accept": "text/event-stream"}),
    "foreign-host": Variant(headers={"host": "evil.example"}),
    "foreign-origin": Variant(headers={"origin": "http://evil.example"}),
    "get-with-body": Variant(method="GET"),
    "put-with-body": Variant(method="PUT"),
    "delete-with-body": Variant(method="DELETE"),
    "trailing-slash": Variant(suffix="/"),
    "jsonrpc-1.0": Variant(body=lambda n: _with(call(n), jsonrpc="1.0")),
    "no-jsonrpc": Variant(body=lambda n: {k: v for k, v in call(n).items() if k != "jsonrpc"}),
    "arguments-list": Variant(body=lambda n: call(n, arguments=[1, 2])),
    "arguments-string": Variant(body=lambda n: call(n, arguments="a=1")),
    "arguments-null": Variant(raw=lambda n: json.dumps(call(n)).replace('{}', 'null')),
    "protocol-version-old": Variant(headers={"mcp-protocol-version": "1999-01-01"}),
    "protocol-version-garbage": Variant(headers={"mcp-protocol-version": "not a version"}),
    "protocol-version-empty": Variant(headers={"mcp-protocol-version": ""}),
    "protocol-version-current": Variant(headers={"mcp-protocol-version": "2025-06-18"}),
}

# A hidden tool, the caller it is hidden from, and a name no server has of the same length
# (so that even Content-Length agrees).
HIDDEN = {
    "py": [("add", "external"), ("wait", "partner"), ("wait", "external")],
    "pysse": [("add", "external"), ("wait", "partner")],
    "ts": [("add", "external"), ("delete_repo", "partner")],
}
CASES = [(flavour, tool, caller) for flavour, hidden in HIDDEN.items()
         for tool, caller in hidden]


def missing_name(tool: str) -> str:
    return "zq" + "x" * (len(tool) - 2)


_CUT_NAME = re.compile(rb"\.\.\.[0-9a-f-]{1,64}'")


def cut_names(body: bytes) -> bytes:
    """The answer with the tails of fresh names in a cut-short echo masked.

    The Python SDK refuses a batch echoing it back cut short in the middle (pydantic's
    `input_value=[{...}...3fa', 'arguments': {}}]`): a fresh name shows only its last
    characters, which cannot be put back. Under the default rule `*` a tool that does not
    exist goes on renamed too, so both answers show a random tail of the same length.
    """
    return _CUT_NAME.sub(b"...<fresh>'", body)


class TestHiddenCalls:
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize(("flavour", "tool", "caller"), CASES,
                             ids=[f"{f}-{t}-{c}" for f, t, c in CASES])
    def test_answer_is_a_missing_tools(self, stack: Stack, flavour: str, tool: str,
                                       caller: str, variant: str) -> None:
        """Same status, headers (in order) and body as a tool that does not exist."""
        shape = VARIANTS[variant]
        other = missing_name(tool)
        hidden = shape.send(stack, CALLERS[caller], flavour, tool)
        missing = shape.send(stack, CALLERS[caller], flavour, other)
        assert hidden.status_code == missing.status_code
        assert header_list(hidden) == header_list(missing)
        assert cut_names(hidden.content).replace(tool.encode(), other.encode()) == cut_names(
            missing.content)
        assert not FRESH_NAME.search(hidden.content)  # the fresh name never comes back

    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_the_reference_server_answers_alike(self, stack: Stack, flavour: str) -> None:
        """And it is the answer of a server that never had the tool."""
        seen = stack.request(EXTERNAL, flavour, json.dumps(call("add")))
        expected = stack.request(EXTERNAL, f"{flavour}_as_external", json.dumps(call("add")))
        assert (seen.status_code, header_list(seen), seen.content) == (
            expected.status_code, header_list(expected), expected.content)

    def test_a_visible_tool_still_runs(self, stack: Stack) -> None:
        """Partners may call add: it runs, with the injected token."""
        response = stack.request(PARTNER, "py", json.dumps(call("add", arguments={"a": 2,
                                                                                  "b": 3})))
        assert response.json()["result"]["structuredContent"] == {"result": 5}

    def test_the_upstream_gets_the_token_and_a_fresh_name(self, stack: Stack) -> None:
        """The renamed call carries the injected token, and Mcp-Name says the fresh name."""
        before = len(stack.upstream_posts("py"))
        stack.request(EXTERNAL, "py", json.dumps(call("add")), headers={"mcp-name": "add"})
        [record] = stack.upstream_posts("py")[before:]
        assert record["headers"]["authorization"][0].startswith("Bearer ")
        [name] = record["headers"]["mcp-name"]
        assert FRESH_NAME.fullmatch(name.encode())

    def test_fresh_names_are_sealed(self, stack: Stack) -> None:
        """A hidden tool goes on under a name sealed under the sidecar's key: the same for
        the same tool (so that any answer can have it put back), another for another, and
        none a caller could make (test_rewrite: forged names are not opened)."""
        names = []
        for tool in ("add", "add", "wait"):
            before = len(stack.upstream_posts("py"))
            stack.request(EXTERNAL, "py", json.dumps(call(tool)), headers={"mcp-name": tool})
            names += stack.upstream_posts("py")[before:][0]["headers"]["mcp-name"]
        assert names[0] == names[1] != names[2]
        assert all(FRESH_NAME.fullmatch(name.encode()) for name in names)


class TestFailingClosed:
    """Whatever stops the rename, the hidden tool's call never reaches its server."""

    def _variant_envoy(self, stack: Stack, name: str, ext_proc_port: int) -> tuple[Process, int]:
        """The same Envoy, but for its request ext_proc filter, which talks to another server."""
        bootstrap = copy.deepcopy(stack.bootstrap)
        [bodies] = [c for c in bootstrap["static_resources"]["clusters"]
                    if c["name"] == "mcp_ext_authz_bodies"]
        bodies.pop("health_checks")
        endpoint = bodies["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = ext_proc_port
        listener = bootstrap["static_resources"]["listeners"][0]
        port, admin = free_port(), free_port()
        listener["address"]["socket_address"]["port_value"] = port
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin
        workdir = stack.workdir / name
        workdir.mkdir(exist_ok=True)
        return start_envoy(bootstrap, workdir, admin), port

    @pytest.mark.parametrize("case", ["down", "slow"])
    def test_ext_proc_down_or_slow(self, stack: Stack, case: str) -> None:
        """Nothing listening: 500. Never answering: 500 too, once --receive-timeout has
        passed (Envoy runs no message timer in full-duplex mode; the bodies cluster's
        max_stream_duration cuts the stream). Nothing goes on unjudged."""
        port = free_port() if case == "down" else stack.slow_ext_proc.port
        envoy, envoy_port = self._variant_envoy(stack, f"ext-proc-{case}", port)
        try:
            before = len(stack.upstream_posts("py"))
            for tool in ("add", "whoami"):  # hidden or not: nothing goes on unjudged
                started = time.monotonic()
                response = stack.request(EXTERNAL, "py", json.dumps(call(tool)),
                                         port=envoy_port)
                assert response.status_code == 500
                if case == "slow":
                    assert RECEIVE_TIMEOUT_S - 0.5 <= time.monotonic() - started < 10
            assert stack.upstream_posts("py")[before:] == []
        finally:
            envoy.stop()

    def test_over_the_limit_is_413_and_goes_nowhere(self, stack: Stack) -> None:
        """Over mcp.max_body_bytes (HTTP/1.1 and HTTP/2 alike): 413 from the sidecar."""
        body = json.dumps(call("add", arguments={"pad": "x" * MAX_BODY})).encode()
        before = len(stack.upstream_posts("py"))
        assert stack.request(EXTERNAL, "py", body).status_code == 413
        status, _, _ = h2_post(stack.port, "/mcp/py", [body[:4000], body[4000:]])
        assert status == 413
        assert stack.upstream_posts("py")[before:] == []

    @pytest.mark.parametrize("pieces", [2, 7])
    def test_a_body_split_across_http2_frames_is_renamed_whole(self, stack: Stack,
                                                               pieces: int) -> None:
        """DATA frames cutting through the tool's name: the server still never sees it."""
        def split(body: bytes) -> list[bytes]:
            cut = body.index(b'"add"') + 2 if b'"add"' in body else body.index(b'"zqx"') + 2
            size = max(1, len(body) // pieces)
            cuts = sorted({cut, *range(size, len(body), size)})
            return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]

        answers = []
        for tool in ("add", "zqx"):
            body = json.dumps(call(tool)).encode()
            answers.append(h2_post(stack.port, "/mcp/py", split(body), source=EXTERNAL))
        (status, headers, hidden), (missing_status, missing_headers, missing) = answers
        assert status == missing_status == 200
        assert headers == missing_headers
        assert hidden.replace(b"add", b"zqx") == missing
        assert b"Unknown tool" in hidden or b"not found" in hidden

    def test_a_body_sent_slowly_over_http1_is_renamed_whole(self, stack: Stack) -> None:
        """Chunked, a few bytes at a time: the same answer as a missing tool's."""
        answers = []
        for tool in ("add", "zqx"):
            body = json.dumps(call(tool)).encode()
            answers.append(chunked_post(stack.port, "/mcp/py", [body[i:i + 9] for i in
                                                                range(0, len(body), 9)]))
        hidden, missing = answers
        assert hidden.replace(b"add", b"zqx").split(b"\r\n\r\n", 1)[1] == missing.split(
            b"\r\n\r\n", 1)[1]
        assert hidden.startswith(b"HTTP/1.1 200")

    @pytest.mark.parametrize("protocol", ["http2", "http1"])
    def test_a_request_cut_off_midway_goes_nowhere(self, stack: Stack, protocol: str) -> None:
        """A stream reset (HTTP/2) or a closed connection (HTTP/1.1) before the body ends."""
        body = json.dumps(call("add")).encode()
        before = len(stack.upstream_posts("py"))
        if protocol == "http2":
            h2_post(stack.port, "/mcp/py", [body[:20]], source=EXTERNAL, reset=True)
        else:
            with socket.create_connection(("127.0.0.1", stack.port)) as sock:
                sock.sendall(b"POST /mcp/py HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Accept: application/json, text/event-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
                time.sleep(0.2)
        time.sleep(0.5)
        assert stack.upstream_posts("py")[before:] == []
        # And the next request is served as ever.
        assert stack.request(INTERNAL, "py", json.dumps(call("whoami"))).status_code == 200


def h2_post(port: int, path: str, pieces: list[bytes], *, source: str = INTERNAL,
            reset: bool = False, timeout: float = 10) -> tuple[int, list[tuple[str, str]],
                                                                bytes]:
    """POST over cleartext HTTP/2 (prior knowledge), each piece its own DATA frame.

    `reset`: send the pieces, then RST_STREAM instead of ending the stream.
    """
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        stream = connection.get_next_available_stream_id()
        connection.send_headers(stream, [
            (":method", "POST"), (":path", path), (":scheme", "http"),
            (":authority", f"127.0.0.1:{port}"), *MCP_HEADERS.items()])
        sock.sendall(connection.data_to_send())
        for piece in pieces:
            connection.send_data(stream, piece)
            sock.sendall(connection.data_to_send())
            time.sleep(0.05)  # each piece its own frame, and its own read on Envoy's side
        if reset:
            connection.reset_stream(stream)
            sock.sendall(connection.data_to_send())
            time.sleep(0.2)
            return 0, [], b""
        connection.end_stream(stream)
        sock.sendall(connection.data_to_send())
        status, headers, body = 0, [], b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    for key, value in event.headers:
                        name = key.decode() if isinstance(key, bytes) else key
                        text = value.decode() if isinstance(value, bytes) else value
                        if name == ":status":
                            status = int(text)
                        elif name != "date":
                            headers.append((name, text))
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length,
                                                         stream)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, headers, body
            sock.sendall(connection.data_to_send())
    raise AssertionError("no whole HTTP/2 answer")


def chunked_post(port: int, path: str, pieces: list[bytes], source: str = EXTERNAL) -> bytes:
    """POST with chunked transfer encoding, a chunk at a time; the raw answer, Date cut."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\n"
                     b"Host: 127.0.0.1:%d\r\n" % port +
                     b"Content-Type: application/json\r\n"
                     b"Accept: application/json, text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.02)
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
    return b"\r\n".join(line for line in answer.split(b"\r\n")
                        if not line.lower().startswith(b"date:"))
