"""The ext_proc edge: a real grpc.aio sidecar on 127.0.0.1:0, streams as Envoy sends them.

Envoy runs it after ext_authz, in FULL_DUPLEX_STREAMED request-body mode: request headers,
then the body in pieces, answered only once the whole body is judged (tests/e2e proves the
same through a real Envoy).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest

from ext_authz._proto.envoy.service.ext_proc.v3 import (
    external_processor_pb2 as pb,
)
from ext_authz._proto.envoy.service.ext_proc.v3 import (
    external_processor_pb2_grpc as pb_grpc,
)
from ext_authz.edges import ext_proc as ext_proc_module
from ext_authz.edges.sealing import process_sealer
from ext_authz.server import Sidecar
from tests.conftest import make_config

CALLER = {"server": "tools", "network": "external", "networks": "", "client_ip": "127.0.0.2",
          "reason": "allowed"}
PARTNER = {**CALLER, "network": "partners", "networks": "partners", "client_ip": "127.0.0.9"}
JSON = [("content-type", "application/json"), (":method", "POST"), (":path", "/mcp/tools")]


def call(name: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": name, "arguments": {}}}).encode()


def headers(metadata: dict[str, str] | None = CALLER,
            pairs: Iterable[tuple[str, str]] = JSON,
            end_of_stream: bool = False) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    for key, value in pairs:
        request.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    request.request_headers.end_of_stream = end_of_stream
    if metadata is not None:
        request.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].update(
            metadata)
    return request


def body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    request.request_body.body = data
    request.request_body.end_of_stream = end_of_stream
    return request


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    config = make_config(
        network={"internal_ranges": ["127.0.0.1/32"], "networks": {"partners": ["127.0.0.9/32"]}},
        mcp={"max_body_bytes": 4096},
        servers={"tools": {"tools": {
            "delete_repo": {"available_on_public_internet": False,
                            "visible_to": ["partners"]}}},
            "vault": {"available_on_public_internet": False}})
    running = Sidecar(config, grace_s=1)
    await running.start()
    yield running
    await running.stop()


async def exchange(sidecar: Sidecar, messages: list[pb.ProcessingRequest]
                   ) -> list[pb.ProcessingResponse]:
    """Send a whole stream, as Envoy would, and collect every answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        return [answer async for answer in stub.Process(iter(messages))]


def immediate(answer: pb.ProcessingResponse) -> tuple[int, Any]:
    reply = answer.immediate_response
    return reply.status.code, json.loads(reply.body) if reply.body else None


