"""The pure decision table of DESIGN.md."""

from __future__ import annotations

import pytest

from ext_authz.decision import OUTCOMES, Policy, RequestFacts, decide, explain
from tests.conftest import make_config

POLICY = Policy.from_config(make_config(servers={
    "pub": {},
    "priv": {"available_on_public_internet": False},
    "tok": {"available_on_public_internet": False,
            "oauth2": {"token_url": "http://idp/t", "client_id": "c", "client_secret": "s"}},
}))


def facts(peer: str, path: str, xff: str | None = None) -> RequestFacts:
    return RequestFacts(peer=peer, x_forwarded_for=xff, path=path, authority="gw")


@pytest.mark.parametrize(
    ("peer", "path", "xff", "reason", "network", "inject"),
    [
        ("127.0.0.1", "/mcp/pub", None, "allowed", "internal", False),
        ("127.0.0.2", "/mcp/pub", None, "allowed", "external", False),
        ("127.0.0.1", "/mcp/priv", None, "allowed", "internal", False),
        ("127.0.0.2", "/mcp/priv", None, "not_found", "external", False),
        ("127.0.0.2", "/mcp/nope", None, "not_found", "external", False),
        ("127.0.0.1", "/mcp/nope", None, "not_found", "internal", False),
        ("127.0.0.1", "/elsewhere", None, "not_found", "internal", False),
        ("127.0.0.1", "/mcp/tok", None, "allowed", "internal", True),
        ("127.0.0.2", "/mcp/tok", None, "not_found", "external", False),
        ("127.0.0.2", "/mcp/priv", "127.0.0.1", "not_found", "external", False),
        ("127.0.0.3", "/mcp/priv", "127.0.0.1", "allowed", "internal", False),
        ("", "/mcp/priv", None, "not_found", "external", False),
        ("", "/mcp/pub", None, "allowed", "external", False),
    ],
)
def test_table(peer: str, path: str, xff: str | None, reason: str, network: str,
               inject: bool) -> None:
    """Network, server and visibility decide; a token is wanted only for allowed oauth2."""
    decision = decide(facts(peer, path, xff), POLICY)
    assert decision.reason == reason
    assert decision.network == network
    assert (decision.oauth2 is not None) == inject
    assert decision.http_status == OUTCOMES[decision.reason][1]


def test_no_http_is_bad_request() -> None:
    """No HTTP attributes: 400."""
    decision = decide(RequestFacts("127.0.0.1", None, "", "", has_http=False), POLICY)
    assert (decision.reason, decision.http_status, decision.grpc_code) == ("bad_request", 400, 3)


def test_token_failure_keeps_facts() -> None:
    """A denial after a failed fetch keeps who, where and which server."""
    decision = decide(facts("127.0.0.1", "/mcp/tok"), POLICY).deny(
        "upstream_credentials_unavailable", "endpoint down")
    assert (decision.http_status, decision.server_name, decision.oauth2) == (503, "tok", None)
    assert "endpoint down" in explain(decision)


def test_status_table() -> None:
    """The reason codes and their statuses are DESIGN.md's table."""
    assert OUTCOMES == {
        "allowed": (0, 200), "not_found": (7, 404),
        "upstream_credentials_unavailable": (14, 503), "bad_request": (3, 400),
        "internal_error": (13, 500), "tool_not_found": (7, 200), "batch_refused": (7, 400),
        "bad_mcp_request": (3, 400),
    }


class TestDecisionCache:
    def test_cached_answers_equal_fresh_ones(self) -> None:
        """A remembered decision is the one a fresh policy would make, for every table row."""
        cases = [facts(p, path, x) for p in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "")
                 for path in ("/mcp/pub", "/mcp/priv", "/mcp/tok", "/x")
                 for x in (None, "127.0.0.1", "127.0.0.2, 127.0.0.1", "garbage")]
        warm = Policy.from_config(make_config())
        for case in cases * 2:
            assert decide(case, warm) == decide(case, Policy.from_config(make_config()))

    def test_cache_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The cache never grows past its size, and long inputs are not kept."""
        monkeypatch.setattr("ext_authz.decision.DECISION_CACHE_SIZE", 10)
        policy = Policy.from_config(make_config())
        for i in range(25):
            decide(facts("127.0.0.2", f"/mcp/pub/{i}"), policy)
            assert len(policy.decision_cache) <= 10
        policy.decision_cache.clear()
        decide(facts("127.0.0.3", "/mcp/pub", xff="127.0.0.2," * 100), policy)
        assert policy.decision_cache == {}
