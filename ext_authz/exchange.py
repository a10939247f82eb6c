"""RFC 8693 token exchange, cached per subject: the caller's own token, as Envoy verified
it, exchanged for the token the upstream gets. The caller's token itself never goes on.

One entry per (subject, exchange settings), keyed by a digest that holds neither token nor
secret. An entry lives no longer than the token issued (less the buffer, as for client
credentials) nor than the subject token's own `exp`; at most one exchange is in flight per
entry however many requests wait (single flight); past 80% of its life a request still gets
it and starts the next exchange with its own, still valid, subject token (refresh ahead,
never without one); the least recently used entries go past `max_entries`; an upstream's
401 evicts (`evict`).

Errors say whose fault: `SubjectRefusedError` (the subject token expired, or the IdP refused
it: the caller's to fix, a 401) or another TokenError (the IdP or the network: a 503).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .errors import SubjectRefusedError, TokenEndpointError, TokenError, TokenResponseError
from .policy.config import ACCESS_TOKEN_TYPE, TokenExchangeSettings, TokenSettings
from .policy.subject import Subject, exchange_key
from .token_requests import client_auth, post_token_request
from .tokens import REFRESH_AT_FRACTION, backoff, usable_lifetime

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
MAX_ENTRIES = 10_000
# RFC 8693 2.2.2: `invalid_request` for a subject (or actor) token that is invalid or
# unacceptable by policy; `invalid_grant` as RFC 6749 has it. The caller's to fix, where
# `invalid_target` (an audience or resource refused) is the gateway's config.
_SUBJECT_REFUSALS = frozenset(("invalid_request", "invalid_grant"))

Outcome = Callable[[str, str], None]
"""Called per request with (server, outcome): `hit`, `miss` or `failure`: never a subject."""


def build_exchange_request(settings: TokenExchangeSettings, subject: Subject,
                           actor: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(form fields, headers) of an RFC 8693 request for this subject (and actor)."""
    form = {"grant_type": GRANT_TYPE, "subject_token": subject.token,
            "subject_token_type": JWT_TOKEN_TYPE,
            "requested_token_type": settings.requested_token_type}
    if settings.audience:
        form["audience"] = settings.audience
    if settings.resource:
        form["resource"] = settings.resource
    if settings.scopes:
        form["scope"] = " ".join(settings.scopes)
    if actor is not None:
        form["actor_token"] = actor
        form["actor_token_type"] = ACCESS_TOKEN_TYPE
    return form, client_auth(settings, form)


@dataclass(slots=True)
class _Entry:
    server: str
    token: str | None = None
    usable_until: float = 0.0
    refresh_at: float = 0.0
    fetch: asyncio.Task[None] | None = None
    last_error: TokenError | None = None
    failures: int = 0  # in a row, the IdP's or the network's (not the subject's)
    retry_at: float = 0.0  # till then a request gets last_error at once


class ExchangeCache:
    """Exchanged tokens per subject, fetched once, never served past either `exp`."""

    def __init__(self, settings: TokenSettings, *, client: httpx.AsyncClient | None = None,
                 max_entries: int = MAX_ENTRIES, on_outcome: Outcome | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=False)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._max = max_entries
        self._on_outcome = on_outcome
        self._clock, self._wall = clock, wall
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    async def token(self, settings: TokenExchangeSettings, server: str, subject: Subject,
                    budget_s: float, actor: str | None = None) -> str:
        """The subject's token for this server, exchanging (at most `budget_s` seconds) when
        none is held. Raises SubjectRefusedError, or another TokenError."""
        if self._subject_left(subject) <= 0:
            self._count(server, "failure")
            raise SubjectRefusedError(server, "the subject token has expired")
        key = exchange_key(settings, subject)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and entry.token is not None and now < entry.usable_until:
            self._entries.move_to_end(key)
            if now >= entry.refresh_at and entry.fetch is None:
                self._start(key, entry, settings, server, subject, actor)  # ahead, not awaited
            self._count(server, "hit")
            return entry.token
        self._count(server, "miss")
        if entry is None:
            entry = self._entries[key] = _Entry(server)
            self._bound()
        if entry.fetch is None and entry.last_error is not None and now < entry.retry_at:
            # The IdP failed just now: each of this user's requests would ask it again.
            self._count(server, "failure")
            raise entry.last_error
        task = entry.fetch or self._start(key, entry, settings, server, subject, actor)
        try:
            await asyncio.wait_for(asyncio.shield(task), budget_s)
        except TimeoutError:
            self._count(server, "failure")
            raise TokenError(server, f"token exchange did not finish within {budget_s:.3f}s"
                             ) from None
        except TokenError:
            self._count(server, "failure")
            raise
        if entry.token is None or self._clock() >= entry.usable_until:
            self._count(server, "failure")
            raise entry.last_error or TokenResponseError(server, "no usable token issued")
        return entry.token

    def held(self) -> dict[str, int]:
        """How many users' tokens are held, by server (usable now): never who."""
        now, counts = self._clock(), dict[str, int]()
        for entry in self._entries.values():
            if entry.token is not None and now < entry.usable_until:
                counts[entry.server] = counts.get(entry.server, 0) + 1
        return counts

    def evict(self, settings: TokenExchangeSettings, subject: Subject) -> bool:
        """Forget a subject's token (the upstream refused it): the next request exchanges."""
        return self.evict_key(exchange_key(settings, subject))

    def evict_key(self, key: str) -> bool:
        """Forget the token of this cache key (exchange_key's), if held."""
        return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        """Forget every token (a reload whose settings changed makes new keys anyway)."""
        self._entries.clear()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._client.aclose()

    # -- internals ----------------------------------------------------------------------

    def _subject_left(self, subject: Subject) -> float:
        return subject.expires_at - self._wall()

    def _start(self, key: str, entry: _Entry, settings: TokenExchangeSettings, server: str,
               subject: Subject, actor: str | None) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(
            self._exchange(key, entry, settings, server, subject, actor))
        entry.fetch = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _exchange(self, key: str, entry: _Entry, settings: TokenExchangeSettings,
                        server: str, subject: Subject, actor: str | None) -> None:
        try:
            form, headers = build_exchange_request(settings, subject, actor)
            try:
                token, expires_in = await post_token_request(
                    self._client, settings, form, headers, server, self.settings.timeout_s)
            except TokenEndpointError as exc:
                if exc.code in _SUBJECT_REFUSALS:
                    raise SubjectRefusedError(server, f"the IdP refused the subject token:"
                                              f" {exc}") from None
                raise
            now = self._clock()
            # Never past the token's own life, nor past the subject's: an exchanged token
            # outliving the user's session would act for someone no longer signed in.
            lifetime = min(usable_lifetime(self.settings, expires_in),
                           self._subject_left(subject))
            if lifetime <= 0:
                raise SubjectRefusedError(server, "the subject token expired during the"
                                                  " exchange")
            if self._entries.get(key) is entry:  # not evicted meanwhile
                entry.token = token
                entry.usable_until = now + lifetime
                entry.refresh_at = now + lifetime * REFRESH_AT_FRACTION
                entry.last_error, entry.failures = None, 0
        except SubjectRefusedError as exc:
            entry.last_error, entry.retry_at = exc, 0.0  # a new subject token may do
            raise
        except TokenError as exc:
            entry.last_error = exc
            entry.failures += 1
            entry.retry_at = self._clock() + backoff(self.settings, entry.failures)
            raise
        finally:
            entry.fetch = None

    def _bound(self) -> None:
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def _count(self, server: str, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(server, outcome)