class TestJudging:
    async def test_an_allowed_body_goes_on_whole(self, sidecar: Sidecar) -> None:
        """Nothing until the last piece; then the headers go on, and the body, unchanged."""
        data = call("whoami")
        answers = await exchange(sidecar, [headers(), body(data[:10], False),
                                           body(data[10:30], False), body(data[30:])])
        assert [a.WhichOneof("response") for a in answers] == ["request_headers",
                                                               "request_body"]
        streamed = answers[1].request_body.response.body_mutation.streamed_response
        assert (streamed.body, streamed.end_of_stream) == (data, True)
        namespace = answers[0].dynamic_metadata.fields["envoy.filters.http.ext_proc"]
        assert namespace.struct_value.fields["reason"].string_value == "allowed"

    async def test_a_hidden_tool_goes_on_renamed(self, sidecar: Sidecar) -> None:
        """unknown_tool_reply: server: the call goes on under a fresh name, with its length
        and Mcp-Name set to match, and the answer is asked for, to put the name back."""
        data = call("delete_repo")
        pairs = [*JSON, ("content-length", str(len(data))), ("mcp-name", "delete_repo")]
        first, second = await exchange(sidecar, [headers(pairs=pairs), body(data)])
        sent = second.request_body.response.body_mutation.streamed_response.body
        fresh = json.loads(sent)["params"]["name"]
        assert fresh == process_sealer().fresh("tool", "delete_repo")
        assert sent == data.replace(b"delete_repo", fresh.encode())
        mutation = first.request_headers.response.header_mutation
        assert {(h.header.key, h.header.raw_value) for h in mutation.set_headers} == {
            ("mcp-name", fresh.encode()), ("content-length", str(len(sent)).encode())}
        assert list(mutation.remove_headers) == ["accept-encoding"]
        said = first.dynamic_metadata.fields["envoy.filters.http.ext_proc"].struct_value
        assert said.fields["answer"].string_value == "call"
        assert set(said.fields) == {"answer", "decision_id", "reason", "tool"}  # no names

    async def test_local_answers_when_configured(self) -> None:
        """unknown_tool_reply: tool_error: the sidecar answers in Envoy's place."""
        config = make_config(servers={"tools": {
            "unknown_tool_reply": "tool_error",
            "tools": {"delete_repo": {"available_on_public_internet": False}}}})
        running = Sidecar(config, grace_s=1)
        await running.start()
        try:
            [answer] = await exchange(running, [headers(), body(call("delete_repo"))])
        finally:
            await running.stop()
        status, reply = immediate(answer)
        assert status == 200
        assert reply["id"] == 7
        assert reply["result"]["content"][0]["text"] == "Unknown tool: delete_repo"

    async def test_the_callers_place_comes_from_ext_authz(self, sidecar: Sidecar) -> None:
        """A partner, as ext_authz placed it, may call the tool visible to partners."""
        answers = await exchange(sidecar, [headers(PARTNER), body(call("delete_repo"))])
        assert answers[0].WhichOneof("response") == "request_headers"

    async def test_a_body_over_the_limit_is_refused_before_the_rest(self,
                                                                    sidecar: Sidecar) -> None:
        """413 on the piece that passes mcp.max_body_bytes; later pieces get no answer."""
        answers = await exchange(sidecar, [headers(), body(b"[" * 3000, False),
                                           body(b"[" * 3000, False), body(b"]")])
        [answer] = answers
        status, reply = immediate(answer)
        assert status == 413
        assert "mcp.max_body_bytes" in reply["error"]["message"]

    async def test_a_get_goes_on_at_its_headers(self, sidecar: Sidecar) -> None:
        """The SSE stream's GET has no body: its headers go on at once."""
        pairs = [(":method", "GET"), (":path", "/mcp/tools"), ("accept", "text/event-stream")]
        [answer] = await exchange(sidecar, [headers(pairs=pairs, end_of_stream=True)])
        assert answer.WhichOneof("response") == "request_headers"

    async def test_a_post_without_a_body_is_refused(self, sidecar: Sidecar) -> None:
        """An MCP POST carries a message; an empty one is a 400 that says so."""
        [answer] = await exchange(sidecar, [headers(end_of_stream=True)])
        assert immediate(answer)[0] == 400

    async def test_trailers_are_refused(self, sidecar: Sidecar) -> None:
        """No MCP client sends request trailers."""
        trailers = pb.ProcessingRequest()
        trailers.request_trailers.SetInParent()
        [answer] = await exchange(sidecar, [headers(), body(call("whoami"), False), trailers])
        status, reply = immediate(answer)
        assert status == 400
        assert "trailers" in reply["error"]["message"]

    async def test_a_server_hidden_since_ext_authz_is_not_found(self, sidecar: Sidecar) -> None:
        """A reload between the two checks can only narrow: now hidden is not_found."""
        [answer] = await exchange(sidecar, [headers({**CALLER, "server": "vault"}),
                                            body(call("whoami"))])
        assert immediate(answer) == (404, {"error": "not_found"})


def answer_headers(said: dict[str, str] | None, content_type: str,
                   end_of_stream: bool = False, **extra: str) -> pb.ProcessingRequest:
    """The answers filter's first message: the answer's headers, and the metadata."""
    request = pb.ProcessingRequest()
    for key, value in (("content-type", content_type), (":status", "200"), *extra.items()):
        request.response_headers.headers.headers.add(key=key.replace("_", "-"),
                                                      raw_value=value.encode())
    request.response_headers.end_of_stream = end_of_stream
    request.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].update(CALLER)
    if said is not None:
        request.metadata_context.filter_metadata["envoy.filters.http.ext_proc"].update(said)
    return request


def answer_body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    request.response_body.body = data
    request.response_body.end_of_stream = end_of_stream
    return request


LISTED = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
    {"name": "whoami"}, {"name": "delete_repo"}, {"name": "search"}]}},
    separators=(",", ":")).encode()
