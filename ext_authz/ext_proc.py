"""The gRPC ExternalProcessor servicer: tool rules judged on the request body, after ext_authz.

On the routes of servers with tool rules, `envoy-config` runs Envoy's ext_proc filter after
ext_authz: ext_authz decides the server from the headers alone (so a hidden server answers
404 before any body is read), and this service then reads the body for the tool rules. It
takes the caller's place from the metadata that ext_authz's answer left in Envoy, never
placing the caller a second time, and judges the body with the same `decide_tools`.

The body comes in FULL_DUPLEX_STREAMED mode: Envoy hands over each piece as it arrives and
keeps nothing, and the request's headers and body go on to the server only when this
service sends them back, after the last piece. So the sidecar, not Envoy's buffers, bounds a
body (413 the moment it passes mcp.max_body_bytes: Envoy 1.40's BUFFERED mode stalls a
request whose body passes its buffer limit instead of refusing it), and nothing of a request
reaches a server before it is judged.

One stream is one HTTP request. A stream that ended cleanly before its request was answered
would let Envoy forward the request unjudged (even with failure_mode_allow off), so
whatever goes wrong is answered with a local 500, and a stream that ends unanswered is
aborted with an error, which Envoy fails closed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from ._proto.envoy.config.core.v3 import base_pb2
from ._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from .decision import Decision, RequestFacts, decide_tools, denial_body, resume
from .jsonrpc import INVALID_REQUEST, body_headers, error_reply, request_body
from .service import EXT_AUTHZ_NAMESPACE, AuthorizationService, ServiceState

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# The namespace this service's dynamic metadata is written to (for Envoy's access log).
EXT_PROC_NAMESPACE = "envoy.filters.http.ext_proc"

_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
)
_INTERNAL_ERROR = error_reply(-32603, "Internal error")
_TRAILERS = "the request has trailers, which no MCP client sends"


@dataclass(slots=True)
class _Request:
    """What one stream has learnt of its HTTP request so far."""

    state: ServiceState
    decision: Decision | None = None
    method: str = ""
    headers: dict[str, list[str]] = field(default_factory=dict)
    facts: RequestFacts = field(default_factory=lambda: RequestFacts("", None, "", ""))
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    answered: bool = False  # continued with its body, or answered in Envoy's place


def _metadata(request: ext_proc_pb2.ProcessingRequest) -> dict[str, str]:
    namespace = request.metadata_context.filter_metadata.get(EXT_AUTHZ_NAMESPACE)
    if namespace is None:
        return {}
    return {key: value.string_value for key, value in namespace.fields.items()}


def _header_pairs(headers: ext_proc_pb2.HttpHeaders) -> list[tuple[str, str]]:
    return [(header.key, header.raw_value.decode("utf-8", "replace") if header.raw_value
             else header.value) for header in headers.headers.headers]


def _with_metadata(decision: Decision, decision_id: str) -> ext_proc_pb2.ProcessingResponse:
    response = ext_proc_pb2.ProcessingResponse()
    metadata = response.dynamic_metadata.fields[EXT_PROC_NAMESPACE].struct_value
    metadata.update({"decision_id": decision_id, "reason": decision.reason,
                     "tool": decision.tool})
    return response


def _refusal(decision: Decision, decision_id: str) -> bytes:
    """Answer a refused request in Envoy's place: the decision's status and body."""
    response = _with_metadata(decision, decision_id)
    immediate = response.immediate_response
    immediate.status.code = decision.http_status  # type: ignore[assignment]
    immediate.details = decision.reason
    body = decision.reply or (b"" if decision.reason == "tool_not_found"
                              else denial_body(decision.reason))
    if body:
        immediate.headers.set_headers.append(_JSON)
        immediate.body = body
    return response.SerializeToString()


def _continuation(decision: Decision, decision_id: str, body: bytes | None) -> list[bytes]:
    """Let an allowed request go on: its headers, then (if it has one) its whole body."""
    headers = _with_metadata(decision, decision_id)
    headers.request_headers.SetInParent()
    answers = [headers.SerializeToString()]
    if body is not None:
        rest = ext_proc_pb2.ProcessingResponse()
        streamed = rest.request_body.response.body_mutation.streamed_response
        streamed.body = body
        streamed.end_of_stream = True
        answers.append(rest.SerializeToString())
    return answers


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

    Shares the Authorization service's config generation, decision ids, metrics and
    decision log: a body decision is one more line of the same record.
    """

    def __init__(self, authz: AuthorizationService,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.authz = authz
        self._clock = clock

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register on a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.Process,
                    request_deserializer=ext_proc_pb2.ProcessingRequest.FromString,
                    response_serializer=None,  # Process yields encoded bytes
                )
            },
        )

    async def Process(  # the gRPC method's name
        self, _requests: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext[ext_proc_pb2.ProcessingRequest, bytes],
    ) -> None:
        # context.read()/write() rather than iterating and yielding: measured 1.3x to 1.6x
        # the messages per second of the async-generator style (bench: direct ext_proc).
        request = _Request(self.authz.state)  # a request is judged on one config generation
        while True:
            message = await context.read()
            if not isinstance(message, ext_proc_pb2.ProcessingRequest):
                break  # grpc.aio.EOF: Envoy is done sending
            if request.answered:
                continue  # pieces Envoy sent before it took our answer: nothing to say
            try:
                answers = self._answer(request, message)
            except Exception:
                log.exception("ext_proc message failed; answering 500")
                request.answered = True
                answers = [_internal_error()]
            for answer in answers:
                await context.write(answer)
        if not request.answered:
            # Ending cleanly now would let Envoy forward the request unjudged.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the request ended before its body was judged")

    def _answer(self, request: _Request, message: ext_proc_pb2.ProcessingRequest
                ) -> list[bytes]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._headers(request, message)
        if request.decision is None:
            raise ValueError(f"ext_proc message {kind!r} before the request headers")
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
        request.facts = RequestFacts(
            "", ",".join(v for k, v in pairs if k == "x-forwarded-for") or None,
            pseudo.get(":path", ""), pseudo.get(":authority", ""))
        metadata = _metadata(message)
        if metadata.get("reason") != "allowed" or "server" not in metadata:
            # ext_proc runs after ext_authz; without its verdict the route is misconfigured.
            log.error("ext_proc: no allowed ext_authz decision in the request's metadata"
                      " (is ext_authz before ext_proc, and forwarding_namespaces set?)")
            request.answered = True
            return [_internal_error()]
        request.decision = resume(
            request.state.policy, metadata["server"], metadata.get("network", ""),
            metadata.get("networks", ""), metadata.get("client_ip", ""))
        if message.request_headers.end_of_stream:
            return self._judge(request, None)
        return []  # the headers wait for the body

    def _judge(self, request: _Request, data: bytes | None) -> list[bytes]:
        """Decide on the whole body (None: the request has none) and answer for it."""
        started = self._clock()
        assert request.decision is not None
        decision = request.decision
        if decision.allowed:
            body = request_body(data or b"", request.method, request.headers)
            decision = decide_tools(decision, body, request.state.policy)
        decision_id = self.authz.next_decision_id()
        request.answered = True
        answers = (_continuation(decision, decision_id, data) if decision.allowed
                   else [_refusal(decision, decision_id)])
        self.authz.record(decision, decision_id, request.facts, self._clock() - started, "body")
        return answers
