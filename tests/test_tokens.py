"""The client-credentials token cache against a real token endpoint on loopback."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
from typing import Any

import pytest

from ext_authz.errors import (
    CredentialsRefusedError,
    TokenDeadlineError,
    TokenEndpointError,
    TokenResponseError,
)
from ext_authz.policy.config import OAuth2Settings, TokenSettings
from ext_authz.token_requests import build_token_request, parse_token_response
from ext_authz.tokens import TokenCache
from tests.token_endpoint import TokenEndpoint

SECRET = "s3cr3t:with spaces&symbols+/"


async def eventually(condition: Any, within_s: float = 5.0) -> None:
    """Wait until condition() is true (timers and fetches run on their own schedule)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def oauth2(url: str, **kw: Any) -> OAuth2Settings:
    fields: dict[str, Any] = {"token_url": url, "client_id": "gateway id", "client_secret": SECRET}
    fields.update(kw)
    return OAuth2Settings.model_validate(fields)


def fast_settings(**kw: Any) -> TokenSettings:
    fields: dict[str, Any] = {"timeout_s": 2, "retry_initial_s": 0.2, "retry_max_s": 0.4}
    fields.update(kw)
    return TokenSettings.model_validate(fields)


@pytest.fixture
async def cache() -> Any:
    tokens = TokenCache(fast_settings())
    yield tokens
    await tokens.aclose()