LISTED_OUTSIDE = LISTED.replace(b',{"name":"delete_repo"}', b"")


class TestAnswers:
    async def test_a_json_tools_list_is_filtered_whole(self, sidecar: Sidecar) -> None:
        """BUFFERED for JSON; the hidden tool gone, the length set to match."""
        head, body_answer = await exchange(sidecar, [
            answer_headers({"answer": "list"}, "application/json",
                           content_length=str(len(LISTED))),
            answer_body(LISTED)])
        assert head.mode_override.response_body_mode == 2  # BUFFERED
        common = body_answer.response_body.response
        assert common.body_mutation.body == LISTED_OUTSIDE
        assert [(h.header.key, h.header.raw_value) for h in
                common.header_mutation.set_headers] == [
            ("content-length", str(len(LISTED_OUTSIDE)).encode())]

    async def test_an_sse_tools_list_is_filtered_event_by_event(self,
                                                               sidecar: Sidecar) -> None:
        """STREAMED for an SSE stream of unknown length: events rewritten as they
        complete, framing and ids kept."""
        event = b"event: message\r\nid: 9\r\ndata: " + LISTED + b"\r\n\r\n"
        head, first, second = await exchange(sidecar, [
            answer_headers({"answer": "list"}, "text/event-stream"),
            answer_body(event[:30], False), answer_body(event[30:])])
        assert head.mode_override.response_body_mode == 1  # STREAMED
        assert first.response_body.response.body_mutation.body == b""
        assert second.response_body.response.body_mutation.body == event.replace(
            LISTED, LISTED_OUTSIDE)

    async def test_an_sse_answer_of_known_length_is_filtered_whole(self,
                                                                   sidecar: Sidecar) -> None:
        """SSE with a Content-Length (sent in one write): BUFFERED, the length set anew."""
        event = b"event: message\ndata: " + LISTED + b"\n\n"
        head, body_answer = await exchange(sidecar, [
            answer_headers({"answer": "list"}, "text/event-stream",
                           content_length=str(len(event))), answer_body(event)])
        assert head.mode_override.response_body_mode == 2  # BUFFERED
        common = body_answer.response_body.response
        assert common.body_mutation.body == event.replace(LISTED, LISTED_OUTSIDE)
        assert [(h.header.key, h.header.raw_value) for h in
                common.header_mutation.set_headers] == [
            ("content-length", str(len(common.body_mutation.body)).encode())]

    @pytest.mark.parametrize(("content_type", "data"), [
        ("application/json", b'{"result":{"tools":[{"name":"delete_repo"}'),  # cut short
        ("text/event-stream", b'data: {"result":{"tools":[{"name":"delete_repo"}\n\n'),
        # The key twice: the first or the last is the result, as the parser goes.
        ("application/json", b'{"result":{"tools":[{"name":"whoami"}]},'
                             b'"result":{"tools":[{"name":"delete_repo"}]}}'),
        # A byte order mark, which a client drops: here it would hide the first event.
        ("text/event-stream", b"\xef\xbb\xbfdata: " + LISTED + b"\n\n"),
        # Bare JSON where SSE was said: no event, but a lenient client reads it.
        ("text/event-stream", LISTED + b"\n\n"),
    ], ids=["json-cut", "sse-cut", "duplicate-key", "sse-bom", "sse-bare-json"])
    async def test_an_unreadable_tools_list_is_a_502(self, sidecar: Sidecar,
                                                     content_type: str, data: bytes) -> None:
        """What the sidecar cannot read, a lenient client might: never passed unfiltered,
        but refused as the server's fault (502, a JSON-RPC error)."""
        _, body_answer = await exchange(sidecar, [
            answer_headers({"answer": "list"}, content_type,
                           content_length=str(len(data))), answer_body(data)])
        status, body = immediate(body_answer)
        assert status == 502
        assert body["error"]["code"] == -32603

    async def test_an_answer_past_the_limit_is_a_502(self) -> None:
        """An answer too big to be checked (mcp.max_answer_bytes) is refused, never passed
        unread: at its headers when its length is said, at the piece that passes the limit
        when not."""
        config = make_config(network={"internal_ranges": ["127.0.0.1/32"]},
                             mcp={"max_answer_bytes": 65536},
                             servers={"tools": {"tools": {"delete_repo": {
                                 "available_on_public_internet": False}}}})
        small = Sidecar(config, grace_s=1)
        await small.start()
        try:
            [head] = await exchange(small, [answer_headers(
                {"answer": "list"}, "application/json",
                content_length="65537")])
            assert immediate(head)[0] == 502
            piece = b" " * 40000
            answers = await exchange(small, [
                answer_headers({"answer": "list"}, "application/json"),
                answer_body(piece, False), answer_body(piece, False)])
            assert answers[0].mode_override.response_body_mode == 1  # STREAMED, held
            assert answers[1].response_body.response.body_mutation.body == b""
            assert immediate(answers[2])[0] == 502
        finally:
            await small.stop()

    async def test_an_answer_of_no_stated_length_is_held_then_sent_whole(
            self, sidecar: Sidecar) -> None:
        """Piece by piece into the sidecar, nothing on until it is whole; then all of it,
        filtered, with no length (none was said)."""
        head, first, last = await exchange(sidecar, [
            answer_headers({"answer": "list"}, "application/json"),
            answer_body(LISTED[:20], False), answer_body(LISTED[20:])])
        assert head.mode_override.response_body_mode == 1  # STREAMED
        assert first.response_body.response.body_mutation.body == b""
        common = last.response_body.response
        assert common.body_mutation.body == LISTED_OUTSIDE
        assert not common.header_mutation.set_headers

    @pytest.mark.parametrize("content_type", ["text/plain", "application/json-rpc",
                                              "text/html", ""])
    async def test_a_tools_list_in_another_media_type_is_a_502(self, sidecar: Sidecar,
                                                               content_type: str) -> None:
        """A tools/list answer that is neither JSON nor SSE (or says no type) is refused at
        its headers: a client may read it as JSON all the same."""
        [head] = await exchange(sidecar, [answer_headers(
            {"answer": "list"}, content_type)])
        assert immediate(head)[0] == 502

    @pytest.mark.parametrize("plan", ["call", "any", "list"])
    async def test_a_fresh_name_is_put_back(self, sidecar: Sidecar, plan: str) -> None:
        """The server's unknown-tool answer names the caller's tool again, in the call's
        own exchange or in any other's the server crossed it into."""
        fresh = process_sealer().fresh("tool", "delete_repo").encode()
        answer = b'{"result":{"content":[{"text":"Unknown tool: ' + fresh + b'"}]}}'
        _, body_answer = await exchange(sidecar, [
            answer_headers({"answer": plan}, "application/json"), answer_body(answer)])
        assert body_answer.response_body.response.body_mutation.body == answer.replace(
            fresh, b"delete_repo")

    async def test_a_fresh_name_in_plain_text_is_put_back_as_it_was(self,
                                                                    sidecar: Sidecar) -> None:
        """An error page naming the tool: the caller's name, unescaped, in any media type."""
        answer = b"no tool " + process_sealer().fresh("tool", 'a"b').encode() + b" here"
        head, body_answer = await exchange(sidecar, [
            answer_headers({"answer": "call"}, "text/plain", content_length=str(len(answer))),
            answer_body(answer)])
        assert head.mode_override.response_body_mode == 2  # BUFFERED
        common = body_answer.response_body.response
        assert common.body_mutation.body == b'no tool a"b here'
        assert common.header_mutation.set_headers[0].header.raw_value == b"16"

    @pytest.mark.parametrize(
        ("said", "content_type", "end"),
        [(None, "application/json", False), ({"answer": "list"}, "application/json", True)],
        ids=["not-asked", "no-body"])
    async def test_other_answers_pass(self, sidecar: Sidecar, said: dict[str, str] | None,
                                      content_type: str, end: bool) -> None:
        """No tools/call or tools/list, or no body: headers go on, and the body is never
        asked for (the GET stream above all)."""
        [head] = await exchange(sidecar, [answer_headers(said, content_type, end)])
        assert head.WhichOneof("response") == "response_headers"
        assert not head.HasField("mode_override")

    async def test_a_compressed_answer_is_refused(self, sidecar: Sidecar) -> None:
        """A tools/list answer that cannot be read cannot pass unfiltered: a 502."""
        [head] = await exchange(sidecar, [answer_headers(
            {"answer": "list"}, "application/json", content_encoding="gzip")])
        assert immediate(head)[0] == 502


