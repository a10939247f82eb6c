"""One request's steps, as every edge takes them: the server, the token, the tool rules.

The ext_authz servicer and the `check` command both run this, so that what `check` says is
what a request gets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import SubjectRefusedError, TokenError
from ..mcp.jsonrpc import Body
from ..policy.compile import Policy
from ..policy.config import OAuth2Settings, TokenExchangeSettings
from ..policy.decision import Decision, RequestFacts, decide, decide_items
from ..policy.protected_resource import challenge
from ..policy.subject import Subject, exchange_key
from .subject import NoSubject

CachedToken = Callable[[OAuth2Settings], str | None]
FetchToken = Callable[[OAuth2Settings, str], Awaitable[str]]
# (settings, server, subject, actor token or None) -> the subject's token for the server.
ExchangeToken = Callable[[TokenExchangeSettings, str, Subject, str | None], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Exchange:
    """How an edge exchanges a caller's token: who the caller is (`subject`, read only for
    a server that exchanges; raises NoSubject), and the exchange itself."""

    subject: Callable[[], Subject]
    token: ExchangeToken
    token_given: bool  # the request carried an Authorization header (for the challenge)


@dataclass(frozen=True, slots=True)
class Judgement:
    """A request judged: the decision, the token to send upstream, and for an exchanged
    token its cache key (for the upstream's 401 to evict) and its subject's `sub`."""

    decision: Decision
    token: str | None = None
    exchanged: str = ""
    subject: str = ""


async def judge(facts: RequestFacts, policy: Policy, *, body: Callable[[], Body] | None,
                can_rename: bool, fetch: FetchToken | None,
                cached: CachedToken | None = None,
                exchange: Exchange | None = None) -> Judgement:
    """Decide a request: the server from its headers, then the token the server needs (the
    `cached` one, else `fetch`ed; the caller's `exchange`d for a token-exchange server; no
    token step without `fetch`), then the tool rules from its body (when `body` is given:
    where this edge reads it).

    `can_rename`: the edge can send a hidden tool's call on under a fresh name (ext_proc
    can, a Check cannot).
    """
    decision = decide(facts, policy)
    narrowed = None
    if body is not None and decision.reads_body:
        narrowed = decide_items(decision, body(), policy, can_rename=can_rename)
    # Tokens are had before the tool rules have their say: while the token endpoint is
    # down (or the caller's token will not do), a hidden tool must get the answer that a
    # missing tool gets.
    if fetch is None:
        return Judgement(decision if narrowed is None else narrowed)
    settings = decision.token_exchange
    if settings is not None:
        return await _exchanged(decision, narrowed, facts, settings, fetch, cached, exchange)
    token = None
    oauth2 = decision.oauth2
    if oauth2 is not None:
        try:
            token = await _client_token(oauth2, decision, fetch, cached)
        except TokenError as exc:
            return Judgement(decision.deny("upstream_credentials_unavailable", str(exc)))
    return Judgement(decision if narrowed is None else narrowed, token)


async def _client_token(oauth2: OAuth2Settings, decision: Decision, fetch: FetchToken,
                        cached: CachedToken | None) -> str:
    token = cached(oauth2) if cached is not None else None
    return token if token is not None else await fetch(oauth2, decision.server_name or "")


async def _exchanged(decision: Decision, narrowed: Decision | None, facts: RequestFacts,
                     settings: TokenExchangeSettings, fetch: FetchToken,
                     cached: CachedToken | None, exchange: Exchange | None) -> Judgement:
    """The caller's token exchanged for the server's: never passed on, whatever fails."""
    assert decision.server is not None
    server = decision.server_name or ""
    if exchange is None:
        # An edge that cannot exchange (no subject to read) never lets the caller's own
        # token through in its place.
        return Judgement(decision.deny("upstream_credentials_unavailable",
                                       "this edge cannot exchange the caller's token"))
    try:
        subject = exchange.subject()
        actor = None
        if settings.actor is not None:
            actor = await _client_token(settings.actor, decision, fetch, cached)
        token = await exchange.token(settings, server, subject, actor)
    except (NoSubject, SubjectRefusedError) as exc:
        # The caller's to fix: a 401 pointing at the server's metadata at the gateway.
        return Judgement(decision.deny("subject_token_refused", str(exc), challenge(
            facts.origin, decision.server, exchange.token_given)))
    except TokenError as exc:
        return Judgement(decision.deny("upstream_credentials_unavailable", str(exc)))
    return Judgement(decision if narrowed is None else narrowed, token,
                     exchange_key(settings, subject), subject.subject)
