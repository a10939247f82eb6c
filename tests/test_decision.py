"""The pure decision table (docs/design.md, "The decision")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.mcp.jsonrpc import Body, request_body
from ext_authz.policy.compile import Policy
from ext_authz.policy.decision import Decision, RequestFacts, decide, decide_items, judge_items
from ext_authz.policy.explain import explain
from ext_authz.policy.outcomes import OUTCOMES
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
    """The reason codes and their statuses are the decision table (docs/design.md)."""
    assert OUTCOMES == {
        "allowed": (0, 200), "tool_hidden": (0, 200), "not_found": (7, 404),
        "upstream_credentials_unavailable": (14, 503), "bad_request": (3, 400),
        "internal_error": (13, 500), "tool_not_found": (7, 200), "batch_refused": (7, 400),
        "bad_mcp_request": (3, 400), "body_too_large": (3, 413), "registry": (7, 200),
        "item_hidden": (0, 200), "item_not_found": (7, 200), "resource_metadata": (7, 200),
        "subject_token_refused": (16, 401),
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
        monkeypatch.setattr("ext_authz.policy.compile.DECISION_CACHE_SIZE", 10)
        policy = Policy.from_config(make_config())
        for i in range(25):
            decide(facts("127.0.0.2", f"/mcp/pub/{i}"), policy)
            assert len(policy.decision_cache) <= 10
        policy.decision_cache.clear()
        decide(facts("127.0.0.3", "/mcp/pub", xff="127.0.0.2," * 100), policy)
        assert policy.decision_cache == {}


# -- named networks and tool rules ------------------------------------------------------

NAMED = Policy.from_config(make_config(
    network={"internal_ranges": ["10.0.0.0/8"],
             "networks": {"partners": ["192.0.2.0/24"], "lab": ["10.9.0.0/16"]}},
    servers={
        "github": {"tools": {
            "delete_repo": {"available_on_public_internet": False},
            "merge": {"available_on_public_internet": False, "visible_to": ["partners"]}}},
        "billing": {"available_on_public_internet": False, "visible_to": ["partners"],
                    "tools": {"refund": {}}},
        "vault": {"available_on_public_internet": False},
    },
))


def json_body(data: bytes) -> Body:
    """A POST body as an MCP client sends it."""
    return request_body(data, "POST", {"content-type": ["application/json"]})


LISTING = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'


def decide_call(peer: str, server: str, *tools: str, policy: Policy = NAMED) -> Decision:
    """Decide a POST to a server whose body calls these tools (none: a tools/list)."""
    messages = [{"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": t}}
                for i, t in enumerate(tools)]
    data = json.dumps(messages if len(messages) > 1 else messages[0]).encode() if tools else (
        LISTING)
    return decide_items(decide(RequestFacts(peer, None, f"/mcp/{server}", "gw"), policy),
                        json_body(data), policy)


class TestNamedNetworks:
    @pytest.mark.parametrize(
        ("peer", "server", "reason", "network", "rule"),
        [
            ("192.0.2.7", "billing", "allowed", "partners", "servers.billing.visible_to"),
            ("198.51.100.1", "billing", "not_found", "external", "servers.billing.visible_to"),
            ("10.1.1.1", "billing", "allowed", "internal", "network.internal_ranges"),
            # lab is more specific than internal: it names the caller, who is internal still.
            ("10.9.1.1", "vault", "allowed", "lab", "network.internal_ranges"),
            ("192.0.2.7", "vault", "not_found", "partners",
             "servers.vault.available_on_public_internet"),
            ("192.0.2.7", "github", "allowed", "partners",
             "servers.github.available_on_public_internet"),
        ],
    )
    def test_visible_to(self, peer: str, server: str, reason: str, network: str,
                        rule: str) -> None:
        """A server's visible_to networks see it; the most specific network names the caller."""
        decision = decide_call(peer, server)
        assert (decision.reason, decision.network, decision.rule) == (reason, network, rule)


    def test_visible_to_a_less_specific_network_the_caller_is_in(self) -> None:
        """Membership decides, not the name: a caller named by a more specific network sees
        what a network it is also in may see (a server's, and a tool's, visible_to)."""
        policy = Policy.from_config(make_config(
            network={"internal_ranges": ["10.0.0.0/8"],
                     "networks": {"partners": ["192.0.2.0/24"], "desk": ["192.0.2.128/25"]}},
            servers={"billing": {"available_on_public_internet": False,
                                 "visible_to": ["partners"],
                                 "tools": {"refund": {"available_on_public_internet": False,
                                                      "visible_to": ["partners"]}}}}))
        decision = decide_call("192.0.2.200", "billing", "refund", policy=policy)
        assert (decision.reason, decision.network, decision.tool) == (
            "allowed", "desk", "refund")
        assert decision.rule == "servers.billing.tools.refund.visible_to"