def metadata_answer(status: str, content_type: str, length: int | None) -> pb.ProcessingRequest:
    """The headers of an upstream's metadata answer on a discovery route."""
    request = pb.ProcessingRequest()
    headers = [(":status", status), ("content-type", content_type)]
    if length is not None:
        headers.append(("content-length", str(length)))
    for key, value in headers:
        request.response_headers.headers.headers.add(key=key, raw_value=value.encode())
    request.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].update({
        **CALLER, "rewrite": "resource", "resource": "https://gw.example/mcp/tools"})
    return request


METADATA = (b'{"resource": "http://10.0.0.5:8000/mcp/tools",\n "authorization_servers":'
            b' ["https://idp.example"], "bearer_methods_supported": ["header"]}')


class TestDiscovery:
    async def test_the_document_names_the_gateway(self, sidecar: Sidecar) -> None:
        """`resource` becomes the URL the caller used; every other byte stays."""
        head, body_answer = await exchange(sidecar, [
            metadata_answer("200", "application/json", len(METADATA)), answer_body(METADATA)])
        assert head.mode_override.response_body_mode == 2  # BUFFERED
        common = body_answer.response_body.response
        expected = METADATA.replace(b"http://10.0.0.5:8000/mcp/tools",
                                    b"https://gw.example/mcp/tools")
        assert common.body_mutation.body == expected
        assert common.header_mutation.set_headers[0].header.raw_value == str(
            len(expected)).encode()

    @pytest.mark.parametrize(("status", "content_type"), [("404", "application/json"),
                                                          ("200", "text/html")])
    async def test_other_answers_pass(self, sidecar: Sidecar, status: str,
                                      content_type: str) -> None:
        [head] = await exchange(sidecar, [metadata_answer(status, content_type, 10)])
        assert head.WhichOneof("response") == "response_headers"
        assert not head.HasField("mode_override")

    async def test_a_document_without_resource_stays(self, sidecar: Sidecar) -> None:
        data = b'{"authorization_servers": []}'
        _, body_answer = await exchange(sidecar, [
            metadata_answer("200", "application/json", len(data)), answer_body(data)])
        assert not body_answer.response_body.response.HasField("body_mutation")


