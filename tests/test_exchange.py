"""RFC 8693 token exchange, cached per subject, against a real token endpoint on loopback
(tests/token_endpoint.py answers the token-exchange grant): the request, the cache key, the
lifetime bound by both `exp`s, single flight, refresh ahead, LRU, eviction, and whose fault
a failure is."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.errors import SubjectRefusedError, TokenEndpointError, TokenError
from ext_authz.exchange import GRANT_TYPE, ExchangeCache, build_exchange_request
from ext_authz.policy.config import TokenExchangeSettings, TokenSettings
from ext_authz.policy.subject import Subject, exchange_key
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

SECRET = "exchange-client-secret"


def jwt(sub: str, exp: float, iss: str = "https://idp.example") -> str:
    """A JWT's shape (the IdP here reads its claims; Envoy checked its signature)."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part({'iss': iss, 'sub': sub, 'exp': exp})}.sig"


def subject(sub: str = "alice", lasts: float = 3600, iss: str = "https://idp.example"
            ) -> Subject:
    exp = time.time() + lasts
    return Subject(jwt(sub, exp, iss), iss, sub, exp)


def exchange(url: str, **kw: Any) -> TokenExchangeSettings:
    fields: dict[str, Any] = {"token_url": url, "client_id": "gateway", "client_secret": SECRET,
                              "audience": "https://crm.example"}
    fields.update(kw)
    return TokenExchangeSettings.model_validate(fields)


TOKENS = TokenSettings.model_validate({"timeout_s": 2, "expiry_buffer_s": 0, "min_ttl_s": 0.1})


@pytest.fixture
async def cache() -> AsyncIterator[ExchangeCache]:
    tokens = ExchangeCache(TOKENS)
    yield tokens
    await tokens.aclose()


