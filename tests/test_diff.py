"""`diff OLD NEW`: who gains or loses what, judged as requests are judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.errors import ConfigError
from ext_authz.policy.compile import Policy
from ext_authz.policy.decision import RequestFacts, decide, decide_items
from ext_authz.policy.diff import Cell, Item, cell, diff, items, placement
from ext_authz.policy.network import EXTERNAL, INTERNAL
from tests.conftest import make_config
from tests.test_items import body, message

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = {"available_on_public_internet": False}
NETWORK = {"internal_ranges": ["10.0.0.0/8"],
           "networks": {"partners": ["198.51.100.0/24"],
                        "agents": {"principals": ["spiffe://td/ns/a/sa/*"]}}}
BASE: dict[str, Any] = {
    "network": NETWORK,
    "servers": {
        "pub": {"tools": {"delete": HIDDEN}, "prompts": {"*": HIDDEN, "hello": {}},
                "resources": {"file:///{name}": {}, "*": HIDDEN}},
        "crm": {**HIDDEN, "visible_to": ["partners"]},
    },
}


def policy(data: dict[str, Any]) -> Policy:
    return Policy.from_config(make_config(**data))


def changed(data: dict[str, Any], edit: Any) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(data))
    edit(copy)
    return copy


def summary(old: dict[str, Any], new: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {(c.caller, c.item.label, c.before.seen, c.after.seen)
            for c in diff(policy(old), policy(new)).changes}


def set_path(path: str, value: Any) -> Any:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            del node[last]
        else:
            node[last] = value
    return edit


class TestTable:
    @pytest.mark.parametrize(("edit", "expected", "widens_external"), [
        pytest.param(lambda d: None, set(), False, id="nothing"),
        pytest.param(lambda d: d["servers"].update(crm={}),
                     {(c, "servers.crm", "hidden", "visible") for c in ("external", "agents")},
                     True, id="server-made-public"),
        pytest.param(set_path("servers.pub.available_on_public_internet", False),
                     {(c, "servers.pub", "visible", "hidden")
                      for c in ("external", "partners", "agents")}
                     # its rules widen nothing but go with it
                     | {(c, f"servers.pub.{k}", "visible", "hidden")
                        for c in ("external", "partners", "agents")
                        for k in ("prompts.hello", "resources.file:///{name}")},
                     False, id="server-made-internal"),
        pytest.param(set_path("servers.crm.visible_to", ["partners", "agents"]),
                     {("agents", "servers.crm", "hidden", "visible")}, False,
                     id="visible-to-widened"),
        pytest.param(set_path("servers.crm.visible_to", []),
                     {("partners", "servers.crm", "visible", "hidden")}, False,
                     id="visible-to-narrowed"),
        pytest.param(set_path("servers.pub.tools.delete", None),
                     {(c, "servers.pub.tools.delete", "hidden", "visible")
                      for c in ("external", "partners", "agents")}, True,
                     id="tool-rule-removed"),
        pytest.param(set_path("servers.pub.tools.export", {**HIDDEN, "visible_to": ["agents"]}),
                     {(c, "servers.pub.tools.export", "visible", "hidden")
                      for c in ("external", "partners")}, False, id="tool-rule-added"),
        pytest.param(set_path("servers.pub.prompts.*", None),
                     {(c, "servers.pub.prompts.*", "hidden", "visible")
                      for c in ("external", "partners", "agents")}, True,
                     id="prompt-default-removed"),
        pytest.param(set_path("servers.pub.resources.file:///{name}", HIDDEN),
                     {(c, "servers.pub.resources.file:///{name}", "visible", "hidden")
                      for c in ("external", "partners", "agents")}, False,
                     id="resource-template-hidden"),
        pytest.param(set_path("servers.new", {}),
                     {(c, "servers.new", "absent", "visible")
                      for c in ("external", "internal", "partners", "agents")}, True,
                     id="public-server-added"),
        pytest.param(set_path("servers.new", HIDDEN),
                     {("internal", "servers.new", "absent", "visible")}, False,
                     id="internal-server-added"),
        pytest.param(set_path("servers.crm", None),
                     {(c, "servers.crm", "visible", "absent")
                      for c in ("internal", "partners")}, False, id="server-removed"),
    ])
    def test_changes(self, edit: Any, expected: set[tuple[str, str, str, str]],
                     widens_external: bool) -> None:
        new = changed(BASE, edit)
        found = diff(policy(BASE), policy(new))
        assert summary(BASE, new) == expected
        assert found.widens_external is widens_external
        # Widening external access comes first.
        flags = [c.widens_external for c in found.changes]
        assert flags == sorted(flags, reverse=True)

    def test_the_deciding_rule_is_named(self) -> None:
        new = changed(BASE, set_path("servers.crm.visible_to", ["agents"]))
        by_caller = {c.caller: c for c in diff(policy(BASE), policy(new)).changes}
        assert by_caller["agents"].after == Cell("visible", "servers.crm.visible_to")
        assert by_caller["partners"].before == Cell("visible", "servers.crm.visible_to")
        assert by_caller["partners"].after == Cell("hidden", "servers.crm.visible_to")

    def test_a_network_removed_leaves_its_callers_outside(self) -> None:
        new = changed(BASE, lambda d: (d["network"]["networks"].pop("partners"),
                                       d["servers"]["crm"].update(visible_to=[])))
        found = diff(policy(BASE), policy(new))
        assert {(c.caller, c.item.label, c.after.seen) for c in found.changes} == {
            ("partners", "servers.crm", "hidden")}
        assert [(m.network, m.what, m.removed) for m in found.memberships] == [
            ("partners", "network", ("defined",)), ("partners", "addresses", ("198.51.100.0/24",))]


class TestMemberships:
    @pytest.mark.parametrize(("edit", "expected", "widens_external"), [
        pytest.param(set_path("network.internal_ranges", ["10.0.0.0/8", "0.0.0.0/0"]),
                     [("internal", "addresses", ("0.0.0.0/5", "8.0.0.0/7", "11.0.0.0/8",
                                                 "12.0.0.0/6", "16.0.0.0/4", "32.0.0.0/3",
                                                 "64.0.0.0/2", "128.0.0.0/1"), ())],
                     True, id="internal-everywhere"),
        pytest.param(set_path("network.internal_ranges", ["10.0.0.0/9", "10.128.0.0/9"]),
                     [], False, id="same-addresses-split"),
        pytest.param(set_path("network.internal_ranges", ["10.0.0.0/16"]),
                     [("internal", "addresses", (), ("10.1.0.0/16", "10.2.0.0/15",
                                                     "10.4.0.0/14", "10.8.0.0/13",
                                                     "10.16.0.0/12", "10.32.0.0/11",
                                                     "10.64.0.0/10", "10.128.0.0/9"))],
                     False, id="internal-narrowed"),
        pytest.param(set_path("network.trusted_proxies", ["192.0.2.1/32"]),
                     [("trusted_proxies", "addresses", ("192.0.2.1/32",), ("127.0.0.3/32",))],
                     True, id="proxy-trusted"),
        pytest.param(set_path("network.networks.agents.principals", ["spiffe://td/*"]),
                     [("agents", "principals", ("spiffe://td/*",), ("spiffe://td/ns/a/sa/*",))],
                     False, id="principals-agents-see-nothing-extra"),
        pytest.param(lambda d: (d.update(jwt={"issuer": "i", "jwks_uri": "https://idp/j"}),
                                set_path("network.networks.partners", {
                                    "cidrs": ["198.51.100.0/24"],
                                    "jwt_claims": {"org": ["acme"]}})(d)),
                     [("partners", "claim org", ("acme",), ())], True,
                     id="claim-joins-a-class-that-sees-more"),
    ])
    def test_who_belongs_where(self, edit: Any, expected: list[tuple[str, str, Any, Any]],
                               widens_external: bool) -> None:
        data = changed(BASE, lambda d: d["network"].update(trusted_proxies=["127.0.0.3/32"]))
        new = changed(data, edit)
        found = diff(policy(data), policy(new))
        assert [(m.network, m.what, m.added, m.removed) for m in found.memberships] == expected
        assert found.widens_external is widens_external


# -- the diff's cells are what requests get ---------------------------------------------

ADDRESSES = {EXTERNAL: "203.0.113.9", INTERNAL: "10.1.2.3", "partners": "198.51.100.7",
             "crew": "192.0.2.7"}
rules = st.fixed_dictionaries({}, optional={
    "available_on_public_internet": st.booleans(),
    "visible_to": st.lists(st.sampled_from(["partners", "crew"]), unique=True, max_size=2)})
servers = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.fixed_dictionaries(
    {}, optional={"available_on_public_internet": st.booleans(),
                  "visible_to": st.lists(st.sampled_from(["partners", "crew"]), unique=True),
                  "tools": st.dictionaries(st.sampled_from(["t1", "t2", "*"]), rules,
                                           max_size=3)}), min_size=1)


def _valid(data: dict[str, Any]) -> Policy | None:
    try:
        return policy(data)
    except ConfigError:  # a combination validation refuses
        return None


def _request(policy: Policy, caller: str, item: Item) -> bool:
    server = decide(RequestFacts(ADDRESSES[caller], None, f"/mcp/{item.server}", "gw"),
                    policy)
    if item.kind == "server" or not server.allowed:
        return server.allowed and server.reason == "allowed"
    name = "some-other-tool" if item.key == "*" else item.key
    call = message("tools/call", {"name": name, "arguments": {}})
    return decide_items(server, body(call), policy, can_rename=True).reason == "allowed"


@settings(max_examples=150, deadline=None)
@given(servers)
def test_cells_are_what_requests_get(servers: dict[str, Any]) -> None:
    """For every caller class and every server and tool rule: `visible` exactly when a
    request from that class is allowed (a hidden tool's call goes on renamed: not visible)."""
    compiled = _valid({"network": {"internal_ranges": ["10.0.0.0/8"], "networks": {
        "partners": ["198.51.100.0/24"], "crew": ["192.0.2.0/24"]}}, "servers": servers})
    if compiled is None:
        return
    for caller in ADDRESSES:
        for item in items(compiled):
            seen = cell(compiled, item, placement(compiled, caller)).seen
            assert (seen == "visible") is _request(compiled, caller, item), (caller, item)
    assert not diff(compiled, compiled)


CLIENT = {"token_url": "https://idp.example/t", "client_id": "gw", "client_secret": "s"}
JWT = {"issuer": "https://login.example", "audiences": ["gw"], "jwks_file": "/jwks.json"}


def test_a_change_of_what_the_upstream_gets_is_listed_and_widens_nothing() -> None:
    """oauth2 -> token_exchange -> neither: whose token the upstream holds, per server."""
    gateway = changed(BASE, set_path("servers.crm.oauth2", CLIENT))
    exchanged = changed(BASE, lambda data: data.update(jwt=JWT) or data["servers"]["crm"]
                        .update(token_exchange=CLIENT))
    found = diff(policy(gateway), policy(exchanged))
    assert [(c.server, c.before, c.after, c.passes_callers_on) for c in found.credentials] == [
        ("crm", "gateway", "exchanged", False)]
    assert found
    assert not found.changes
    assert not found.widens_external
    onward = diff(policy(exchanged), policy(BASE)).credentials
    assert [(c.before, c.after, c.passes_callers_on) for c in onward] == [
        ("exchanged", "caller", True)]
    assert not diff(policy(gateway), policy(gateway)).credentials


class TestCommand:
    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ext_authz", "diff", *argv],
                              capture_output=True, text=True, timeout=60, check=False,
                              cwd=ROOT)

    def write(self, tmp_path: Path, name: str, data: dict[str, Any]) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def test_compose_config_with_one_server_made_public(self, tmp_path: Path) -> None:
        old = ROOT / "envoy/compose/sidecar.yaml"
        text = old.read_text().replace(
            "  internal:\n    available_on_public_internet: false",
            "  internal:\n    available_on_public_internet: true")
        new = tmp_path / "new.yaml"
        new.write_text(text)
        shown = self.run(str(old), str(new))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[1:] == [
            "! external  gains  servers.internal  (hidden -> visible;"
            " servers.internal.available_on_public_internet)"]
        gate = self.run(str(old), str(new), "--fail-on-widening", "--json")
        assert gate.returncode == 1
        assert json.loads(gate.stdout)["widens_external"] is True

    def test_narrowing_passes_the_gate(self, tmp_path: Path) -> None:
        old = self.write(tmp_path, "old.yaml", BASE)
        new = self.write(tmp_path, "new.yaml", changed(BASE, set_path(
            "servers.pub.available_on_public_internet", False)))
        result = self.run(old, new, "--fail-on-widening")
        assert result.returncode == 0
        assert "! " not in result.stdout
        assert "external  loses  servers.pub" in result.stdout

    def test_a_credential_change_is_said(self, tmp_path: Path) -> None:
        old = self.write(tmp_path, "old.yaml", changed(BASE, set_path("servers.crm.oauth2",
                                                                      CLIENT)))
        new = self.write(tmp_path, "new.yaml", BASE)
        result = self.run(old, new, "--fail-on-widening")
        assert result.returncode == 0  # not a widening of who sees what
        assert result.stdout.splitlines() == [
            "0 change(s) in who sees what, 0 in who belongs where; 0 widen(s) what external"
            " callers see; 1 in what upstreams get",
            "  servers.crm upstream Authorization: the gateway's own token (oauth2) -> each"
            " caller's own, passed on"]

    def test_no_change_is_one_line(self, tmp_path: Path) -> None:
        old = self.write(tmp_path, "old.yaml", BASE)
        result = self.run(old, old, "--fail-on-widening")
        assert (result.returncode, result.stdout) == (0, "no change in who sees what\n")

    def test_an_invalid_config_exits_2_with_validates_messages(self, tmp_path: Path) -> None:
        old = self.write(tmp_path, "old.yaml", BASE)
        bad = self.write(tmp_path, "bad.yaml", changed(
            BASE, set_path("servers.crm.visible_to", ["nobody"])))
        result = self.run(old, bad)
        validate = subprocess.run([sys.executable, "-m", "ext_authz", "validate", "--config",
                                   bad], capture_output=True, text=True, timeout=60,
                                  check=False)
        assert result.returncode == validate.returncode == 2
        assert result.stderr == validate.stderr
        assert "servers.crm.visible_to[0]" in result.stderr