class TestToolRules:
    @pytest.mark.parametrize(
        ("peer", "server", "tools", "reason", "tool"),
        [
            ("198.51.100.1", "github", ["delete_repo"], "tool_not_found", "delete_repo"),
            ("10.1.1.1", "github", ["delete_repo"], "allowed", "delete_repo"),
            ("192.0.2.7", "github", ["merge"], "allowed", "merge"),
            ("198.51.100.1", "github", ["merge"], "tool_not_found", "merge"),
            ("198.51.100.1", "github", ["search"], "allowed", ""),  # not configured
            ("198.51.100.1", "github", ["search", "delete_repo"], "batch_refused",
             "delete_repo"),
            ("192.0.2.7", "billing", ["refund"], "tool_not_found", "refund"),
            ("198.51.100.1", "billing", ["refund"], "not_found", ""),  # server hidden first
            ("10.1.1.1", "billing", ["refund", "refund"], "allowed", "refund"),
        ],
    )
    def test_rules(self, peer: str, server: str, tools: list[str], reason: str,
                   tool: str) -> None:
        """A tool's rule narrows its server's; unconfigured tools follow the server."""
        decision = decide_call(peer, server, *tools)
        assert (decision.reason, decision.tool) == (reason, tool)

    def test_hidden_tool_reply(self) -> None:
        """The reply is the server's answer for a tool it lacks, with the request's id."""
        decision = decide_call("198.51.100.1", "github", "delete_repo")
        assert decision.http_status == 200
        assert json.loads(decision.reply)["result"]["content"][0]["text"] == (
            "Unknown tool: delete_repo")
        steps = explain(decision)
        assert "decided by servers.github.tools.delete_repo.available_on_public_internet" in steps

    def test_a_callers_tool_name_is_never_in_the_decision(self) -> None:
        """Under a "*" rule a hidden name is whatever the caller sent: the decision (and so
        the decision log) names the rule, never the name, nor anything of its length."""
        policy = Policy.from_config(make_config(servers={"s": {"tools": {
            "*": {"available_on_public_internet": False}}}}))
        name = "x" * 100_000
        for can_rename in (True, False):
            decision = decide_items(decide(facts("198.51.100.1", "/mcp/s"), policy),
                                    json_body(json.dumps({"jsonrpc": "2.0", "id": 1,
                                              "method": "tools/call",
                                              "params": {"name": name}}).encode()),
                                    policy, can_rename=can_rename)
            assert decision.reason in ("tool_hidden", "tool_not_found")
            assert "xxx" not in decision.detail
            assert decision.detail == (
                'a tool under the "*" rule is hidden from the external network')
            assert decision.tool == "*"

    def test_allowed_tool_decisions_keep_their_identity(self) -> None:
        """The same allowed call gives the same Decision object (encodings are cached by it)."""
        first = decide_call("10.1.1.1", "github", "delete_repo")
        assert decide_call("10.1.1.1", "github", "delete_repo") is first

    def test_requests_that_call_no_tool_are_the_server_decision(self) -> None:
        """A GET, or a body that neither calls nor lists tools: the server decision itself;
        a tools/list: one remembered decision that says its answer is to be filtered."""
        server_only = decide(RequestFacts("198.51.100.1", None, "/mcp/github", "gw"), NAMED)
        assert server_only.reads_body
        ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
        assert decide_items(server_only, json_body(ping), NAMED) is server_only
        assert decide_items(server_only, Body(method="GET"), NAMED) is server_only
        listing = decide_call("198.51.100.1", "github")
        assert decide_call("198.51.100.1", "github") is listing
        assert (listing.reason, listing.lists_items, listing.uses_items) == (
            "allowed", True, False)

    def test_a_default_rule_covers_every_tool_not_listed(self) -> None:
        """`tools: {"*": ...}`: only search is public; any other tool, even one added later,
        is internal-only, and says so in its rule."""
        policy = Policy.from_config(make_config(
            network={"internal_ranges": ["10.0.0.0/8"]},
            servers={"gh": {"tools": {"search": {"available_on_public_internet": True},
                                      "*": {"available_on_public_internet": False}}}}))
        outside, inside = "198.51.100.1", "10.1.1.1"
        assert decide_call(outside, "gh", "search", policy=policy).reason == "allowed"
        later = decide_call(outside, "gh", "added_later", policy=policy)
        assert (later.reason, later.tool, later.rule) == (
            "tool_not_found", "*", "servers.gh.tools.*.available_on_public_internet")
        assert decide_call(inside, "gh", "added_later", policy=policy).reason == "allowed"
        assert "tool '*' is internal-only; the caller is external" in explain(later)

    def test_the_server_answers_when_the_edge_can_rename(self) -> None:
        """unknown_tool_reply: server (the default) and an edge that can rename (ext_proc):
        the hidden calls, each of a batch, go on to be renamed."""
        body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                            "params": {"name": n}} for i, n in enumerate(
                                ["delete_repo", "search", "delete_repo"])]).encode()
        server = decide(RequestFacts("198.51.100.1", None, "/mcp/github", "gw"), NAMED)
        judged = judge_items(server, json_body(body), NAMED, can_rename=True)
        renamed = judged.decision
        assert (renamed.reason, renamed.allowed, renamed.renamed, renamed.goes_upstream,
                renamed.uses_items) == ("tool_hidden", False, True, True, True)
        assert [(c.name, c.index) for c, hidden in zip(judged.uses, judged.hidden, strict=True)
                if hidden] == [("delete_repo", 0), ("delete_repo", 2)]
        # The same hidden use by the same caller is the same decision: its log fields and
        # metadata are built once, as a visible use's are.
        assert judge_items(server, json_body(body), NAMED, can_rename=True).decision is renamed
        assert decide_items(server, json_body(body), NAMED).reason == "batch_refused"


