"""The gRPC ExternalProcessor servicer: tool rules on the request body, and on the answer.

On the routes of servers with tool rules, `envoy-config` runs Envoy's ext_proc filter after
ext_authz: ext_authz decides the server from the headers alone (so a hidden server answers
404 before any body is read), and this service then reads the body for the tool rules. It
takes the caller's place from the metadata that ext_authz's answer left in Envoy, never
placing the caller a second time, and judges the body with the same `judge_items`.

The body comes in FULL_DUPLEX_STREAMED mode: Envoy passes each piece on and holds the
headers; the headers and the whole body go on to the server only when this service sends
them back, after the last piece. So the sidecar, not Envoy's buffers, bounds a body (413 the
moment it passes mcp.max_body_bytes: Envoy 1.40's BUFFERED mode stalls a request whose body
passes its buffer limit instead of refusing it), and nothing of a request reaches a server
before it is judged. Then:
- a hidden tool's call goes on under a fresh name (mcp/rewrite.py), so that the server answers
  it as the unknown tool it then is; the caller's name is put back in the answer;
- a tools/list answer loses the tools the caller may not call.
The answers come through a second ext_proc filter (the "answers" filter, closer to the
router), because Envoy 1.40 ignores `mode_override` on a filter whose request body is
FULL_DUPLEX_STREAMED. That filter sees every answer's headers; from what the first stream
left in Envoy's dynamic metadata (is this a tools/call or tools/list? what was renamed?) it
asks for the body of those answers only (answers.py). Every tools/call and tools/list alike,
so that a hidden tool's call costs what any other call costs. Every other answer on the
route, the server-to-client GET stream included, is read for the tools lists it carries,
event by event. An answer that cannot be read as every client would is refused (502).

One stream is one HTTP request (or its answer). A stream that ended cleanly before its
request was answered would let Envoy forward the request unjudged (even with
failure_mode_allow off), so whatever goes wrong is answered with a local 500, and a stream
that ends unanswered is aborted with an error, which Envoy fails closed on. Once the last
answer is sent, the stream ends (OK): a tool call running for minutes holds nothing here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from .._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ..contract import EXT_PROC_SERVICE
from ..mcp.jsonrpc import INVALID_REQUEST, body_headers, request_body
from ..mcp.replies import error_reply
from ..mcp.rewrite import Path, UnreadableAnswer, rename
from ..mcp.seal import Sealer
from ..policy.decision import Decision, Judged, RequestFacts, judge_items, resume
from ..policy.outcomes import denial_body
from . import answers as answers_filter
from .answers import JSON_CONTENT_TYPE, header_option, header_pairs, immediate_error
from .generation import Generation, Serving
from .metadata import AuthzVerdict, ext_proc_response, write_answer_plan
from .sealing import process_sealer

log = logging.getLogger(__name__)

_TRAILERS = "the request has trailers, which no MCP client sends"


@dataclass(slots=True)
class _Request:
    """What one stream has learnt of its HTTP request (or of its answer) so far."""

    state: Generation
    decision: Decision | None = None
    method: str = ""
    headers: dict[str, list[str]] = field(default_factory=dict)
    has_length: bool = False
    facts: RequestFacts = field(default_factory=lambda: RequestFacts("", None, "", ""))
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    judged: bool = False  # answered: sent on, or answered in Envoy's place
    done: bool = False  # nothing more to say on this stream
    # An answers-filter stream: how its answer is rewritten.
    answer: answers_filter.Answer | None = None


def _refusal(decision: Decision, decision_id: str) -> bytes:
    """Answer a refused request in Envoy's place: the decision's status and body."""
    response = ext_proc_response(decision, decision_id)
    immediate = response.immediate_response
    immediate.status.code = decision.http_status  # type: ignore[assignment]
    immediate.details = decision.reason
    body = decision.reply or (b"" if decision.reason in ("tool_not_found", "item_not_found")
                              else denial_body(decision.reason))
    if body:
        immediate.headers.set_headers.append(JSON_CONTENT_TYPE)
        immediate.body = body
    return response.SerializeToString()


def _body(data: bytes, end_of_stream: bool, kind: str = "request_body") -> bytes:
    response = ext_proc_pb2.ProcessingResponse()
    streamed = getattr(response, kind).response.body_mutation.streamed_response
    streamed.body = data
    streamed.end_of_stream = end_of_stream
    return response.SerializeToString()


def _internal_error() -> bytes:
    return immediate_error(500, "internal_error", "Internal error")


class ExternalProcessingService:
    """The grpc.aio servicer for envoy.service.ext_proc.v3.ExternalProcessor.

    Serves the same config generation as the Authorization service, under the same
    decision ids and record: a body decision is one more line of it.
    """

    def __init__(self, serving: Serving,
                 clock: Callable[[], float] = time.perf_counter,
                 sealer: Sealer | None = None,
                 refused: Callable[[str], object] | None = None) -> None:
        self.serving = serving
        self._clock = clock
        self.sealer = sealer if sealer is not None else process_sealer()
        # Told the cache key of an exchanged token the upstream answered 401 to.
        self._refused = refused

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register on a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            EXT_PROC_SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.Process,
                    request_deserializer=ext_proc_pb2.ProcessingRequest.FromString,
                    response_serializer=None,  # Process writes encoded bytes
                )
            },
        )

    async def Process(  # the gRPC method's name
        self, _requests: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext[ext_proc_pb2.ProcessingRequest, bytes],
    ) -> None:
        # context.read()/write() rather than iterating and yielding: measured 1.3x to 1.6x
        # the messages per second of the async-generator style (bench: direct ext_proc).
        request = _Request(self.serving.state)  # a request is judged on one config generation
        while not request.done:
            message = await context.read()
            if not isinstance(message, ext_proc_pb2.ProcessingRequest):
                break  # grpc.aio.EOF: Envoy is done sending
            try:
                answers = self._answer(request, message)
            except UnreadableAnswer:
                # A server's answer that cannot be read as every client would: its server
                # is at fault, and nothing of it goes on.
                request.judged = request.done = True
                answers = [answers_filter.REFUSED]
            except Exception:
                log.exception("ext_proc message failed; answering 500")
                request.judged = request.done = True
                answers = [_internal_error()]
            for answer in answers:
                await context.write(answer)
        # Done: the stream ends here (status OK), not when the HTTP exchange does. Envoy
        # sends nothing more, a long tool call holds no stream in the sidecar, and the
        # bodies cluster's max_stream_duration bounds only the judging.
        if not request.judged:
            # Ending cleanly now would let Envoy forward the request (or answer) unjudged.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the stream ended before its message was judged")

    def _answer(self, request: _Request, message: ext_proc_pb2.ProcessingRequest
                ) -> list[bytes]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._headers(request, message)
        if kind == "response_headers":
            request.judged = True  # headers answered now or with the body; never unanswered
            verdict = AuthzVerdict.read(message)
            if verdict.exchanged and self._refused is not None and any(
                    header.key == ":status" and (header.raw_value or header.value.encode())
                    == b"401" for header in message.response_headers.headers.headers):
                # The upstream refused the caller's exchanged token (revoked, or its rights
                # changed): the next request exchanges anew, never this token again.
                self._refused(verdict.exchanged)
            reply, request.answer = answers_filter.on_headers(
                message, verdict, request.state.policy.mcp.max_answer_bytes,
                lambda: self._resumed(request, verdict), self.sealer)
            request.done = request.answer is None
            return [reply]
        if kind == "response_body" and request.answer is not None:
            request.done = message.response_body.end_of_stream
            return [answers_filter.on_body(request.answer, message.response_body)]
        if request.decision is None or request.judged:
            raise ValueError(f"ext_proc message {kind!r} out of order")
        if kind == "request_body":
            piece = message.request_body
            request.chunks.append(piece.body)
            request.size += len(piece.body)
            if request.size > request.state.policy.mcp.max_body_bytes:
                # Refused at once, before reading the rest: the sidecar bounds a body.
                return self._judge(request, b"".join(request.chunks))
            if piece.end_of_stream:
                return self._judge(request, b"".join(request.chunks))
            return []  # the request waits, headers and all, until the body is whole
        if kind == "request_trailers":
            request.decision = replace(
                request.decision, reason="bad_mcp_request", detail=_TRAILERS,
                reply=error_reply(INVALID_REQUEST, f"Invalid Request: {_TRAILERS}"))
            return self._judge(request, None)
        raise ValueError(f"unexpected ext_proc message {kind!r}")

    def _headers(self, request: _Request, message: ext_proc_pb2.ProcessingRequest
                 ) -> list[bytes]:
        pairs = header_pairs(message.request_headers)
        pseudo = {key: value for key, value in pairs if key.startswith(":")}
        request.method = pseudo.get(":method", "")
        request.headers = body_headers(pairs)
        request.has_length = "content-length" in request.headers
        request.facts = RequestFacts(
            "", ",".join(v for k, v in pairs if k == "x-forwarded-for") or None,
            pseudo.get(":path", ""), pseudo.get(":authority", ""))
        decision = self._resumed(request, AuthzVerdict.read(message))
        if decision is None:
            request.judged = request.done = True
            return [_internal_error()]
        request.decision = decision
        if message.request_headers.end_of_stream:
            return self._judge(request, None)
        return []  # the headers wait for the body

    def _resumed(self, request: _Request, verdict: AuthzVerdict) -> Decision | None:
        """ext_authz's decision for this request, from what it left in the metadata; None
        if there is none."""
        if verdict.reason != "allowed" or verdict.server is None:
            # ext_proc runs after ext_authz; without its verdict the route is misconfigured.
            log.error("ext_proc: no allowed ext_authz decision in the request's metadata"
                      " (is ext_authz before ext_proc, and forwarding_namespaces set?)")
            return None
        return resume(request.state.policy, verdict.server, verdict.network, verdict.networks,
                      verdict.client_ip)

    def _judge(self, request: _Request, data: bytes | None) -> list[bytes]:
        """Decide on the whole body (None: the request has none) and answer for it."""
        started = self._clock()
        assert request.decision is not None
        judged = Judged(request.decision)
        if judged.decision.goes_upstream:
            body = request_body(data or b"", request.method, request.headers)
            judged = judge_items(judged.decision, body, request.state.policy, can_rename=True)
        decision = judged.decision
        decision_id = self.serving.next_decision_id()
        request.judged = request.done = True
        if decision.goes_upstream:
            answers = _go_on(request, judged, decision_id, data, self.sealer)
        else:
            answers = [_refusal(decision, decision_id)]
        self.serving.record(decision, decision_id, request.facts, self._clock() - started, "body")
        return answers


def _go_on(request: _Request, judged: Judged, decision_id: str, data: bytes | None,
           sealer: Sealer) -> list[bytes]:
    """Let the request go on: its headers, then its body, renamed where an item is hidden;
    and tell the answers filter (in Envoy's metadata) what the answer is."""
    decision = judged.decision
    response = ext_proc_response(decision, decision_id)
    response.request_headers.SetInParent()
    common = response.request_headers.response
    if judged.uses and data is not None:
        # Every use is sealed and spliced alike, a hidden one's with its fresh name and any
        # other's with its own text: the same work, so a hidden name takes the time a
        # missing one does, with or without a "*" rule.
        paths: dict[Path, str | None] = {}
        for use, hidden in zip(judged.uses, judged.hidden, strict=True):
            fresh = sealer.fresh(use.kind, use.name)
            paths[use.at if use.index is None else (use.index, *use.at)] = (
                fresh if hidden else None)
        data = rename(data.decode("utf-8"), paths).encode()
        if request.headers.get("mcp-name"):
            # Only a message that is no batch has an Mcp-Name (jsonrpc checked it).
            [name] = paths.values()
            common.header_mutation.set_headers.append(
                header_option("mcp-name", name or request.headers["mcp-name"][0]))
    if decision.uses_items and data is not None and request.has_length:
        # Set for every use, renamed or not: the same work, so the same time.
        common.header_mutation.set_headers.append(header_option("content-length", str(len(data))))
    # Every answer on the route is read: a list is filtered, and fresh names put back,
    # wherever it travels (an answer the upstream sent to another exchange, the GET stream,
    # a replay).
    kind = "list" if decision.lists_items else "call" if decision.uses_items else "any"
    write_answer_plan(response, kind)
    # A compressed answer could not be rewritten: ask for it plain.
    common.header_mutation.remove_headers.append("accept-encoding")
    answers = [response.SerializeToString()]
    if data is not None:
        answers.append(_body(data, True))
    return answers
