"""Rules for prompts and resources: read from the body, judged like tool rules, explained.

Tools, prompts and resources share one shape of rule (`available_on_public_internet`,
`visible_to`, a `"*"` default); resources are ruled by URI or by RFC 6570 URI template.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ext_authz.errors import ConfigError
from ext_authz.mcp.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, read_item_uses, request_body
from ext_authz.mcp.uri_template import template_pattern, uri_rule_problem
from ext_authz.policy.compile import Policy
from ext_authz.policy.config import parse_yaml
from ext_authz.policy.decision import Decision, RequestFacts, decide, decide_items, judge_items
from ext_authz.policy.explain import check_report, explain
from ext_authz.policy.network import Placement
from tests.conftest import make_config

HIDDEN = {"available_on_public_internet": False}
POLICY = Policy.from_config(make_config(
    network={"internal_ranges": ["10.0.0.0/8"],
             "networks": {"partners": ["198.51.100.0/24"]}},
    servers={"gh": {
        "prompts": {"*": HIDDEN, "summarize": {},
                    "runbook": {**HIDDEN, "visible_to": ["partners"]}},
        "resources": {"repo://docs/{name}": {}, "repo://{owner}/secrets": HIDDEN,
                      "file:///etc/motd": {}, "*": HIDDEN},
    }}))
OUTSIDE, PARTNER, INSIDE = "203.0.113.9", "198.51.100.7", "10.1.2.3"


def message(method: str, params: dict[str, Any], rpc_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}


def body(value: Any) -> Any:
    return request_body(json.dumps(value).encode(), "POST",
                        {"content-type": ["application/json"]})


def judged(peer: str, value: Any, *, can_rename: bool = True) -> Decision:
    server = decide(RequestFacts(peer, None, "/mcp/gh", "gw"), POLICY)
    return decide_items(server, body(value), POLICY, can_rename=can_rename)


GET = "prompts/get"
READ = "resources/read"


class TestReading:
    @pytest.mark.parametrize(("value", "uses"), [
        (message(GET, {"name": "p"}), [("prompt", "p", ("params", "name"))]),
        (message(READ, {"uri": "x:y"}), [("resource", "x:y", ("params", "uri"))]),
        (message("resources/subscribe", {"uri": "x:y"}), [("resource", "x:y", ("params", "uri"))]),
        (message("resources/unsubscribe", {"uri": "x:y"}),
         [("resource", "x:y", ("params", "uri"))]),
        (message("completion/complete", {"ref": {"type": "ref/prompt", "name": "p"},
                                         "argument": {"name": "a", "value": ""}}),
         [("prompt", "p", ("params", "ref", "name"))]),
        (message("completion/complete", {"ref": {"type": "ref/resource", "uri": "x:{a}"},
                                         "argument": {"name": "a", "value": ""}}),
         [("resource", "x:{a}", ("params", "ref", "uri"))]),
        (message("subscriptions/listen", {"notifications": {
            "toolsListChanged": True, "resourceSubscriptions": ["x:a", "x:b"]}}),
         [("resource", "x:a", ("params", "notifications", "resourceSubscriptions", 0)),
          ("resource", "x:b", ("params", "notifications", "resourceSubscriptions", 1))]),
        ([message(GET, {"name": "p"}, 1), message("tools/call", {"name": "t"}, 2)],
         [("prompt", "p", ("params", "name")), ("tool", "t", ("params", "name"))]),
    ])
    def test_each_method_names_its_item(self, value: Any,
                                        uses: list[tuple[str, str, tuple[str, ...]]]) -> None:
        read = read_item_uses(body(value), 1 << 16, 8)
        assert not read.problem
        assert [(use.kind, use.name, use.at) for use in read.uses] == uses

    @pytest.mark.parametrize("method", ["prompts/list", "resources/list",
                                        "resources/templates/list", "tools/list"])
    def test_every_list_is_a_list(self, method: str) -> None:
        assert read_item_uses(body({"jsonrpc": "2.0", "id": 1, "method": method}),
                              1 << 16, 8).lists

    @pytest.mark.parametrize(("value", "code"), [
        (message(GET, {"name": ""}), INVALID_PARAMS),
        (message(GET, {"name": 3}), INVALID_PARAMS),
        (message(READ, {}), INVALID_PARAMS),
        ({"jsonrpc": "2.0", "id": 1, "method": READ}, INVALID_PARAMS),
        ({**message(READ, {"uri": "x:y"}), "jsonrpc": "1.0"}, INVALID_REQUEST),
        (message(READ, {"uri": "x:y"}, None) | {"id": 1.5}, INVALID_REQUEST),
        (message(READ, {"URI": "x:y", "uri": "x:z"}), INVALID_REQUEST),
        (message("completion/complete", {"ref": {"type": "ref/other", "name": "p"}}),
         INVALID_PARAMS),
        (message("completion/complete", {"ref": {"type": "ref/prompt", "Name": "p"}}),
         INVALID_REQUEST),
        (message("completion/complete", {"ref": "p"}), INVALID_PARAMS),
        (message("subscriptions/listen", {"notifications": {"resourceSubscriptions": "x:a"}}),
         INVALID_PARAMS),
        (message("subscriptions/listen", {"notifications": {"resourceSubscriptions": [""]}}),
         INVALID_PARAMS),
        (message("subscriptions/listen", {"notifications": {
            "ResourceSubscriptions": ["x:a"]}}), INVALID_REQUEST),
    ], ids=["empty-name", "number-name", "no-uri", "no-params", "jsonrpc-1.0", "odd-id",
            "uri-in-two-cases", "unknown-ref", "ref-key-in-another-case", "ref-not-object",
            "listen-not-a-list", "listen-empty-uri", "listen-key-in-another-case"])
    def test_what_servers_read_differently_is_refused(self, value: Any, code: int) -> None:
        read = read_item_uses(body(value), 1 << 16, 8)
        assert (read.error_code, read.uses) == (code, ())
        assert read.problem


class TestDeciding:
    @pytest.mark.parametrize(("peer", "value", "reason", "rule"), [
        (OUTSIDE, message(GET, {"name": "summarize"}), "allowed",
         "servers.gh.prompts.summarize.available_on_public_internet"),
        (OUTSIDE, message(GET, {"name": "runbook"}), "item_hidden",
         "servers.gh.prompts.runbook.visible_to"),
        (PARTNER, message(GET, {"name": "runbook"}), "allowed",
         "servers.gh.prompts.runbook.visible_to"),
        (OUTSIDE, message(GET, {"name": "anything"}), "item_hidden",
         "servers.gh.prompts.*.available_on_public_internet"),
        (INSIDE, message(GET, {"name": "anything"}), "allowed", "network.internal_ranges"),
        (OUTSIDE, message(READ, {"uri": "repo://docs/readme"}), "allowed",
         "servers.gh.resources.repo://docs/{name}.available_on_public_internet"),
        (OUTSIDE, message(READ, {"uri": "repo://alice/secrets"}), "item_hidden",
         "servers.gh.resources.repo://{owner}/secrets.available_on_public_internet"),
        (OUTSIDE, message(READ, {"uri": "file:///etc/motd"}), "allowed",
         "servers.gh.resources.file:///etc/motd.available_on_public_internet"),
        (OUTSIDE, message(READ, {"uri": "file:///etc/passwd"}), "item_hidden",
         "servers.gh.resources.*.available_on_public_internet"),
        (OUTSIDE, message("completion/complete", {"ref": {"type": "ref/resource",
                                                          "uri": "repo://{owner}/secrets"}}),
         "item_hidden", "servers.gh.resources.repo://{owner}/secrets.available_on_public_internet"),
        (OUTSIDE, message("completion/complete", {"ref": {"type": "ref/prompt",
                                                          "name": "summarize"}}),
         "allowed", "servers.gh.prompts.summarize.available_on_public_internet"),
    ])
    def test_each_use_by_its_rule(self, peer: str, value: Any, reason: str, rule: str) -> None:
        decision = judged(peer, value)
        assert (decision.reason, decision.rule) == (reason, rule)
        assert decision.tool == ""
        assert decision.item.startswith(("prompts.", "resources."))

    def test_only_configured_keys_are_named(self) -> None:
        """Under "*" the caller's text never reaches the decision: the log, the metrics."""
        decision = judged(OUTSIDE, message(GET, {"name": "caller text " * 50}))
        assert decision.item == "prompts.*"
        assert "caller text" not in decision.detail + decision.rule + decision.item

    def test_a_hidden_use_is_renamed_or_answered_as_missing(self) -> None:
        server = decide(RequestFacts(OUTSIDE, None, "/mcp/gh", "gw"), POLICY)
        renamed = judge_items(server, body(message(READ, {"uri": "repo://a/secrets"}, 7)),
                              POLICY, can_rename=True)
        assert (renamed.decision.reason, renamed.hidden) == ("item_hidden", (True,))
        assert [use.name for use in renamed.uses] == ["repo://a/secrets"]
        local = judged(OUTSIDE, message(READ, {"uri": "repo://a/secrets"}, 7), can_rename=False)
        assert local.reason == "item_not_found"
        assert json.loads(local.reply) == {"jsonrpc": "2.0", "id": 7, "error": {
            "code": -32002, "message": "Resource not found", "data": {"uri": "repo://a/secrets"}}}
        prompt = judged(OUTSIDE, message(GET, {"name": "x"}, "a"), can_rename=False)
        assert json.loads(prompt.reply)["error"] == {"code": -32602,
                                                     "message": "Unknown prompt: x"}
        notification = judged(OUTSIDE, {"jsonrpc": "2.0", "method": READ,
                                        "params": {"uri": "x:y"}}, can_rename=False)
        assert (notification.reply, notification.http_status) == (b"", 202)

    def test_a_batch_with_a_hidden_item_is_refused_whole_without_renaming(self) -> None:
        batch = [message(GET, {"name": "summarize"}, 1), message(GET, {"name": "x"}, 2)]
        assert judged(OUTSIDE, batch, can_rename=False).reason == "batch_refused"
        assert judged(OUTSIDE, batch).reason == "item_hidden"

    def test_lists_and_uses_tell_the_answers_filter(self) -> None:
        listing = judged(OUTSIDE, {"jsonrpc": "2.0", "id": 1, "method": "prompts/list"})
        assert (listing.lists_items, listing.uses_items) == (True, False)
        use = judged(OUTSIDE, message(GET, {"name": "summarize"}))
        assert (use.lists_items, use.uses_items) == (False, True)
        assert judged(OUTSIDE, message(GET, {"name": "summarize"})) is use  # remembered

    def test_check_explains_it(self) -> None:
        value = message(READ, {"uri": "repo://bob/secrets"})
        decision = judged(OUTSIDE, value)
        steps = explain(decision)
        assert "resource 'repo://{owner}/secrets' is internal-only; the caller is external" in (
            steps)
        assert any("unknown resource it then is" in step for step in steps)
        report = check_report(decision, body(value))
        assert report["items_used"] == [{"kind": "resource", "name": "repo://bob/secrets"}]
        assert report["item"] == "resources.repo://{owner}/secrets"
        assert report["tools_called"] == []


