"""The gRPC ExternalProcessor servicer: tool rules on the request body, and on the answer.

On the routes of servers with tool rules, `envoy-config` runs Envoy's ext_proc filter after
ext_authz: ext_authz decides the server from the headers alone (so a hidden server answers
404 before any body is read), and this service then reads the body for the tool rules. It
takes the caller's place from the metadata that ext_authz's answer left in Envoy, never
placing the caller a second time, and judges the body with the same `decide_tools`.

The body comes in FULL_DUPLEX_STREAMED mode: Envoy passes each piece on and holds the
headers; the headers and the whole body go on to the server only when this service sends
them back, after the last piece. So the sidecar, not Envoy's buffers, bounds a body (413 the
moment it passes mcp.max_body_bytes: Envoy 1.40's BUFFERED mode stalls a request whose body
passes its buffer limit instead of refusing it), and nothing of a request reaches a server
before it is judged. Then:
- a hidden tool's call goes on under a fresh name (rewrite.py), so that the server answers
  it as the unknown tool it then is; the caller's name is put back in the answer;
- a tools/list answer loses the tools the caller may not call.
The answers come through a second ext_proc filter (the "answers" filter, closer to the
router), because Envoy 1.40 ignores `mode_override` on a filter whose request body is
FULL_DUPLEX_STREAMED. That filter sees every answer's headers; from what the first stream
left in Envoy's dynamic metadata (is this a tools/call or tools/list? what was renamed?) it
asks for the body of those answers only: BUFFERED for JSON (the length set anew), STREAMED
for SSE (events re-framed as they come). Every tools/call and tools/list alike, so that a
hidden tool's call costs what any other call costs. Every other answer, and the
server-to-client GET stream above all, passes with its headers seen and its body untouched.

One stream is one HTTP request (or its answer). A stream that ended cleanly before its
request was answered would let Envoy forward the request unjudged (even with
failure_mode_allow off), so whatever goes wrong is answered with a local 500, and a stream
that ends unanswered is aborted with an error, which Envoy fails closed on. Once the last
answer is sent, the stream ends (OK): a tool call running for minutes holds nothing here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from .._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ..contract import EXT_PROC_SERVICE
from ..mcp.jsonrpc import INVALID_REQUEST, body_headers, request_body
from ..mcp.replies import error_reply
from ..mcp.rewrite import (
    EventStream,
    Path,
    UnreadableAnswer,
    drop_tools,
    fresh_name,
    rename,
    restore,
    set_member,
)
from ..policy.decision import Decision, RequestFacts, decide_tools, resume
from ..policy.outcomes import denial_body
from .generation import Generation, Serving
from .metadata import AuthzVerdict, ext_proc_response, read_answer_plan, write_answer_plan

log = logging.getLogger(__name__)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=_OVERWRITE,
)
_INTERNAL_ERROR = error_reply(-32603, "Internal error")
_TRAILERS = "the request has trailers, which no MCP client sends"

_Mode = processing_mode_pb2.ProcessingMode


def _answer_body(mode: int) -> processing_mode_pb2.ProcessingMode:
    # Every field said: the answers filter's own modes, but the answer body's.
    return _Mode(request_header_mode=_Mode.SKIP, response_header_mode=_Mode.SEND,
                 request_body_mode=_Mode.NONE, response_body_mode=mode,  # type: ignore[arg-type]
                 request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP)


_WHOLE, _PIECES = _answer_body(_Mode.BUFFERED), _answer_body(_Mode.STREAMED)


def _header(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw),
                                      append_action=_OVERWRITE)


@dataclass(slots=True)
class _Answer:
    """How the server's answer to one request is rewritten, as it arrives."""

    renamed: dict[str, str]  # fresh name -> the caller's
    tool_visible: Callable[[str], bool] | None  # set when tools/list answers are filtered
    # An answer held back to be rewritten (a whole body, one SSE event) may be at most this
    # big (mcp.max_answer_bytes): past it, it cannot be checked, and is refused (502).
    limit: int
    length_given: bool = False
    sse: bool = False
    plain: bool = False  # neither JSON nor SSE (an error page): names put back unescaped
    resource: str = ""  # an OAuth protected-resource document: the gateway URL it names
    events: EventStream | None = None  # an SSE answer of unknown length, as it streams
    # Any other answer of unknown length: its pieces, held here (not in Envoy's buffers)
    # until it is whole.
    held: bytearray | None = None

    def text(self, text: str) -> str | None:
        """One JSON text of the answer, rewritten; None when it stays as it is."""
        restored = restore(text.encode(), self.renamed).decode() if self.renamed else text
        if self.tool_visible is not None:
            dropped = drop_tools(restored, self.tool_visible)
            if dropped is not None:
                return dropped
        return restored if restored != text else None


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
    answer: _Answer | None = None  # an answers-filter stream: how its answer is rewritten