class TestFailingClosed:
    async def test_no_ext_authz_decision_is_a_500(self, sidecar: Sidecar) -> None:
        """Without ext_authz's verdict in the metadata the route is misconfigured: 500."""
        for metadata in (None, {**CALLER, "reason": "not_found"}, {"reason": "allowed"}):
            [answer] = await exchange(sidecar, [headers(metadata), body(call("whoami"))])
            assert immediate(answer)[0] == 500

    async def test_a_stream_that_ends_unjudged_is_an_error(self, sidecar: Sidecar) -> None:
        """Ending cleanly would let Envoy forward the request: the stream fails instead."""
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await exchange(sidecar, [headers(), body(call("whoami")[:10], False)])
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def test_an_exception_is_a_500(self, sidecar: Sidecar,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """Whatever goes wrong inside is answered, never an unanswered stream."""
        def broken(*args: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(ext_proc_module, "judge_items", broken)
        [answer] = await exchange(sidecar, [headers(), body(call("whoami"))])
        assert immediate(answer)[0] == 500

    async def test_a_body_before_headers_is_a_500(self, sidecar: Sidecar) -> None:
        """Out-of-order messages are answered, not crashed on."""
        [answer] = await exchange(sidecar, [body(call("whoami"))])
        assert immediate(answer)[0] == 500


class TestRecords:
    async def test_body_decisions_are_counted(self, sidecar: Sidecar) -> None:
        """Each judged body counts in mcp_ext_authz_body_checks_total, not in checks_total."""
        await exchange(sidecar, [headers(), body(call("delete_repo"))])
        labels = {"server": "tools", "network": "external", "reason": "tool_hidden",
                  "tool": "delete_repo"}
        registry = sidecar.metrics.registry
        assert registry.get_sample_value("mcp_ext_authz_body_checks_total", labels) == 1
        assert registry.get_sample_value("mcp_ext_authz_checks_total", labels) is None