class TestTemplates:
    @pytest.mark.parametrize(("template", "uri", "fits"), [
        ("repo://{owner}/secrets", "repo://alice/secrets", True),
        ("repo://{owner}/secrets", "repo://a/b/secrets", False),
        ("repo://{owner}/secrets", "repo://alice/secrets/x", False),
        ("repo://{+path}", "repo://a/b/c?d#e", True),
        ("file://{/path*}", "file:///a/b", True),
        ("search://q{?term,page}", "search://q?term=x&page=2", True),
        ("search://q{?term,page}", "search://q", True),
        ("x:{a}.{b}", "x:1.2", True),
        ("x:a", "x:ab", False),
    ])
    def test_a_template_fits_its_expansions(self, template: str, uri: str, fits: bool) -> None:
        assert uri_rule_problem(template) == ""
        assert bool(template_pattern(template).fullmatch(uri)) == fits

    @given(owner=st.text(alphabet=st.characters(blacklist_characters="/?#"), min_size=1))
    def test_a_simple_expansion_is_one_segment(self, owner: str) -> None:
        assert template_pattern("repo://{owner}/secrets").fullmatch(f"repo://{owner}/secrets")

    @pytest.mark.parametrize(("key", "problem"), [
        ("", "1-2048"), ("no-scheme/{x}", "scheme"), ("x:{a b}", "RFC 6570"),
        ("x:{", "braces"), ("x:a b", "spaces"), ("x:{}", "RFC 6570"), ("x:" + "a" * 2048, "1-2048"),
    ])
    def test_what_is_no_uri_rule(self, key: str, problem: str) -> None:
        assert problem in uri_rule_problem(key)


