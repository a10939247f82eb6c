"""The gRPC ExternalProcessor servicer: tool rules judged on the request body, after ext_authz.

On the routes of servers with tool rules, `envoy-config` runs Envoy's ext_proc filter after
ext_authz: ext_authz decides the server from the headers alone (so a hidden server answers
404 before any body is buffered), and this service then reads the buffered body. It takes
the caller's place from the metadata that ext_authz's answer left in Envoy, never placing
the caller a second time, and judges the body with the same `decide_tools` as ext_authz.

One stream is one HTTP request. Every message Envoy sends gets exactly one answer: a stream
that ended cleanly without one would let Envoy forward the request unjudged (even with
failure_mode_allow off), so whatever goes wrong is answered with a local 500, and if even
that cannot be sent the stream ends in an error, which Envoy fails closed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from ._proto.envoy.config.core.v3 import base_pb2
from ._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from .decision import Decision, RequestFacts, decide_tools, denial_body, resume
from .jsonrpc import Received, body_headers, error_reply, request_body
from .service import EXT_AUTHZ_NAMESPACE, AuthorizationService, ServiceState

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# The namespace this service's dynamic metadata is written to (for Envoy's access log).
EXT_PROC_NAMESPACE = "envoy.filters.http.ext_proc"


def _continue(kind: str) -> bytes:
    # Each answer field is named as the message it answers.
    response = ext_proc_pb2.ProcessingResponse()
    getattr(response, kind).SetInParent()
    return response.SerializeToString()


_CONTINUE = {kind: _continue(kind) for kind in (
    "request_headers", "response_headers", "request_body", "response_body",
    "request_trailers", "response_trailers")}
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
)
_INTERNAL_ERROR = error_reply(-32603, "Internal error")


@dataclass(slots=True)
class _Request:
    """What one stream has learnt of its HTTP request so far."""

    state: ServiceState
    decision: Decision | None = None
    method: str = ""
    headers: dict[str, list[str]] = field(default_factory=dict)
    facts: RequestFacts = field(default_factory=lambda: RequestFacts("", None, "", ""))


def _metadata(request: ext_proc_pb2.ProcessingRequest) -> dict[str, str]:
    namespace = request.metadata_context.filter_metadata.get(EXT_AUTHZ_NAMESPACE)
    if namespace is None:
        return {}
    return {key: value.string_value for key, value in namespace.fields.items()}


def _header_pairs(headers: ext_proc_pb2.HttpHeaders) -> list[tuple[str, str]]:
    return [(header.key, header.raw_value.decode("utf-8", "replace") if header.raw_value
             else header.value) for header in headers.headers.headers]


def _verdict(decision: Decision, decision_id: str, kind: str) -> bytes:
    """Continue an allowed request, or answer a refused one in Envoy's place."""
    response = ext_proc_pb2.ProcessingResponse()
    metadata = response.dynamic_metadata.fields[EXT_PROC_NAMESPACE].struct_value
    metadata.update({"decision_id": decision_id, "reason": decision.reason,
                     "tool": decision.tool})
    if decision.allowed:
        getattr(response, kind).SetInParent()
        return response.SerializeToString()
    immediate = response.immediate_response
    immediate.status.code = decision.http_status  # type: ignore[assignment]
    immediate.details = decision.reason
    body = decision.reply or (b"" if decision.reason == "tool_not_found"
                              else denial_body(decision.reason))
    if body:
        immediate.headers.set_headers.append(_JSON)
        immediate.body = body
    return response.SerializeToString()


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
        self, requests: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext[ext_proc_pb2.ProcessingRequest, bytes],
    ) -> AsyncIterator[bytes]:
        request = _Request(self.authz.state)  # a request is judged on one config generation
        async for message in requests:
            try:
                answer = self._answer(request, message)
            except Exception:
                log.exception("ext_proc message failed; answering 500")
                answer = _internal_error()
            yield answer

    def _answer(self, request: _Request, message: ext_proc_pb2.ProcessingRequest) -> bytes:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._headers(request, message)
        if kind == "request_body":
            body = message.request_body
            # BUFFERED mode sends the whole body in one message; anything else is a part.
            return self._judge(request, body.body,
                               "whole" if body.end_of_stream else "partial", kind)
        if kind in _CONTINUE:
            return _CONTINUE[kind]  # responses and trailers: not ours to judge
        raise ValueError(f"unexpected ext_proc message {kind!r}")

    def _headers(self, request: _Request, message: ext_proc_pb2.ProcessingRequest) -> bytes:
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
            return _internal_error()
        request.decision = resume(
            request.state.policy, metadata["server"], metadata.get("network", ""),
            filter(None, metadata.get("networks", "").split(",")),
            metadata.get("client_ip", ""))
        if message.request_headers.end_of_stream:
            return self._judge(request, b"", "whole", "request_headers")
        return _CONTINUE["request_headers"]

    def _judge(self, request: _Request, data: bytes, received: Received, kind: str) -> bytes:
        started = self._clock()
        if request.decision is None:
            raise ValueError("a body before its headers")
        body = request_body(data, request.method, request.headers, received)
        decision = request.decision
        if decision.allowed:
            decision = decide_tools(decision, body, request.state.policy)
        decision_id = self.authz.next_decision_id()
        answer = _verdict(decision, decision_id, kind)
        self.authz.record(decision, decision_id, request.facts, self._clock() - started, "body")
        return answer

