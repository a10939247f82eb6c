"""The answers filter's side: a server's answer on a route with item rules, read and
rewritten as it arrives (the caller's names put back, a list filtered for its caller), or
refused.

ext_proc.py's request stream leaves in Envoy's metadata what the answer is (an item use's,
a list's, or any other); this module takes it from there. Fresh names are sealed
(mcp/seal.py): any answer has them put back, whichever request it seems to answer. JSON
and SSE of a stated length come whole (BUFFERED, Envoy's buffers sized to
mcp.max_answer_bytes by envoy-config); SSE of no stated length event by event; anything else
of no stated length piece by piece, held here until whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from .._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ..mcp.replies import error_reply
from ..mcp.rewrite import (
    EventStream,
    UnreadableAnswer,
    Visible,
    drop_items,
    may_hold_items,
    set_member,
)
from ..mcp.seal import Sealer
from ..policy.decision import Decision
from .metadata import AuthzVerdict, read_answer_plan

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
JSON_CONTENT_TYPE = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=_OVERWRITE,
)

_Mode = processing_mode_pb2.ProcessingMode


def _answer_body(mode: int) -> processing_mode_pb2.ProcessingMode:
    # Every field said: the answers filter's own modes, but the answer body's.
    return _Mode(request_header_mode=_Mode.SKIP, response_header_mode=_Mode.SEND,
                 request_body_mode=_Mode.NONE, response_body_mode=mode,  # type: ignore[arg-type]
                 request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP)


_WHOLE, _PIECES = _answer_body(_Mode.BUFFERED), _answer_body(_Mode.STREAMED)


def header_option(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw),
                                      append_action=_OVERWRITE)


@dataclass(slots=True)
class Answer:
    """How the server's answer to one request is rewritten, as it arrives."""

    sealer: Sealer  # puts back the caller's name for any fresh name in the answer
    # The caller's filter for any list the answer carries (None: not read for lists, an
    # answer that is neither JSON nor SSE).
    visible: Visible | None
    # An answer held back to be rewritten (a whole body, one SSE event) may be at most this
    # big (mcp.max_answer_bytes): past it, it cannot be checked, and is refused (502).
    limit: int
    length_given: bool = False
    # What the request asked for: "list" (read whole, always), "call" (an item used: sent
    # back whether changed or not, so that a hidden item's answer takes the time a missing
    # one's does), or "any" (read for what it carries).
    kind: str = ""
    sse: bool = False
    plain: bool = False  # neither JSON nor SSE (an error page): names put back unescaped
    resource: str = ""  # an OAuth protected-resource document: the gateway URL it names
    events: EventStream | None = None  # an SSE answer of unknown length, as it streams
    # Any other answer of unknown length: its pieces, held here (not in Envoy's buffers)
    # until it is whole.
    held: bytearray | None = None

    def text(self, text: str) -> str | None:
        """One JSON text of the answer, rewritten; None when it stays as it is."""
        restored = self.sealer.restore(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape")
        # Judged by what it is: any message is parsed that may carry a list or an update,
        # whichever request it seems to answer.
        if self.visible is not None and (self.kind == "list" or may_hold_items(restored)):
            dropped = drop_items(restored, self.visible)
            if dropped is not None:
                return dropped
        return restored if restored != text else None


def header_pairs(headers: ext_proc_pb2.HttpHeaders) -> list[tuple[str, str]]:
    return [(header.key, header.raw_value.decode("utf-8", "replace") if header.raw_value
             else header.value) for header in headers.headers.headers]


def immediate_error(status: int, details: str, message: str) -> bytes:
    """An answer in Envoy's place: `status`, and a JSON-RPC error (code -32603) saying
    `message` for the whole body."""
    response = ext_proc_pb2.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = status  # type: ignore[assignment]
    immediate.details = details
    immediate.headers.set_headers.append(JSON_CONTENT_TYPE)
    immediate.body = error_reply(-32603, message)
    return response.SerializeToString()


# The server's answer cannot be checked (UnreadableAnswer): nothing of it goes on.
REFUSED = immediate_error(502, "unreadable_answer",
                          "Bad Gateway: the server's answer cannot be checked")


def on_headers(message: ext_proc_pb2.ProcessingRequest, verdict: AuthzVerdict, limit: int,
               resumed: Callable[[], Decision | None], sealer: Sealer
               ) -> tuple[bytes, Answer | None]:
    """Answer an answer's headers: what to send Envoy, and how its body is to be rewritten
    (None: nothing of it is, it goes on as it is). `verdict`: what ext_authz left in the
    metadata; `limit`: mcp.max_answer_bytes; `resumed`: ext_authz's decision, for a list to
    be filtered for its caller; `sealer`: opens the fresh names of hidden items. An
    UnreadableAnswer where the answer cannot be checked."""
    response = ext_proc_pb2.ProcessingResponse()
    response.response_headers.SetInParent()
    rewrite = read_answer_plan(message)
    headers = dict(header_pairs(message.response_headers))
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    resource = verdict.resource
    if resource:
        # A discovery route: the server's metadata document, to name the gateway.
        if (headers.get(":status") != "200" or media != "application/json"
                or message.response_headers.end_of_stream):
            return response.SerializeToString(), None
        answer = Answer(sealer, None, limit, length_given="content-length" in headers,
                        resource=resource)
        response.mode_override.CopyFrom(_WHOLE)
        return response.SerializeToString(), answer
    plain = media not in ("application/json", "text/event-stream")
    # A list's answer in another media type (or none) is refused: a lenient client might
    # read it all the same, hidden items and all. A call's answer in any media type has
    # its fresh name put back, which would tell a hidden item from a missing one (and so
    # would the time taken to put it back: every call's answer is read alike).
    if not rewrite or message.response_headers.end_of_stream or (plain and rewrite == "any"):
        return response.SerializeToString(), None  # nothing of it is to be rewritten
    if plain and rewrite == "list":
        raise UnreadableAnswer(f"a tools/list answer as {media or 'no media type'}")
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnreadableAnswer(f"an answer to rewrite came with Content-Encoding {encoding}")
    # Judged by what it is, not by the request it seems to answer: a list is filtered for
    # this caller in any answer, a call's or another's crossed into this exchange.
    decision = resumed()
    if decision is None or decision.server is None:
        raise ValueError("an answer to filter without the decision that asked for it")
    visible = functools.partial(decision.server.item_visible, placement=decision.placement)
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        # Said at once, before a byte is buffered: never a hang or a partial answer.
        raise UnreadableAnswer(f"an answer to rewrite of {length} bytes (over {limit})")
    answer = Answer(sealer, None if plain else visible, limit,
                     length_given=length is not None, kind=rewrite,
                     sse=media == "text/event-stream", plain=plain)
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
    return response.SerializeToString(), answer


def on_body(answer: Answer, piece: ext_proc_pb2.HttpBody) -> bytes:
    """Answer one piece of an answer's body: what of it goes on now."""
    response = ext_proc_pb2.ProcessingResponse()
    common = response.response_body.response
    if answer.events is not None:  # STREAMED: each piece answered with what can go on
        data = answer.events.feed(piece.body)
        if piece.end_of_stream:
            data += answer.events.finish()
        common.body_mutation.body = data
        return response.SerializeToString()
    if answer.held is not None:  # STREAMED, held: nothing goes on until it is whole
        answer.held += piece.body
        if len(answer.held) > answer.limit:
            raise UnreadableAnswer(f"an answer to rewrite is over {answer.limit} bytes")
        if not piece.end_of_stream:
            common.body_mutation.body = b""
            return response.SerializeToString()
        return _whole(answer, bytes(answer.held), response, always=True)
    if len(piece.body) > answer.limit:
        raise UnreadableAnswer(f"an answer to rewrite is over {answer.limit} bytes")
    return _whole(answer, piece.body, response)  # BUFFERED: the whole body, once


def _whole(answer: Answer, data: bytes, response: ext_proc_pb2.ProcessingResponse,
           *, always: bool = False) -> bytes:
    """Answer for a whole body; `always`: send it even unchanged (its pieces were held)."""
    common = response.response_body.response
    if answer.resource:
        named = set_member(data.decode("utf-8", "surrogateescape"), "resource",
                           answer.resource)
        if named is None:
            response.response_body.SetInParent()  # nothing to name: as it was
            return response.SerializeToString()
        rewritten_data: bytes | None = named.encode("utf-8", "surrogateescape")
    elif answer.sse:
        events = EventStream(answer.text, answer.limit)
        rewritten_data = events.feed(data) + events.finish()
    elif answer.plain:
        rewritten_data = answer.sealer.restore(data, escape=False)
    else:
        rewritten = answer.text(data.decode("utf-8", "surrogateescape"))
        rewritten_data = (None if rewritten is None
                          else rewritten.encode("utf-8", "surrogateescape"))
    # A call's answer is sent back whether a name was put back in it or not: the same
    # work for a hidden item's answer and a missing one's, so the same time.
    if rewritten_data is not None and rewritten_data != data:
        data = rewritten_data
    elif answer.kind != "call" and not always:
        response.response_body.SetInParent()  # an answer left as it was
        return response.SerializeToString()
    common.body_mutation.body = data
    if answer.length_given:
        common.header_mutation.set_headers.append(header_option("content-length", str(len(data))))
    return response.SerializeToString()