def _header_pairs(headers: ext_proc_pb2.HttpHeaders) -> list[tuple[str, str]]:
    return [(header.key, header.raw_value.decode("utf-8", "replace") if header.raw_value
             else header.value) for header in headers.headers.headers]


def _refusal(decision: Decision, decision_id: str) -> bytes:
    """Answer a refused request in Envoy's place: the decision's status and body."""
    response = ext_proc_response(decision, decision_id)
    immediate = response.immediate_response
    immediate.status.code = decision.http_status  # type: ignore[assignment]
    immediate.details = decision.reason
    body = decision.reply or (b"" if decision.reason == "tool_not_found"
                              else denial_body(decision.reason))
    if body:
        immediate.headers.set_headers.append(_JSON)
        immediate.body = body
    return response.SerializeToString()


def _body(data: bytes, end_of_stream: bool, kind: str = "request_body") -> bytes:
    response = ext_proc_pb2.ProcessingResponse()
    streamed = getattr(response, kind).response.body_mutation.streamed_response
    streamed.body = data
    streamed.end_of_stream = end_of_stream
    return response.SerializeToString()


def _refusal_of_answer() -> bytes:
    response = ext_proc_pb2.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = 502  # type: ignore[assignment]
    immediate.details = "unreadable_answer"
    immediate.headers.set_headers.append(_JSON)
    immediate.body = error_reply(-32603, "Bad Gateway: the server's answer cannot be checked")
    return response.SerializeToString()


# The server's answer cannot be checked (mcp.rewrite.UnreadableAnswer): nothing of it goes on.
_BAD_GATEWAY = _refusal_of_answer()


def _internal_error() -> bytes:
    response = ext_proc_pb2.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = 500  # type: ignore[assignment]
    immediate.details = "internal_error"
    immediate.headers.set_headers.append(_JSON)
    immediate.body = _INTERNAL_ERROR
    return response.SerializeToString()


