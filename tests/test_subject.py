"""The subject of a token exchange is the very token Envoy verified, or none (#27)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.edges.subject import NoSubject, subject_of

CLAIMS: dict[str, Any] = {"iss": "https://idp.example", "sub": "alice", "exp": 1_900_000_000,
                          "iat": 1_800_000_000, "aud": ["gateway"], "groups": ["a", "b"],
                          "email_verified": True}


def token(payload: dict[str, Any]) -> str:
    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(payload)}.c2lnbmF0dXJl"


def as_envoy_leaves_it(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as jwt_authn's metadata carries it: a protobuf Struct (numbers doubles)."""
    struct = struct_pb2.Struct()
    struct.update(payload)
    return json_format.MessageToDict(struct)


def test_the_verified_token_is_the_subject() -> None:
    bearer = token(CLAIMS)
    found = subject_of(f"Bearer {bearer}", as_envoy_leaves_it(CLAIMS))
    assert (found.token, found.issuer, found.subject, found.expires_at) == (
        bearer, "https://idp.example", "alice", 1_900_000_000.0)


@pytest.mark.parametrize(("authorization", "verified", "why"), [
    (f"Bearer {token(CLAIMS)}", None, "no token verified"),
    (None, CLAIMS, "one Authorization header"),
    (f"Bearer {token(CLAIMS)}, Bearer {token(CLAIMS)}", CLAIMS, "one Authorization header"),
    (f"Basic {token(CLAIMS)}", CLAIMS, "does not carry a bearer"),
    ("Bearer ", CLAIMS, "does not carry a bearer"),
    ("Bearer opaque-token", CLAIMS, "not a JWT"),
    ("Bearer a.%%%.c", CLAIMS, "not a JWT whose payload decodes"),
    (f"Bearer {token({**CLAIMS, 'sub': 'mallory'})}", CLAIMS, "not the one Envoy verified"),
    (f"Bearer {token({k: v for k, v in CLAIMS.items() if k != 'sub'})}",
     {k: v for k, v in CLAIMS.items() if k != "sub"}, "no issuer or no subject"),
    (f"Bearer {token({**CLAIMS, 'exp': 'never'})}", {**CLAIMS, "exp": "never"},
     "no expiry"),
])
def test_anything_else_is_no_subject(authorization: str | None,
                                     verified: dict[str, Any] | None, why: str) -> None:
    with pytest.raises(NoSubject, match=why):
        subject_of(authorization, None if verified is None else as_envoy_leaves_it(verified))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(CLAIMS)), value=json_values)
def test_a_token_differing_in_any_claim_is_refused(key: str, value: Any) -> None:
    """Envoy verified CLAIMS; a bearer whose payload differs in any one claim is not it."""
    changed = {**CLAIMS, key: value}
    if changed == CLAIMS:
        return
    with pytest.raises(NoSubject):
        subject_of(f"Bearer {token(changed)}", as_envoy_leaves_it(CLAIMS))