class TestWireFormat:
    async def test_basic_auth_form_encodes_id_and_secret(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """client_secret_basic form-urlencodes id and secret before base64 (RFC 6749 2.3.1)."""
        settings = oauth2(token_endpoint.url, scopes=["a.read", "b"], audience="api://x",
                          resource="https://mcp.example/")
        await cache.token(settings, "pub", 2)
        request = token_endpoint.requests[0]
        raw = base64.b64decode(request.headers["authorization"][6:]).decode()
        assert raw == "gateway+id:s3cr3t%3Awith+spaces%26symbols%2B%2F"
        assert (request.client_id, request.client_secret) == ("gateway id", SECRET)
        assert request.form == {"grant_type": "client_credentials", "scope": "a.read b",
                                "audience": "api://x", "resource": "https://mcp.example/"}
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"

    async def test_post_sends_credentials_in_body(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """client_secret_post puts id and secret in the form and sends no Authorization."""
        await cache.token(oauth2(token_endpoint.url, auth_method="client_secret_post"), "pub", 2)
        request = token_endpoint.requests[0]
        assert "authorization" not in request.headers
        assert request.form == {"grant_type": "client_credentials",
                                "client_id": "gateway id", "client_secret": SECRET}


class TestSingleFlight:
    async def test_500_concurrent_cold_checks_make_one_request(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """N concurrent misses share one fetch."""
        token_endpoint.delay_s = 0.2
        settings = oauth2(token_endpoint.url)
        tokens = await asyncio.gather(*(cache.token(settings, "pub", 5) for _ in range(500)))
        assert token_endpoint.count == 1
        assert set(tokens) == {token_endpoint.issued[0]}

    async def test_distinct_credentials_fetch_separately(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """Different client ids (or scopes) are different cache keys."""
        a = await cache.token(oauth2(token_endpoint.url, client_id="a"), "a", 2)
        b = await cache.token(oauth2(token_endpoint.url, client_id="b"), "b", 2)
        c = await cache.token(oauth2(token_endpoint.url, client_id="a", scopes=["x"]), "c", 2)
        assert len({a, b, c}) == 3
        assert token_endpoint.count == 3

    async def test_rotated_secret_gets_new_token(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """A changed secret is a new key: the old token is not reused."""
        first = await cache.token(oauth2(token_endpoint.url), "pub", 2)
        again = await cache.token(oauth2(token_endpoint.url), "pub", 2)
        rotated = await cache.token(oauth2(token_endpoint.url, client_secret="new"), "pub", 2)
        assert first == again != rotated
        assert token_endpoint.requests[-1].client_secret == "new"


class TestLifetime:
    @pytest.mark.parametrize(
        ("expires_in", "expected"),
        [(3600, 3540.0), ("3600", 3540.0), (30, 15.0), (60, 30.0), (100, 50.0), (5, 5.0),
         (10**9, 10**9 - 60.0), (None, 300.0)],
    )
    async def test_lifetime(
        self, token_endpoint: TokenEndpoint, cache: TokenCache, expires_in: Any, expected: float
    ) -> None:
        """max(expires_in - buffer, min_ttl, half of expires_in), never past expires_in;
        default_ttl if absent. (A 60 s token under the 60 s buffer is used for 30 s, not
        fetched every 8 s.)"""
        token_endpoint.expires_in = expires_in
        token_endpoint.omit_expires_in = expires_in is None
        settings = oauth2(token_endpoint.url)
        before = time.monotonic()
        await cache.token(settings, "pub", 2)
        entry = cache._entries[settings.cache_key]
        assert entry.usable_until - before == pytest.approx(expected, abs=1.0)
        assert entry.refresh_at - before == pytest.approx(expected * 0.8, abs=1.0)

    async def test_a_short_token_is_said_once(
            self, token_endpoint: TokenEndpoint, cache: TokenCache,
            caplog: pytest.LogCaptureFixture) -> None:
        """expires_in no longer than expiry_buffer_s: one warning per credential saying what
        the sidecar does with it."""
        token_endpoint.expires_in = 60
        settings = oauth2(token_endpoint.url)
        with caplog.at_level(logging.WARNING):
            await cache.token(settings, "pub", 2)
            await cache.fetch_now(settings, "pub")
        said = [r.message for r in caplog.records if "expires_in" in r.message]
        assert said == ["server 'pub': the token endpoint's expires_in (60 s) is not longer than"
                        " tokens.expiry_buffer_s (60 s): each token is used for 30 s and"
                        " refreshed after 24 s (lower expiry_buffer_s to use more of it)"]
        assert (await cache.fetch_now(settings, "pub"))[2] == said[0]

    @pytest.mark.parametrize("expires_in", [0, -5, "soon", True, [1]])
    async def test_unusable_expires_in_is_an_error(
        self, token_endpoint: TokenEndpoint, cache: TokenCache, expires_in: Any
    ) -> None:
        """An expires_in that is zero, negative or not a number is a bad reply."""
        token_endpoint.expires_in = expires_in
        with pytest.raises(TokenResponseError, match="expires_in"):
            await cache.token(oauth2(token_endpoint.url), "pub", 2)

    async def test_refresh_ahead_never_blocks_a_warm_key(
        self, token_endpoint: TokenEndpoint
    ) -> None:
        """Past 80% of the lifetime a refresh runs in the background; checks answer at once."""
        cache = TokenCache(fast_settings(expiry_buffer_s=0, min_ttl_s=0.5))
        try:
            token_endpoint.expires_in = 1.5
            settings = oauth2(token_endpoint.url)
            first = await cache.token(settings, "pub", 2)
            token_endpoint.delay_s = 2.0
            # Past 80% of 1.5 s the refresh starts; the endpoint holds it for 2 s.
            await eventually(lambda: token_endpoint.count == 2)
            started = time.monotonic()
            for _ in range(20):
                assert await cache.token(settings, "pub", 5) == first
            assert time.monotonic() - started < 0.2  # bounded by 2 s delay otherwise
        finally:
            await cache.aclose()

    async def test_expired_token_is_never_returned(self, token_endpoint: TokenEndpoint) -> None:
        """Once a token's lifetime is over and refreshes fail, checks get an error."""
        cache = TokenCache(fast_settings(expiry_buffer_s=0, min_ttl_s=0.3, timeout_s=0.3))
        try:
            token_endpoint.expires_in = 3
            settings = oauth2(token_endpoint.url)
            first = await cache.token(settings, "pub", 2)
            fetched = time.monotonic()
            token_endpoint.mode, token_endpoint.status = "status", 500
            await eventually(lambda: token_endpoint.count >= 2)  # the refresh at 2.4 s failed
            assert time.monotonic() < fetched + 2.9
            assert await cache.token(settings, "pub", 1) == first  # still valid, refresh failed
            await asyncio.sleep(fetched + 3.2 - time.monotonic())
            with pytest.raises(TokenEndpointError, match="HTTP 500"):
                await cache.token(settings, "pub", 1)
        finally:
            await cache.aclose()


FAULTS = [
    ("status", {"status": 500}, TokenEndpointError, "HTTP 500"),
    ("status", {"status": 400}, TokenEndpointError, "HTTP 400 \\(invalid_client\\)"),
    ("status", {"status": 401}, TokenEndpointError, "HTTP 401"),
    ("garbage", {}, TokenResponseError, "not JSON"),
    ("list", {}, TokenResponseError, "not an object"),
    ("no_token", {}, TokenResponseError, "without an access_token"),
    ("wrong_type", {}, TokenResponseError, "token_type 'mac'"),
    ("huge", {}, TokenResponseError, "over 65536 bytes"),
    ("close", {}, TokenEndpointError, "RemoteProtocolError"),
    ("html", {}, TokenResponseError, "not JSON"),
    ("unsafe_token", {}, TokenResponseError, "unsafe in a header"),
    ("ok", {"expires_in": 0}, TokenResponseError, "expires_in is not positive"),
    ("ok", {"expires_in": "soon"}, TokenResponseError, "expires_in is not a number"),
]


@pytest.mark.parametrize("token", ["abc\n", "abc\r\n", "a\nb", "abc def", "", "t\u00e9"])
def test_a_token_unsafe_in_a_header_is_refused(token: str) -> None:
    """Only visible ASCII, whole: a trailing newline (which a `$` would let through) could
    end the Authorization header and start another."""
    body = json.dumps({"access_token": token, "token_type": "Bearer"}).encode()
    with pytest.raises(TokenResponseError):
        parse_token_response("github", 200, body)


class TestFaults:
    @pytest.mark.parametrize(("mode", "extra", "error", "message"), FAULTS)
    async def test_fault_then_recovery(
        self, token_endpoint: TokenEndpoint, mode: str, extra: dict[str, Any],
        error: type[Exception], message: str,
    ) -> None:
        """Each misbehaviour is a clear error naming the server; a healthy endpoint recovers."""
        cache = TokenCache(fast_settings())
        try:
            token_endpoint.mode = mode
            for key, value in extra.items():
                setattr(token_endpoint, key, value)
            settings = oauth2(token_endpoint.url)
            with pytest.raises(error, match=message) as raised:
                await cache.token(settings, "github", 2)
            assert "server 'github'" in str(raised.value)
            assert SECRET not in str(raised.value)
            assert all(t not in str(raised.value) for t in token_endpoint.issued)
            # While backing off, checks fail fast without hammering the endpoint.
            count = token_endpoint.count
            with pytest.raises(error):
                await cache.token(settings, "github", 2)
            assert token_endpoint.count == count
            token_endpoint.healthy()
            # Within a backoff period (0.2-0.4 s) the timer retries; no check has to ask.
            await eventually(lambda: cache.cached(settings) is not None, within_s=2)
            assert await cache.token(settings, "github", 0.01) == token_endpoint.issued[-1]
        finally:
            await cache.aclose()

    async def test_slow_endpoint_hits_the_check_deadline(
        self, token_endpoint: TokenEndpoint, cache: TokenCache
    ) -> None:
        """A fetch longer than the check's budget fails the check, not the fetch."""
        token_endpoint.delay_s = 0.5
        settings = oauth2(token_endpoint.url)
        with pytest.raises(TokenDeadlineError):
            await cache.token(settings, "pub", 0.1)
        await eventually(lambda: cache.cached(settings) is not None)
        assert cache.cached(settings) == token_endpoint.issued[0]
        assert token_endpoint.count == 1

    async def test_hanging_endpoint_times_out(self, token_endpoint: TokenEndpoint) -> None:
        """tokens.timeout_s bounds the whole fetch, a slow drip included."""
        cache = TokenCache(fast_settings(timeout_s=0.3))
        try:
            token_endpoint.mode = "drip"
            with pytest.raises(TokenEndpointError, match=r"did not answer within 0\.3s"):
                await cache.token(oauth2(token_endpoint.url), "pub", 5)
        finally:
            await cache.aclose()

    async def test_refused_connection(self, cache: TokenCache) -> None:
        """Nothing listening: a ConnectError, named."""
        with pytest.raises(TokenEndpointError, match="ConnectError"):
            await cache.token(oauth2("http://127.0.0.1:9/token"), "pub", 2)


class TestLifecycle:
    async def test_retain_warms_and_wait_ready(self, token_endpoint: TokenEndpoint) -> None:
        """retain() fetches every credential; wait_ready returns once all are warm."""
        cache = TokenCache(fast_settings())
        try:
            cache.retain({"a": oauth2(token_endpoint.url, client_id="a"),
                          "b": oauth2(token_endpoint.url, client_id="b")})
            await asyncio.wait_for(cache.wait_ready(), 5)
            assert cache.unready() == {}
            assert token_endpoint.count == 2
            # Unchanged credentials survive a retain; dropped ones are forgotten.
            cache.retain({"a": oauth2(token_endpoint.url, client_id="a")})
            assert token_endpoint.count == 2
            assert set(cache.ages()) == {"a"}
        finally:
            await cache.aclose()

    async def test_unready_names_the_failing_server(self, token_endpoint: TokenEndpoint) -> None:
        """A server whose fetch fails is reported with its error until it recovers."""
        cache = TokenCache(fast_settings())
        try:
            token_endpoint.mode, token_endpoint.status = "status", 503
            cache.retain({"github": oauth2(token_endpoint.url)})
            await eventually(lambda: "HTTP 503" in cache.unready()["github"])
            token_endpoint.healthy()
            await asyncio.wait_for(cache.wait_ready(), 5)
        finally:
            await cache.aclose()


class TestParse:
    def test_message_never_quotes_the_body(self) -> None:
        """A body holding a token-like string is described, never echoed."""
        body = b'{"access_token": "SECRET-TOKEN", "token_type": "MAC"}'
        with pytest.raises(TokenResponseError) as raised:
            parse_token_response("x", 200, body)
        assert "SECRET-TOKEN" not in str(raised.value)

    def test_missing_token_type_is_bearer(self) -> None:
        """token_type may be omitted; other casings of Bearer are accepted."""
        assert parse_token_response("x", 200, b'{"access_token": "t"}') == ("t", None)
        assert parse_token_response("x", 200, b'{"access_token":"t","token_type":"BEARER"}')[0]

    def test_request_shape(self) -> None:
        """No scope, audience or resource parameters unless configured."""
        form, headers = build_token_request(oauth2("https://idp/token"))
        assert form == {"grant_type": "client_credentials"}
        assert headers["authorization"].startswith("Basic ")


class TestChanges:
    """What the native data path's control plane is told (ControlPlane.changed)."""

    async def test_a_retry_is_not_lost_when_a_timer_fires_early(
        self, token_endpoint: TokenEndpoint
    ) -> None:
        """asyncio may run a timer before our clock reaches its time; the retry still happens,
        with no check asking (in the native data path none ever does)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        # A clock a little slower than the loop's: every timer fires "early" by it.
        cache = TokenCache(fast_settings(), clock=lambda: start + (loop.time() - start) * 0.98)
        try:
            token_endpoint.mode, token_endpoint.status = "status", 503
            settings = oauth2(token_endpoint.url)
            cache.retain({"github": settings})
            await eventually(lambda: token_endpoint.count >= 1)
            token_endpoint.healthy()
            await eventually(lambda: cache.cached(settings) is not None, within_s=3)
        finally:
            await cache.aclose()

    async def test_told_of_each_new_token_and_of_each_expiry(
        self, token_endpoint: TokenEndpoint
    ) -> None:
        """A fetched token, and a token whose lifetime ends without a successor, each call
        on_change; a failed fetch changes nothing."""
        changes: list[str | None] = []
        settings = oauth2(token_endpoint.url)
        cache = TokenCache(fast_settings(expiry_buffer_s=0, min_ttl_s=0.1, retry_initial_s=5,
                                         retry_max_s=5))
        cache.on_change = lambda: changes.append(cache.cached(settings))
        try:
            token_endpoint.expires_in = 0.5
            cache.retain({"github": settings})
            await eventually(lambda: len(changes) == 1)
            assert changes == [token_endpoint.issued[0]]
            # The refresh at 80% fails: the token is served to its end, then withdrawn.
            token_endpoint.mode, token_endpoint.status = "status", 500
            await eventually(lambda: len(changes) == 2, within_s=3)
            assert changes == [token_endpoint.issued[0], None]
            assert cache.cached(settings) is None
        finally:
            await cache.aclose()


class TestWhatTheOperatorIsTold:
    """Each change in a credential's state said once: a refusal, a recovery, an expiry."""

    async def test_refused_credentials_are_said_once_and_not_retried_quickly(
            self, token_endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture) -> None:
        token_endpoint.mode, token_endpoint.status = "status", 401
        settings = oauth2(token_endpoint.url)
        # A server error would be retried after 0.05-0.1 s; a refusal waits retry_max_s.
        cache = TokenCache(fast_settings(retry_initial_s=0.1, retry_max_s=0.6))
        try:
            with caplog.at_level(logging.DEBUG, logger="ext_authz.tokens"):
                cache.retain({"crm": settings})
                await eventually(lambda: token_endpoint.count >= 3, within_s=5)
                with pytest.raises(CredentialsRefusedError, match="credentials refused"):
                    await cache.token(settings, "crm", 1)
                warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
                assert len(warned) == 1, warned
                assert "server 'crm': credentials refused: token endpoint" in warned[0]
                assert "retrying every 0.6 s" in warned[0]
                assert SECRET not in caplog.text
                times = [r.created for r in caplog.records if "failed" in r.message]
                assert min(b - a for a, b in itertools.pairwise(times)) >= 0.55
                # Recovered: said once.
                token_endpoint.healthy()
                await eventually(lambda: cache.cached(settings) is not None, within_s=3)
            [recovered] = [r.message for r in caplog.records if "fetched again" in r.message]
            assert recovered.startswith("server 'crm': token fetched again after")
            assert recovered.endswith("failed fetch(es): its requests are served")
        finally:
            await cache.aclose()

    async def test_a_changed_failure_is_said_again(
            self, token_endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture) -> None:
        token_endpoint.mode, token_endpoint.status = "status", 503
        settings = oauth2(token_endpoint.url)
        cache = TokenCache(fast_settings(retry_initial_s=0.05, retry_max_s=0.1))
        try:
            with caplog.at_level(logging.WARNING, logger="ext_authz.tokens"):
                cache.retain({"crm": settings})
                await eventually(lambda: token_endpoint.count >= 3)
                token_endpoint.status = 401
                count = token_endpoint.count
                await eventually(lambda: token_endpoint.count >= count + 2)
            said = [r.message for r in caplog.records]
            assert len(said) == 2, said
            assert "HTTP 503" in said[0]
            assert "credentials refused" in said[1]
            assert "HTTP 401" in said[1]
        finally:
            await cache.aclose()

    async def test_an_expiry_without_a_successor_is_said(
            self, token_endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture) -> None:
        settings = oauth2(token_endpoint.url)
        cache = TokenCache(fast_settings(expiry_buffer_s=0, min_ttl_s=0.1, retry_initial_s=5,
                                         retry_max_s=5))
        try:
            token_endpoint.expires_in = 0.4
            with caplog.at_level(logging.WARNING, logger="ext_authz.tokens"):
                cache.retain({"crm": settings})
                await eventually(lambda: cache.cached(settings) is not None)
                token_endpoint.mode, token_endpoint.status = "status", 500
                await eventually(lambda: "expired with no successor" in caplog.text, 3)
            [expired] = [r.message for r in caplog.records if "expired" in r.message]
            assert expired.startswith("server 'crm': its token expired with no successor"
                                      " (server 'crm': token endpoint")
            assert expired.endswith("its requests answer 503 until a fetch succeeds")
        finally:
            await cache.aclose()