cidrs = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "192.0.2.128/25",
                         "198.51.100.0/24"])
network_names = ["a", "b", "c"]
addresses = st.sampled_from(["10.1.2.3", "10.200.0.1", "192.0.2.1", "192.0.2.200",
                             "198.51.100.9", "203.0.113.1"])


@st.composite
def tool_configs(draw: st.DrawFn) -> dict[str, Any]:
    networks = {n: draw(st.lists(cidrs, min_size=1, max_size=2, unique=True))
                for n in network_names}
    public = draw(st.booleans())
    server_visible_to = [] if public else draw(st.lists(st.sampled_from(network_names),
                                                         unique=True))
    audience = ["internal", *server_visible_to]
    tools = {}
    for name in ("t1", "t2"):
        tool_public = public and draw(st.booleans())
        choices = network_names if public else audience
        visible_to = [] if tool_public else draw(st.lists(st.sampled_from(choices), unique=True))
        tools[name] = {"available_on_public_internet": tool_public, "visible_to": visible_to}
    return {"network": {"internal_ranges": [draw(cidrs)], "networks": networks},
            "servers": {"s": {"available_on_public_internet": public,
                              "visible_to": server_visible_to, "tools": tools}}}


class TestToolProperties:
    @settings(max_examples=300)
    @given(config=tool_configs(), peer=addresses,
           calls=st.lists(st.sampled_from(["t1", "t2", "other"]), min_size=1, max_size=3))
    def test_a_tool_rule_never_widens_its_server(self, config: dict[str, Any], peer: str,
                                                 calls: list[str]) -> None:
        """Whoever cannot see a server cannot call its tools; tool rules only take away."""
        with_tools = Policy.from_config(make_config(**config))
        server = dict(config["servers"]["s"])
        del server["tools"]
        without_tools = Policy.from_config(make_config(network=config["network"],
                                                       servers={"s": server}))
        decided = decide_call(peer, "s", *calls, policy=with_tools)
        server_only = decide_call(peer, "s", *calls, policy=without_tools)
        if not server_only.allowed:
            assert decided.reason == server_only.reason == "not_found"
        if decided.allowed:
            assert server_only.allowed
        if "other" in calls and calls == ["other"]:
            assert decided.reason == server_only.reason  # unconfigured: the server's rule


