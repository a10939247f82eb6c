"""The gRPC Authorization servicer: CheckRequest -> RequestFacts -> Decision -> CheckResponse.

Thin: check_request.py reads the request, pipeline.py decides, check_response.py writes the
answer. It never lets an exception escape: whatever goes wrong becomes a CheckResponse that
denies, so the sidecar stays fail-closed even behind an Envoy configured with
`failure_mode_allow: true`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from .._proto.envoy.service.auth.v3 import external_auth_pb2
from ..contract import AUTHZ_SERVICE, TOOL_RULES_BY_EXT_PROC, TOOL_RULES_EXTENSION
from ..exchange import ExchangeCache
from ..policy.decision import Decision
from ..tokens import TokenCache
from .check_request import (
    NO_FACTS,
    authorization,
    extract_body,
    extract_facts,
    extract_subject,
    parse_check_request,
)
from .check_response import encode_check_response, request_metadata
from .generation import Generation, Serving
from .metadata import exchange_entry
from .pipeline import Exchange, judge

log = logging.getLogger(__name__)

# Leave Envoy this much of its ext_authz timeout to receive our 503 before it gives up
# and answers its own generic 403.
DEADLINE_MARGIN_S = 0.02


class AuthorizationService:
    """The grpc.aio servicer for envoy.service.auth.v3.Authorization."""

    def __init__(self, serving: Serving, tokens: TokenCache, exchanges: ExchangeCache,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.serving = serving
        self.tokens = tokens
        self.exchanges = exchanges
        self._clock = clock

    @property
    def state(self) -> Generation:
        """The config generation being served."""
        return self.serving.state

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register on a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            AUTHZ_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.Check,
                    # A request that does not parse is a bad_request denial, not an RPC error.
                    request_deserializer=parse_check_request,
                    # Check returns the encoded bytes itself (encode_check_response).
                    response_serializer=None,
                )
            },
        )

    async def Check(  # the gRPC method's name
        self, request: external_auth_pb2.CheckRequest | None, context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse]
    ) -> bytes:
        started = self._clock()
        serving = self.serving
        state = serving.state  # a check finishes on the config it started with
        decision_id = serving.next_decision_id()
        facts = NO_FACTS
        subject = ""
        try:
            facts = extract_facts(request, state.policy)
            # The body is read here only where no ext_proc filter reads it (Istio).
            by_ext_proc = facts.context_extensions.get(
                TOOL_RULES_EXTENSION) == TOOL_RULES_BY_EXT_PROC
            # The budget is read only where a token is fetched or exchanged: not per check.
            judged = await judge(
                facts, state.policy,
                body=None if by_ext_proc else lambda: extract_body(request),
                can_rename=False, cached=self.tokens.cached,
                fetch=lambda oauth2, server: self.tokens.token(
                    oauth2, server, self._fetch_budget(state, context)),
                exchange=Exchange(
                    lambda: extract_subject(request, state.policy),
                    lambda settings, server, who, actor: self.exchanges.token(
                        settings, server, who, self._fetch_budget(state, context), actor),
                    token_given=authorization(request) is not None,
                ) if state.policy.exchanges_tokens else None)
            decision = judged.decision
            metadata = request_metadata(decision, facts)
            if judged.exchanged:
                metadata += exchange_entry(judged.exchanged)
            response = encode_check_response(decision, judged.token, decision_id, metadata)
            if state.config.decision_log.include_subject:
                subject = judged.subject
        except Exception:
            log.exception("check %s failed; denying", decision_id)
            decision = Decision("internal_error", detail="internal error (see the service log)",
                                peer=facts.peer)
            response = encode_check_response(decision, None, decision_id)
        serving.record(decision, decision_id, facts, self._clock() - started, subject=subject)
        return response

    def _fetch_budget(
        self, state: Generation, context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse]
    ) -> float:
        budget = state.config.tokens.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN_S)
        return budget
