"""OAuth2 client-credentials tokens (RFC 6749 4.4): fetch once, cache, refresh ahead.

One shared httpx.AsyncClient (the token endpoint's wire is token_requests.py); one entry
per credential (token URL, client id, secret hash, auth method, scopes, audience,
resource); at most one fetch in flight per entry however many checks are waiting (single
flight). Once a token is held, timers refresh it past 80% of its lifetime and retry
failures with jittered exponential backoff, so a check on a warm entry never waits on the
network.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from .errors import (
    CredentialsRefusedError,
    TokenDeadlineError,
    TokenEndpointError,
    TokenError,
    TokenResponseError,
)
from .policy.config import OAuth2Settings, TokenSettings
from .token_requests import build_token_request, post_token_request

log = logging.getLogger(__name__)

REFRESH_AT_FRACTION = 0.8
SHORT_TOKEN_USE = 0.5  # the least of a token's life used, however large expiry_buffer_s
FetchObserver = Callable[[str, str, float], None]
"""Called after each fetch with (server, outcome, seconds); outcome is `ok` or an error class."""
ChangeObserver = Callable[[], None]
"""Called when a usable token is replaced, or stops being usable without a successor."""


@dataclass(slots=True)
class _Entry:
    """The cached state of one credential."""

    settings: OAuth2Settings
    server: str
    token: str | None = None
    fetched_at: float = 0.0
    usable_until: float = 0.0
    refresh_at: float = 0.0
    failures: int = 0
    last_error: TokenError | None = None
    retry_at: float = 0.0
    fetch: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    expiry: asyncio.TimerHandle | None = None  # when the token stops being usable
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    noted: bool = False  # the cadence note (a short token) was logged
    said: str = ""  # the last failure logged: the same one again is not (once per change)


def usable_lifetime(settings: TokenSettings, expires_in: float | None) -> float:
    """How long a token is used, given its endpoint's expires_in: `default_ttl_s` when it
    says none; never past expires_in."""
    if expires_in is None:
        return settings.default_ttl_s
    # A token no longer than the buffer is still used for half its life: the buffer alone
    # would leave it min_ttl_s (a 60 s token fetched every 8 s), or nothing.
    buffered = max(expires_in - settings.expiry_buffer_s, settings.min_ttl_s,
                   expires_in * SHORT_TOKEN_USE)
    return min(buffered, expires_in)


def backoff(settings: TokenSettings, failures: int) -> float:
    """The wait after this many failures in a row: `retry_initial_s` doubling, at most
    `retry_max_s`."""
    return min(settings.retry_max_s, settings.retry_initial_s * 2.0 ** (failures - 1))


class TokenCache:
    """Client-credentials tokens per credential, fetched once and refreshed ahead of expiry."""

    def __init__(
        self,
        settings: TokenSettings,
        *,
        client: httpx.AsyncClient | None = None,
        on_fetch: FetchObserver | None = None,
        on_change: ChangeObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            follow_redirects=False,
        )
        self._on_fetch = on_fetch
        self.on_change = on_change
        self._clock = clock
        self._entries: dict[tuple[str, ...], _Entry] = {}
        self._closed = False

    # -- the hot path -------------------------------------------------------------------

    def cached(self, settings: OAuth2Settings) -> str | None:
        """Return a usable cached token without waiting, or None."""
        entry = self._entries.get(settings.cache_key)
        if entry is not None and entry.token is not None and self._clock() < entry.usable_until:
            return entry.token
        return None

    async def token(self, settings: OAuth2Settings, server: str, budget_s: float) -> str:
        """Return a usable token, waiting at most `budget_s` seconds for a fetch.

        Raises TokenError: the endpoint's last failure while it backs off, the failure of
        the fetch this call waited on, or TokenDeadlineError when `budget_s` ran out.
        """
        token = self.cached(settings)
        if token is not None:
            return token
        entry = self._entry(settings, server)
        task = self._start_fetch(entry)
        if task is None:
            assert entry.last_error is not None
            raise entry.last_error
        if budget_s <= 0:
            raise TokenDeadlineError(server, "no time left in the check's deadline for a fetch")
        try:
            await asyncio.wait_for(asyncio.shield(task), budget_s)
        except TimeoutError:
            raise TokenDeadlineError(
                server, f"token fetch did not finish within the check's {budget_s:.3f}s"
            ) from None
        token = self.cached(settings)
        if token is None:  # fetched, but with a lifetime already over (clock jump)
            raise TokenResponseError(server, "token endpoint issued an already expired token")
        return token

    # -- lifecycle ----------------------------------------------------------------------

    def retain(self, credentials: Mapping[str, OAuth2Settings]) -> None:
        """Keep (and warm) exactly these server credentials; forget every other entry.

        Entries whose credential is unchanged keep their token, so a reload does not refetch.
        """
        wanted: dict[tuple[str, ...], tuple[str, OAuth2Settings]] = {}
        for server, settings in sorted(credentials.items()):
            wanted.setdefault(settings.cache_key, (server, settings))
        for key in list(self._entries):
            if key not in wanted:
                self._drop(self._entries.pop(key))
                self._changed()
        for server, settings in wanted.values():
            entry = self._entry(settings, server)
            if entry.token is None and entry.fetch is None and entry.timer is None:
                self._start_fetch(entry)

    def unready(self) -> dict[str, str]:
        """Name each retained server without a usable token, with the reason."""
        now = self._clock()
        missing = {}
        for entry in self._entries.values():
            if entry.token is None or now >= entry.usable_until:
                reason = str(entry.last_error) if entry.last_error else "token fetch in progress"
                missing[entry.server] = reason
        return missing

    def states(self) -> dict[str, dict[str, Any]]:
        """Each retained server's token as an operator sees it, never the token: `warm`
        (held, with its age and the seconds it stays usable), `fetching` (none held yet, a
        fetch in flight), `refreshing` (held, a fetch in flight) or `failing` (none usable:
        the last failure's words), and the last failure while one is held."""
        now = self._clock()
        states = {}
        for entry in self._entries.values():
            usable = entry.token is not None and now < entry.usable_until
            if usable:
                state = "refreshing" if entry.fetch is not None else "warm"
            else:
                state = "failing" if entry.last_error is not None else "fetching"
            found: dict[str, Any] = {"state": state}
            if usable:
                found["age_s"] = round(now - entry.fetched_at, 1)
                found["usable_for_s"] = round(entry.usable_until - now, 1)
            if entry.last_error is not None:
                found["error"] = str(entry.last_error)
                found["failures"] = entry.failures
            states[entry.server] = found
        return states

    def ages(self) -> dict[str, float]:
        """Seconds since each server's token was fetched (servers holding a token)."""
        now = self._clock()
        return {e.server: now - e.fetched_at for e in self._entries.values() if e.token}

    async def wait_ready(self) -> None:
        """Return once every retained entry holds a usable token."""
        while self.unready():
            waiter = asyncio.get_running_loop().create_future()
            for entry in self._entries.values():
                entry.waiters.append(waiter)
            await waiter

    async def fetch_now(self, settings: OAuth2Settings, server: str
                        ) -> tuple[str, float, str]:
        """Fetch a token bypassing the cache (for `check --fetch-token`): (token, lifetime,
        the cadence note)."""
        token, expires_in = await self._request(settings, server)
        return (token, usable_lifetime(self.settings, expires_in),
                self.cadence_note(server, expires_in))

    async def aclose(self) -> None:
        """Cancel timers and fetches and close the HTTP client."""
        self._closed = True
        for entry in self._entries.values():
            self._drop(entry, cancel_fetch=True)
        self._entries.clear()
        await self._client.aclose()

    # -- internals ----------------------------------------------------------------------

    def _entry(self, settings: OAuth2Settings, server: str) -> _Entry:
        entry = self._entries.get(settings.cache_key)
        if entry is None:
            entry = self._entries[settings.cache_key] = _Entry(settings, server)
        return entry

    def _drop(self, entry: _Entry, *, cancel_fetch: bool = False) -> None:
        # A fetch in flight is left to finish for the checks waiting on it; it no longer
        # schedules anything once its entry is gone.
        if entry.timer is not None:
            entry.timer.cancel()
        if entry.expiry is not None:
            entry.expiry.cancel()
        if cancel_fetch and entry.fetch is not None:
            entry.fetch.cancel()
        for waiter in entry.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _start_fetch(self, entry: _Entry) -> asyncio.Task[None] | None:
        """Return the fetch in flight for this entry, or start one; None while backing off."""
        if entry.fetch is not None:
            return entry.fetch
        if self._closed or (entry.last_error is not None and self._clock() < entry.retry_at):
            return None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        task = asyncio.get_running_loop().create_task(self._fetch(entry))
        entry.fetch = task
        # The outcome is recorded on the entry; waiters read it from there or re-raise it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _schedule(self, entry: _Entry, at: float) -> None:
        if self._closed or self._entries.get(entry.settings.cache_key) is not entry:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        self._arm(entry, "timer", at, self._on_timer)

    def _arm(self, entry: _Entry, slot: Literal["timer", "expiry"], at: float,
             callback: Callable[[_Entry], None], slack: float = 0.0) -> None:
        """Call back once our clock has reached `at`, the handle kept in `entry.<slot>`.

        asyncio runs a timer up to its clock resolution early; fired before `at` by our
        clock, it is armed again. (A retry that fired early met a backoff not yet over and
        was lost; only a check asking for the token started fetching again.)
        """
        def fire() -> None:
            if self._clock() < at:
                self._arm(entry, slot, at, callback, slack=0.001)
                return
            setattr(entry, slot, None)
            callback(entry)

        delay = max(0.0, at - self._clock()) + slack
        setattr(entry, slot, asyncio.get_running_loop().call_later(delay, fire))

    def _on_timer(self, entry: _Entry) -> None:
        if self._entries.get(entry.settings.cache_key) is entry:
            self._start_fetch(entry)

    def _on_expiry(self, entry: _Entry) -> None:
        # At usable_until: a fresh token since would have armed it again.
        if self._entries.get(entry.settings.cache_key) is entry:
            log.warning("server %r: its token expired with no successor (%s): its requests"
                        " answer 503 until a fetch succeeds", entry.server,
                        entry.last_error or "no fetch finished in time")
            entry.said = entry.said or "expired"
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None and not self._closed:
            self.on_change()

    def cadence_note(self, server: str, expires_in: float | None) -> str:
        """What to say of a token endpoint's expires_in against tokens.expiry_buffer_s
        ("" when it is longer)."""
        if expires_in is None or expires_in > self.settings.expiry_buffer_s:
            return ""
        lifetime = usable_lifetime(self.settings, expires_in)
        return (f"server {server!r}: the token endpoint's expires_in ({expires_in:g} s) is not"
                f" longer than tokens.expiry_buffer_s ({self.settings.expiry_buffer_s:g} s):"
                f" each token is used for {lifetime:g} s and refreshed after"
                f" {lifetime * REFRESH_AT_FRACTION:g} s (lower expiry_buffer_s to use more"
                " of it)")

    def _backoff(self, failures: int) -> float:
        # Jittered: credentials that fail together retry apart.
        ceiling = backoff(self.settings, failures)
        return random.uniform(ceiling / 2, ceiling)

    async def _fetch(self, entry: _Entry) -> None:
        started = self._clock()
        try:
            token, expires_in = await self._request(entry.settings, entry.server)
        except Exception as exc:
            if isinstance(exc, TokenError):
                error = exc
            else:
                log.exception("unexpected error fetching a token for server %r", entry.server)
                error = TokenEndpointError(entry.server, f"unexpected {type(exc).__name__}")
            entry.failures += 1
            entry.last_error = error
            # Refused credentials stay refused until someone changes them: no quick retries.
            entry.retry_at = self._clock() + (
                self.settings.retry_max_s if isinstance(error, CredentialsRefusedError)
                else self._backoff(entry.failures))
            if str(error) != entry.said:  # once per change, not once per retry
                entry.said = str(error)
                pace = (f"every {self.settings.retry_max_s:g} s"
                        if isinstance(error, CredentialsRefusedError)
                        else f"backing off up to {self.settings.retry_max_s:g} s")
                log.warning("token fetch failed: %s; retrying %s (said again when the failure"
                            " changes)", error, pace)
            else:
                log.debug("token fetch failed again: %s", error)
            self._observe(entry.server, type(error).__name__, started)
            self._schedule(entry, entry.retry_at)
            raise error from None
        finally:
            entry.fetch = None
        now = self._clock()
        lifetime = usable_lifetime(self.settings, expires_in)
        note = self.cadence_note(entry.server, expires_in)
        if note and not entry.noted:
            entry.noted = True  # said once per credential (at start: the first fetch)
            log.warning("%s", note)
        if entry.said:
            log.warning("server %r: token fetched again after %d failed fetch(es): its"
                        " requests are served", entry.server, entry.failures)
            entry.said = ""
        entry.token = token
        entry.fetched_at = now
        entry.usable_until = now + lifetime
        entry.refresh_at = now + lifetime * REFRESH_AT_FRACTION
        entry.failures = 0
        entry.last_error = None
        self._observe(entry.server, "ok", started)
        self._schedule(entry, entry.refresh_at)
        if entry.expiry is not None:
            entry.expiry.cancel()
        self._arm(entry, "expiry", entry.usable_until, self._on_expiry)
        self._changed()
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _observe(self, server: str, outcome: str, started: float) -> None:
        if self._on_fetch is not None:
            self._on_fetch(server, outcome, self._clock() - started)

    async def _request(self, settings: OAuth2Settings, server: str) -> tuple[str, float | None]:
        form, headers = build_token_request(settings)
        return await post_token_request(self._client, settings, form, headers, server,
                                        self.settings.timeout_s)