# -- the registry and OAuth discovery -----------------------------------------------------

DISCOVERY_CONFIG: dict[str, Any] = {
    "network": {"internal_ranges": ["10.0.0.0/8"], "networks": {"partners": ["192.0.2.0/24"]}},
    "servers": {
        "github": {"title": "GitHub", "description": "Repositories."},
        "billing": {"available_on_public_internet": False, "visible_to": ["partners"]},
        "vault": {"available_on_public_internet": False, "title": "Vault"},
        "tok": {"oauth2": {"token_url": "http://idp/t", "client_id": "c",
                           "client_secret": "s"}},
    },
}
DISCOVERY = Policy.from_config(make_config(**DISCOVERY_CONFIG))
CALLERS = {"internal": "10.1.2.3", "partner": "192.0.2.7", "external": "203.0.113.9"}


def registry_of(policy: Policy, peer: str, method: str = "GET",
                extensions: dict[str, str] | None = None) -> Decision:
    return decide(RequestFacts(peer, None, "/mcp", "gw", extensions or {}, method=method),
                  policy)


class TestRegistry:
    @pytest.mark.parametrize(("caller", "listed"), [
        ("internal", ["github", "billing", "vault", "tok"]),
        ("partner", ["github", "billing", "tok"]),
        ("external", ["github", "tok"]),
    ])
    def test_lists_what_the_caller_may_see(self, caller: str, listed: list[str]) -> None:
        """Hidden servers are absent, not marked; title and description where configured."""
        decision = registry_of(DISCOVERY, CALLERS[caller])
        assert (decision.reason, decision.http_status) == ("registry", 200)
        servers = json.loads(decision.reply)["servers"]
        assert [s["name"] for s in servers] == listed
        assert servers[0] == {"name": "github", "title": "GitHub",
                              "description": "Repositories.", "path": "/mcp/github"}

    @pytest.mark.parametrize("caller", ["partner", "external"])
    def test_is_the_registry_of_a_gateway_without_the_hidden_servers(self, caller: str) -> None:
        """Byte for byte: nothing in it depends on what the caller does not see."""
        config = json.loads(json.dumps(DISCOVERY_CONFIG))
        hidden = {"partner": ["vault"], "external": ["billing", "vault"]}[caller]
        for name in hidden:
            del config["servers"][name]
        smaller = Policy.from_config(make_config(**config))
        assert (registry_of(DISCOVERY, CALLERS[caller]).reply
                == registry_of(smaller, CALLERS[caller]).reply)

    def test_host_routing_lists_hosts(self) -> None:
        policy = Policy.from_config(make_config(
            routing={"path_prefix": None, "host_suffix": ".mcp.example"},
            servers={"pub": {}}))
        decision = registry_of(policy, "127.0.0.2")
        assert json.loads(decision.reply) == {"servers": [{"name": "pub",
                                                           "host": "pub.mcp.example"}]}

    @pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
    def test_only_get(self, method: str) -> None:
        """Another method on the registry path is what an unknown path gets."""
        assert registry_of(DISCOVERY, CALLERS["internal"], method).reason == "not_found"

    def test_a_route_that_says_mcp_is_no_registry(self) -> None:
        """envoy-config marks every route: its catch-all at /mcp is never the registry."""
        decision = registry_of(DISCOVERY, CALLERS["internal"], "GET",
                               {"mcp_server": "", "mcp_route": "mcp"})
        assert decision.reason == "not_found"
        marked = registry_of(DISCOVERY, CALLERS["internal"], "GET",
                             {"mcp_server": "", "mcp_route": "registry"})
        assert marked.reason == "registry"

    def test_off(self) -> None:
        policy = Policy.from_config(make_config(routing={"registry_path": None}))
        assert registry_of(policy, "127.0.0.1").reason == "not_found"

    def test_explained(self) -> None:
        steps = explain(registry_of(DISCOVERY, CALLERS["external"]))
        assert "lists: github, tok" in steps
        assert steps[-1] == "decision: registry (HTTP 200)"