class ExternalProcessingService:
    """The grpc.aio servicer for envoy.service.ext_proc.v3.ExternalProcessor.

    Serves the same config generation as the Authorization service, under the same
    decision ids and record: a body decision is one more line of it.
    """

    def __init__(self, serving: Serving,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.serving = serving
        self._clock = clock

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
                answers = [_BAD_GATEWAY]
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
            return self._answer_headers(request, message)
        if kind == "response_body" and request.answer is not None:
            request.done = message.response_body.end_of_stream
            return self._answer_body(request.answer, message.response_body)
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
        pairs = _header_pairs(message.request_headers)
        pseudo = {key: value for key, value in pairs if key.startswith(":")}
        request.method = pseudo.get(":method", "")
        request.headers = body_headers(pairs)
        request.has_length = "content-length" in request.headers
        request.facts = RequestFacts(
            "", ",".join(v for k, v in pairs if k == "x-forwarded-for") or None,
            pseudo.get(":path", ""), pseudo.get(":authority", ""))
        decision = self._resumed(request, message)
        if decision is None:
            request.judged = request.done = True
            return [_internal_error()]
        request.decision = decision
        if message.request_headers.end_of_stream:
            return self._judge(request, None)
        return []  # the headers wait for the body

    def _resumed(self, request: _Request, message: ext_proc_pb2.ProcessingRequest
                 ) -> Decision | None:
        """ext_authz's decision for this request, from its metadata; None if there is none."""
        verdict = AuthzVerdict.read(message)
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
        decision = request.decision
        if decision.allowed:
            body = request_body(data or b"", request.method, request.headers)
            decision = decide_tools(decision, body, request.state.policy, can_rename=True)
        decision_id = self.serving.next_decision_id()
        request.judged = request.done = True
        if decision.allowed:
            answers = _go_on(request, decision, decision_id, data)
        else:
            answers = [_refusal(decision, decision_id)]
        self.serving.record(decision, decision_id, request.facts, self._clock() - started, "body")
        return answers

    # -- the answer (the answers filter's streams) --------------------------------------

    def _answer_headers(self, request: _Request, message: ext_proc_pb2.ProcessingRequest
                        ) -> list[bytes]:
        request.judged = True  # headers answered now or with the body; never unanswered
        response = ext_proc_pb2.ProcessingResponse()
        response.response_headers.SetInParent()
        rewrite, renamed = read_answer_plan(message)
        headers = dict(_header_pairs(message.response_headers))
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        resource = AuthzVerdict.read(message).resource
        if resource:
            # A discovery route: the server's metadata document, to name the gateway.
            if (headers.get(":status") != "200" or media != "application/json"
                    or message.response_headers.end_of_stream):
                request.done = True
                return [response.SerializeToString()]
            request.answer = _Answer({}, None, request.state.policy.mcp.max_answer_bytes,
                                     length_given="content-length" in headers,
                                     resource=resource)
            response.mode_override.CopyFrom(_WHOLE)
            return [response.SerializeToString()]
        plain = media not in ("application/json", "text/event-stream")
        # A tools/list answer in another media type (or none) is refused: a lenient client
        # might read it all the same, hidden tools and all. A call's answer in any media type
        # has its fresh name put back, which would tell a hidden tool from a missing one (and
        # so would the time taken to put it back: every call's answer is read alike).
        if not rewrite or message.response_headers.end_of_stream:
            request.done = True  # nothing of this answer is to be rewritten
            return [response.SerializeToString()]
        if plain and rewrite == "list":
            raise UnreadableAnswer(f"a tools/list answer as {media or 'no media type'}")
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise UnreadableAnswer(f"an answer to rewrite came with Content-Encoding {encoding}")
        tool_visible = None
        if rewrite == "list":
            decision = self._resumed(request, message)
            if decision is None or decision.server is None:
                raise ValueError("a tools/list answer without the decision that asked for it")
            server, placement = decision.server, decision.placement
            tool_visible = functools.partial(server.tool_visible, placement=placement)
        limit = request.state.policy.mcp.max_answer_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            # Said at once, before a byte is buffered: never a hang or a partial answer.
            raise UnreadableAnswer(f"an answer to rewrite of {length} bytes (over {limit})")
        answer = _Answer(renamed, None if plain else tool_visible, limit,
                         length_given=length is not None,
                         sse=media == "text/event-stream", plain=plain)
        request.answer = answer
        if answer.sse and not answer.length_given:
            # A stream of unknown length (it may stay open): event by event, as it comes.
            answer.events = EventStream(answer.text, limit)
            response.mode_override.CopyFrom(_PIECES)
        elif not answer.length_given:
            # JSON of unknown length: piece by piece into the sidecar, sent on whole.
            answer.held = bytearray()
            response.mode_override.CopyFrom(_PIECES)
        else:
            # JSON, or SSE of a length the server said (the TypeScript SDK's, sent in one
            # write): whole, the length set anew with the new body, as the server would.
            # (Envoy's buffers are sized to mcp.max_answer_bytes: envoy-config.)
            response.mode_override.CopyFrom(_WHOLE)
        return [response.SerializeToString()]

    def _answer_body(self, answer: _Answer, piece: ext_proc_pb2.HttpBody) -> list[bytes]:
        response = ext_proc_pb2.ProcessingResponse()
        common = response.response_body.response
        if answer.events is not None:  # STREAMED: each piece answered with what can go on
            data = answer.events.feed(piece.body)
            if piece.end_of_stream:
                data += answer.events.finish()
            common.body_mutation.body = data
            return [response.SerializeToString()]
        if answer.held is not None:  # STREAMED, held: nothing goes on until it is whole
            answer.held += piece.body
            if len(answer.held) > answer.limit:
                raise UnreadableAnswer(f"an answer to rewrite is over {answer.limit} bytes")
            if not piece.end_of_stream:
                common.body_mutation.body = b""
                return [response.SerializeToString()]
            return self._whole(answer, bytes(answer.held), response, always=True)
        if len(piece.body) > answer.limit:
            raise UnreadableAnswer(f"an answer to rewrite is over {answer.limit} bytes")
        return self._whole(answer, piece.body, response)  # BUFFERED: the whole body, once

    def _whole(self, answer: _Answer, data: bytes, response: ext_proc_pb2.ProcessingResponse,
               *, always: bool = False) -> list[bytes]:
        """Answer for a whole body; `always`: send it even unchanged (its pieces were held)."""
        common = response.response_body.response
        if answer.resource:
            named = set_member(data.decode("utf-8", "surrogateescape"), "resource",
                               answer.resource)
            if named is None:
                response.response_body.SetInParent()  # nothing to name: as it was
                return [response.SerializeToString()]
            rewritten_data: bytes | None = named.encode("utf-8", "surrogateescape")
        elif answer.sse:
            events = EventStream(answer.text, answer.limit)
            rewritten_data = events.feed(data) + events.finish()
        elif answer.plain:
            rewritten_data = restore(data, answer.renamed, escape=False)
        else:
            rewritten = answer.text(data.decode("utf-8", "surrogateescape"))
            rewritten_data = (None if rewritten is None
                              else rewritten.encode("utf-8", "surrogateescape"))
        # A call's answer is sent back whether a name was put back in it or not: the same
        # work for a hidden tool's answer and a missing one's, so the same time.
        if rewritten_data is not None and rewritten_data != data:
            data = rewritten_data
        elif answer.tool_visible is not None and not always:
            response.response_body.SetInParent()  # a tools/list answer left as it was
            return [response.SerializeToString()]
        common.body_mutation.body = data
        if answer.length_given:
            common.header_mutation.set_headers.append(_header("content-length", str(len(data))))
        return [response.SerializeToString()]


def _go_on(request: _Request, decision: Decision, decision_id: str,
           data: bytes | None) -> list[bytes]:
    """Let the request go on: its headers, then its body, renamed where a tool is hidden;
    and tell the answers filter (in Envoy's metadata) what to do with the answer."""
    response = ext_proc_response(decision, decision_id)
    response.request_headers.SetInParent()
    common = response.request_headers.response
    renamed: dict[str, str] = {}
    if decision.hidden and data is not None:
        paths: dict[Path, str] = {}
        for call in decision.hidden:
            fresh = fresh_name()
            renamed[fresh] = call.name
            paths[("params", "name") if call.index is None
                  else (call.index, "params", "name")] = fresh
        data = rename(data.decode("utf-8"), paths).encode()
        if request.headers.get("mcp-name"):
            common.header_mutation.set_headers.append(_header("mcp-name", next(iter(renamed))))
    if decision.calls_tools and data is not None and request.has_length:
        # Set for every call, renamed or not: the same work, so the same time.
        common.header_mutation.set_headers.append(_header("content-length", str(len(data))))
    if decision.lists_tools or decision.calls_tools:
        write_answer_plan(response, decision.lists_tools, renamed)
        # A compressed answer could not be rewritten: ask for it plain.
        common.header_mutation.remove_headers.append("accept-encoding")
    answers = [response.SerializeToString()]
    if data is not None:
        answers.append(_body(data, True))
    return answers