class TestTheRequest:
    def test_rfc_8693_fields(self) -> None:
        settings = exchange("https://idp/token", resource="https://crm/mcp",
                            scopes=["crm.read", "crm.write"], auth_method="client_secret_post")
        who = subject()
        form, headers = build_exchange_request(settings, who, actor="gateway-token")
        assert form == {
            "grant_type": GRANT_TYPE, "subject_token": who.token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "audience": "https://crm.example", "resource": "https://crm/mcp",
            "scope": "crm.read crm.write", "actor_token": "gateway-token",
            "actor_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "client_id": "gateway", "client_secret": SECRET}
        assert "authorization" not in headers

    def test_the_subject_is_never_in_repr(self) -> None:
        who = subject()
        assert who.token not in repr(who)


class TestTheCache:
    async def test_two_users_two_tokens_each_exchanged_once(
            self, cache: ExchangeCache, token_endpoint: TokenEndpoint) -> None:
        settings = exchange(token_endpoint.url)
        alice, bob = subject("alice"), subject("bob")
        first = [await cache.token(settings, "crm", who, 2) for who in (alice, bob)]
        again = [await cache.token(settings, "crm", who, 2) for who in (alice, bob)]
        assert first == again
        assert first[0].startswith("tx-alice-")
        assert first[1].startswith("tx-bob-")
        assert token_endpoint.exchanges == {"alice": 1, "bob": 1}
        sent = token_endpoint.requests[0]
        assert sent.form["subject_token"] == alice.token  # the caller's, to the IdP only
        assert (sent.client_id, sent.client_secret) == ("gateway", SECRET)

    async def test_many_waiting_make_one_exchange(
            self, cache: ExchangeCache, token_endpoint: TokenEndpoint) -> None:
        token_endpoint.delay_s = 0.2
        settings, who = exchange(token_endpoint.url), subject()
        found = await asyncio.gather(*(cache.token(settings, "crm", who, 2)
                                       for _ in range(200)))
        assert len(set(found)) == 1
        assert token_endpoint.exchanges == {"alice": 1}

    async def test_an_expired_subject_is_refused_without_an_exchange(
            self, cache: ExchangeCache, token_endpoint: TokenEndpoint) -> None:
        with pytest.raises(SubjectRefusedError, match="expired"):
            await cache.token(exchange(token_endpoint.url), "crm", subject(lasts=-1), 2)
        assert token_endpoint.count == 0

    async def test_a_subject_the_idp_refuses_is_the_callers_fault(
            self, cache: ExchangeCache, token_endpoint: TokenEndpoint) -> None:
        who = Subject("not-a-jwt", "https://idp.example", "mallory", time.time() + 60)
        with pytest.raises(SubjectRefusedError, match="refused the subject token"):
            await cache.token(exchange(token_endpoint.url), "crm", who, 2)

    async def test_the_idp_down_is_not(self, cache: ExchangeCache,
                                       token_endpoint: TokenEndpoint) -> None:
        token_endpoint.mode, token_endpoint.status = "status", 503
        with pytest.raises(TokenEndpointError) as raised:
            await cache.token(exchange(token_endpoint.url), "crm", subject(), 2)
        assert not isinstance(raised.value, SubjectRefusedError)
        assert SECRET not in str(raised.value)

    async def test_an_eviction_exchanges_again(self, cache: ExchangeCache,
                                               token_endpoint: TokenEndpoint) -> None:
        settings, who = exchange(token_endpoint.url), subject()
        first = await cache.token(settings, "crm", who, 2)
        assert cache.evict(settings, who)
        second = await cache.token(settings, "crm", who, 2)
        assert first != second
        assert token_endpoint.exchanges == {"alice": 2}

    async def test_never_past_the_subjects_exp(self, cache: ExchangeCache,
                                               token_endpoint: TokenEndpoint) -> None:
        """The IdP issues an hour; the user's own token ends in 0.5 s: so does this one."""
        settings, who = exchange(token_endpoint.url), subject(lasts=0.5)
        first = await cache.token(settings, "crm", who, 2)
        await asyncio.sleep(0.6)
        with pytest.raises(SubjectRefusedError):
            await cache.token(settings, "crm", who, 2)
        fresh = subject()  # the user signed in again
        assert await cache.token(settings, "crm", fresh, 2) != first

    async def test_refreshed_ahead_by_a_request_with_a_valid_subject(
            self, token_endpoint: TokenEndpoint) -> None:
        token_endpoint.expires_in = 0.5
        cache = ExchangeCache(TOKENS)
        try:
            settings, who = exchange(token_endpoint.url), subject()
            first = await cache.token(settings, "crm", who, 2)
            await asyncio.sleep(0.42)  # past 80%
            assert await cache.token(settings, "crm", who, 2) == first  # served, and...
            for _ in range(50):
                if token_endpoint.exchanges["alice"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert token_endpoint.exchanges["alice"] == 2  # ...the next one fetched
            assert await cache.token(settings, "crm", who, 2) != first
        finally:
            await cache.aclose()

    async def test_bounded_least_recently_used_first(self, token_endpoint: TokenEndpoint
                                                     ) -> None:
        cache = ExchangeCache(TOKENS, max_entries=3)
        try:
            settings = exchange(token_endpoint.url)
            users = {name: subject(name) for name in ("a", "b", "c", "d")}
            for name in ("a", "b", "c"):
                await cache.token(settings, "crm", users[name], 2)
            await cache.token(settings, "crm", users["a"], 2)  # a is used again
            await cache.token(settings, "crm", users["d"], 2)  # b goes
            assert len(cache) == 3
            for name in ("a", "c", "d"):
                await cache.token(settings, "crm", users[name], 2)
            assert token_endpoint.exchanges == {"a": 1, "b": 1, "c": 1, "d": 1}
            await cache.token(settings, "crm", users["b"], 2)
            assert token_endpoint.exchanges["b"] == 2
        finally:
            await cache.aclose()

    async def test_counted_by_server_never_by_subject(self, token_endpoint: TokenEndpoint
                                                      ) -> None:
        seen: list[tuple[str, str]] = []
        cache = ExchangeCache(TOKENS, on_outcome=lambda server, what: seen.append(
            (server, what)))
        try:
            settings, who = exchange(token_endpoint.url), subject()
            await cache.token(settings, "crm", who, 2)
            await cache.token(settings, "crm", who, 2)
            with pytest.raises(TokenError):
                await cache.token(settings, "crm", subject(lasts=-1), 2)
            assert seen == [("crm", "miss"), ("crm", "hit"), ("crm", "failure")]
        finally:
            await cache.aclose()


# -- properties ---------------------------------------------------------------------------

KEY_PARTS: dict[str, Any] = {
    "token_url": st.sampled_from(["https://idp/a", "https://idp/b"]),
    "client_id": st.sampled_from(["gw", "gw2"]),
    "client_secret": st.sampled_from(["s1", "s2"]),
    "audience": st.sampled_from([None, "https://crm", "https://erp"]),
    "resource": st.sampled_from([None, "https://crm/mcp"]),
    "scopes": st.sampled_from([(), ("a",), ("a", "b")]),
    "requested_token_type": st.sampled_from([
        "urn:ietf:params:oauth:token-type:access_token",
        "urn:ietf:params:oauth:token-type:jwt"]),
    "actor_token": st.booleans(),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(KEY_PARTS), st.fixed_dictionaries(KEY_PARTS),
       st.sampled_from(["alice", "bob"]), st.sampled_from(["alice", "bob"]),
       st.sampled_from(["https://a", "https://b"]), st.sampled_from(["https://a", "https://b"]))
def test_the_key_changes_with_every_part(one: dict[str, Any], two: dict[str, Any], sub1: str,
                                         sub2: str, iss1: str, iss2: str) -> None:
    """Equal keys exactly when subject, issuer and every setting are equal; and no key holds
    the subject token or the secret."""
    first = TokenExchangeSettings.model_validate(one)
    second = TokenExchangeSettings.model_validate(two)
    who1, who2 = subject(sub1, iss=iss1), subject(sub2, iss=iss2)
    same = one == two and (sub1, iss1) == (sub2, iss2)
    assert (exchange_key(first, who1) == exchange_key(second, who2)) is same
    key = exchange_key(first, who1)
    assert who1.token not in key
    assert one["client_secret"] not in key


@pytest.fixture(scope="module")
def idp() -> Iterator[TokenEndpoint]:
    """A token endpoint on a loop of its own, for the property below (hypothesis runs each
    example in this test's own loop)."""
    with ThreadedTokenEndpoint() as endpoint:
        yield endpoint


@settings(max_examples=60, deadline=None)
@given(issued=st.floats(min_value=1, max_value=7200),
       lasts=st.floats(min_value=1, max_value=7200),
       steps=st.lists(st.floats(min_value=0, max_value=3000), min_size=1, max_size=6))
def test_never_served_past_either_exp(idp: TokenEndpoint, issued: float,
                                      lasts: float, steps: list[float]) -> None:
    """Whatever the IdP's expires_in, the subject's exp and how time passes: a token is
    served only before both its own expiry and the subject's."""
    clock = [1000.0]
    wall = [1_700_000_000.0]
    idp.expires_in = issued
    who = Subject(jwt("alice", time.time() + 7200), "https://idp.example", "alice",
                  wall[0] + lasts)

    async def run() -> None:
        cache = ExchangeCache(TOKENS, clock=lambda: clock[0], wall=lambda: wall[0])
        try:
            settings_ = exchange(idp.url)
            issued_at: dict[str, float] = {}
            for step in [0.0, *steps]:
                clock[0] += step
                wall[0] += step
                try:
                    token = await cache.token(settings_, "crm", who, 2)
                except SubjectRefusedError:
                    assert wall[0] >= who.expires_at  # refused only once it has expired
                    continue
                issued_at.setdefault(token, clock[0])
                assert wall[0] < who.expires_at  # never past the subject's exp
                assert clock[0] < issued_at[token] + issued + 1e-6  # nor past its own
                await asyncio.sleep(0)
        finally:
            await cache.aclose()

    asyncio.run(run())


async def test_the_idp_down_is_asked_again_only_after_a_backoff(
        token_endpoint: TokenEndpoint) -> None:
    """One user's requests while the IdP fails: the first asks it, the next get the same
    error at once until the backoff is over; then it is asked again and recovers."""
    cache = ExchangeCache(TokenSettings.model_validate(
        {"timeout_s": 2, "retry_initial_s": 0.3, "retry_max_s": 0.3}))
    try:
        token_endpoint.mode, token_endpoint.status = "status", 503
        settings, who = exchange(token_endpoint.url), subject()
        for _ in range(5):
            with pytest.raises(TokenEndpointError, match="HTTP 503"):
                await cache.token(settings, "crm", who, 2)
        assert token_endpoint.count == 1
        token_endpoint.healthy()
        await asyncio.sleep(0.35)
        assert (await cache.token(settings, "crm", who, 2)).startswith("tx-alice-")
        assert token_endpoint.count == 2
    finally:
        await cache.aclose()