class TestConfig:
    @pytest.mark.parametrize(("text", "expected"), [
        ("servers: {a: {resources: {'nope': {}}}}",
         "servers.a.resources: resource 'nope': a URI or URI template starts"),
        ("servers: {a: {prompts: {' spaced ': {}}}}", "servers.a.prompts: prompt"),
        ("servers: {a: {available_on_public_internet: false, prompts: {p:"
         " {available_on_public_internet: true}}}}",
         "servers.a.prompts.p.available_on_public_internet: a prompt of an internal-only"),
        ("servers: {a: {resources: {'x:y': {visible_to: [nope]}}}}",
         "servers.a.resources.x:y.visible_to"),
    ])
    def test_bad_rules_are_named(self, text: str, expected: str) -> None:
        """One line naming the key and the problem."""
        with pytest.raises(ConfigError) as error:
            parse_yaml(text, env={})
        assert any(expected in problem for problem in error.value.problems), error.value

    def test_rules_follow_their_server_by_default(self) -> None:
        config = parse_yaml("servers: {a: {available_on_public_internet: false,"
                              " prompts: {p: {}}, resources: {'x:y': {}}}}", env={})
        assert not config.servers["a"].prompts["p"].available_on_public_internet
        policy = Policy.from_config(config)
        assert policy.servers["a"].has_item_rules
        assert not policy.servers["a"].item_visible("prompt", "p", Placement("external",
                                                                              frozenset()))