def discover(peer: str, server: str, extensions: dict[str, str] | None = None,
             authority: str = "gw") -> Decision:
    path = f"/.well-known/oauth-protected-resource/mcp/{server}"
    return decide(RequestFacts(peer, None, path, authority, extensions or {}, method="GET"),
                  DISCOVERY)


class TestDiscovery:
    @pytest.mark.parametrize(("caller", "server", "reason"), [
        ("internal", "vault", "allowed"),
        ("external", "github", "allowed"),
        ("external", "vault", "not_found"),  # hidden: as unknown
        ("external", "nope", "not_found"),
        ("partner", "billing", "allowed"),
        ("internal", "tok", "not_found"),  # the gateway brings the token: nothing to discover
    ])
    def test_visibility_decides(self, caller: str, server: str, reason: str) -> None:
        decision = discover(CALLERS[caller], server)
        assert decision.reason == reason
        assert decision.route.kind == "discovery"
        assert decision.oauth2 is None
        assert not decision.reads_body

    def test_the_route_names_the_server(self) -> None:
        """From Envoy's route, the path is not read (a different one names nothing)."""
        decision = decide(RequestFacts(
            CALLERS["external"], None, "/.well-known/oauth-protected-resource/mcp/vault", "gw",
            {"mcp_server": "github", "mcp_route": "discovery"}, method="GET"), DISCOVERY)
        assert (decision.reason, decision.server_name) == ("allowed", "github")

    @pytest.mark.parametrize("caller", ["internal", "external", "partner"])
    def test_no_origin_no_document(self, caller: str) -> None:
        """Where the gateway URL the caller used cannot be said, a visible server's
        document is the unknown server's 404: the upstream's own URLs are never shown."""
        decision = discover(CALLERS[caller], "github", authority="a,b")
        unknown = discover(CALLERS[caller], "nope", authority="a,b")
        assert (decision.reason, decision.http_status) == (unknown.reason, unknown.http_status)
        assert decision.reason == "not_found"

    def test_hidden_and_unknown_are_one_answer(self) -> None:
        hidden, unknown = discover(CALLERS["external"], "vault"), discover(
            CALLERS["external"], "nope")
        assert (hidden.reason, hidden.http_status) == (unknown.reason, unknown.http_status)

    def test_explained(self) -> None:
        steps = explain(discover(CALLERS["internal"], "tok"))
        assert "the gateway injects this server's token: no discovery" in steps
