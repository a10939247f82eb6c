"""One request's steps, as every edge takes them: the server, the token, the tool rules.

The ext_authz servicer and the `check` command both run this, so that what `check` says is
what a request gets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..errors import TokenError
from ..mcp.jsonrpc import Body
from ..policy.compile import Policy
from ..policy.config import OAuth2Settings
from ..policy.decision import Decision, RequestFacts, decide, decide_items

CachedToken = Callable[[OAuth2Settings], str | None]
FetchToken = Callable[[OAuth2Settings, str], Awaitable[str]]


async def judge(facts: RequestFacts, policy: Policy, *, body: Callable[[], Body] | None,
                can_rename: bool, fetch: FetchToken | None,
                cached: CachedToken | None = None) -> tuple[Decision, str | None]:
    """Decide a request: the server from its headers, then the token the server needs (the
    `cached` one, else `fetch`ed; no token step without `fetch`), then the tool rules from
    its body (when `body` is given: where this edge reads it). The decision and the token.

    `can_rename`: the edge can send a hidden tool's call on under a fresh name (ext_proc
    can, a Check cannot).
    """
    decision = decide(facts, policy)
    narrowed = None
    if body is not None and decision.reads_body:
        narrowed = decide_items(decision, body(), policy, can_rename=can_rename)
    token = None
    oauth2 = decision.oauth2
    if oauth2 is not None and fetch is not None:
        # Fetched before the tool rules have their say: while the token endpoint is down,
        # a hidden tool must get the 503 that a missing tool gets.
        token = cached(oauth2) if cached is not None else None
        if token is None:
            try:
                token = await fetch(oauth2, decision.server_name or "")
            except TokenError as exc:
                return decision.deny("upstream_credentials_unavailable", str(exc)), None
    return (decision if narrowed is None else narrowed), token
