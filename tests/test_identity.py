"""Identities in network rules: validation, placement, where the sidecar reads them, rendering.

tests/e2e/test_identities.py proves the same through a real Envoy in both data paths.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2
from ext_authz.contract import JWT_FILTER as JWT_AUTHN_NAMESPACE
from ext_authz.edges.check_request import extract_facts
from ext_authz.errors import ConfigError
from ext_authz.policy.compile import Policy
from ext_authz.policy.config import parse_config
from ext_authz.policy.decision import decide
from ext_authz.policy.network import Identity, IdentityRule, NetworkMap

TD = "spiffe://cluster.local"
JWT = {"issuer": "https://idp.example", "jwks_file": "/etc/jwks.json"}


def config(networks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"network": {"internal_ranges": ["10.0.0.0/8"], "networks": networks},
            "servers": {"billing": {"available_on_public_internet": False,
                                    "visible_to": list(networks)}}, **extra}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(data, env={})
    return raised.value.problems


class TestValidation:
    @pytest.mark.parametrize("principal", [
        f"{TD}/ns/ai/sa/bot", f"{TD}/ns/ai/sa/*", f"{TD}/*", TD, "spiffe://td.example/a/b/c"])
    def test_good_principals(self, principal: str) -> None:
        parse_config(config({"agents": {"principals": [principal]}}), env={})

    @pytest.mark.parametrize(("principal", "why"), [
        (f"{TD}/ns/*/sa/bot", "'*' may stand only for a whole last path segment"),
        (f"{TD}/ns/ai/sa/bot-*", "'*' may stand only for a whole last path segment"),
        (f"{TD}/ns/ai/sa/**", "'*' may stand only for a whole last path segment"),
        ("spiffe://*/ns/ai", "'*' may stand only for a whole last path segment"),
        ("https://cluster.local/ns/ai", "is not a SPIFFE ID"),
        ("spiffe://Cluster.Local/ns/ai", "is not a SPIFFE ID"),
        (f"{TD}/ns//sa", "is not a SPIFFE ID"),
        ("*", "'*' may stand only"),
    ])
    def test_wildcards_only_as_the_last_segment(self, principal: str, why: str) -> None:
        [problem] = problems(config({"agents": {"principals": [principal]}}))
        assert problem.startswith("network.networks.agents.principals[0]")
        assert why in problem

    def test_claims_need_the_jwt_provider(self) -> None:
        [problem] = problems(config({"partners": {"jwt_claims": {"group": "partners"}}}))
        assert problem.startswith("network.networks.partners.jwt_claims: needs `jwt`")
        parse_config(config({"partners": {"jwt_claims": {"group": "partners"}}}, jwt=JWT),
                     env={})

    @pytest.mark.parametrize(("network", "key"), [
        ({"jwt_claims": {"group": []}}, "network.networks.p.jwt_claims"),
        ({"jwt_claims": {"bad name": "x"}}, "network.networks.p.jwt_claims"),
        ({"jwt_claims": {"group": [""]}}, "network.networks.p.jwt_claims"),
        ({}, "network.networks.p"),
        ({"cidrs": ["10.0.0.1/8"]}, "network.networks.p.cidrs[0]"),
        ({"principals": "spiffe://td/x"}, "network.networks.p.principals"),
    ])
    def test_bad_networks_name_the_key(self, network: dict[str, Any], key: str) -> None:
        found = problems(config({"p": network}, jwt=JWT))
        assert any(p.startswith(key) for p in found), found

    @pytest.mark.parametrize(("jwt", "why"), [
        ({"issuer": "i"}, "exactly one of jwks_uri"),
        ({"issuer": "i", "jwks_file": "/a", "jwks_uri": "https://x/j"}, "exactly one"),
        ({"issuer": "i", "jwks_uri": "idp.example/jwks"}, "must be an http(s):// URL"),
        ({"issuer": "", "jwks_file": "/a"}, "jwt.issuer"),
    ])
    def test_the_provider(self, jwt: dict[str, Any], why: str) -> None:
        found = problems(config({"p": {"jwt_claims": {"g": "x"}}}, jwt=jwt))
        assert any(why in p for p in found), found

    def test_a_list_is_cidrs(self) -> None:
        loaded = parse_config(config({"p": ["192.0.2.0/24"]}), env={})
        assert loaded.network.networks["p"].cidrs == (ipaddress.ip_network("192.0.2.0/24"),)


class TestPlacement:
    MAP = NetworkMap(
        [("internal", [ipaddress.ip_network("10.0.0.0/8")]),
         ("wide", []), ("narrow", []), ("exact", []), ("claims", [])],
        [("wide", IdentityRule.of([f"{TD}/*"], {})),
         ("narrow", IdentityRule.of([f"{TD}/ns/ai/sa/*"], {})),
         ("exact", IdentityRule.of([f"{TD}/ns/ai/sa/bot"], {})),
         ("claims", IdentityRule.of([], {"group": ["partners"], "sub": ["u1", "u2"]}))])

    def place(self, address: str | None = None, principal: str = "",
              **claims: tuple[str, ...]) -> tuple[str, set[str]]:
        found = self.MAP.place(ipaddress.ip_address(address) if address else None,
                               Identity(principal, tuple(sorted(claims.items()))))
        return found.name, set(found.members)

    def test_most_specific_names_the_caller(self) -> None:
        """An exact principal, then the longest wildcard, then a claim, then the address."""
        everything = {"narrow", "exact", "claims", "internal"}
        assert self.place("10.1.1.1", f"{TD}/ns/ai/sa/bot", group=("partners",)) == (
            "exact", everything)
        assert self.place(None, f"{TD}/ns/ai/sa/x") == ("narrow", {"narrow"})
        assert self.place(None, f"{TD}/other") == ("wide", {"wide"})
        assert self.place("10.1.1.1", sub=("u2",)) == ("claims", {"claims", "internal"})
        assert self.place("10.1.1.1") == ("internal", {"internal"})

    def test_a_wildcard_is_one_segment(self) -> None:
        """`spiffe://td/*` is a workload directly under the trust domain, not all of it."""
        assert self.place(None, f"{TD}/ns/ai/sa/bot/more") == ("external", set())
        assert self.place(None, f"{TD}/ns/ai/sa/") == ("external", set())
        assert self.place(None, "spiffe://cluster.local.evil/ns/ai/sa/x") == (
            "external", set())

    def test_claims_match_exactly_or_as_members(self) -> None:
        assert self.place(None, group=("staff", "partners"))[0] == "claims"
        assert self.place(None, group=("partners-x",))[0] == "external"
        assert self.place(None, other=("partners",))[0] == "external"


def check_request(principal: str = "", metadata: dict[str, Any] | None = None,
                  headers: dict[str, str] | None = None) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "198.51.100.9"
    attributes.source.principal = principal
    http = attributes.request.http
    http.method, http.path = "GET", "/mcp/billing"
    for name, value in (headers or {}).items():
        http.headers[name] = value
    attributes.context_extensions["mcp_server"] = "billing"
    for namespace, value in (metadata or {}).items():
        attributes.metadata_context.filter_metadata[namespace].CopyFrom(
            json_format.ParseDict(value, struct_pb2.Struct()))
    return request


class TestWhereTheSidecarReadsThem:
    POLICY = Policy.from_config(parse_config(config({
        "agents": {"principals": [f"{TD}/ns/ai/sa/*"]},
        "partners": {"jwt_claims": {"group": "partners"}}}, jwt=JWT), env={}))

    def decide(self, request: external_auth_pb2.CheckRequest) -> str:
        decision = decide(extract_facts(request, self.POLICY), self.POLICY)
        return f"{decision.reason}:{decision.network}"

    def test_principal_from_envoys_peer_only(self) -> None:
        assert self.decide(check_request(f"{TD}/ns/ai/sa/bot")) == "allowed:agents"
        forged = {"x-forwarded-client-cert": f"URI={TD}/ns/ai/sa/bot",
                  "x-spiffe-id": f"{TD}/ns/ai/sa/bot"}
        assert self.decide(check_request(headers=forged)) == "not_found:external"

    def test_claims_from_jwt_authn_metadata_only(self) -> None:
        verified = {JWT_AUTHN_NAMESPACE: {"mcp_ext_authz": {"group": ["a", "partners"]}}}
        assert self.decide(check_request(metadata=verified)) == "allowed:partners"
        elsewhere = {"envoy.filters.http.lua": {"mcp_ext_authz": {"group": "partners"}},
                     JWT_AUTHN_NAMESPACE: {"another_key": {"group": "partners"}}}
        assert self.decide(check_request(metadata=elsewhere)) == "not_found:external"
        header = {"x-jwt-payload": json.dumps({"group": "partners"})}
        assert self.decide(check_request(headers=header)) == "not_found:external"
        number = {JWT_AUTHN_NAMESPACE: {"mcp_ext_authz": {"group": 7}}}
        assert self.decide(check_request(metadata=number)) == "not_found:external"

    def test_remembered_per_identity(self) -> None:
        """The decision cache tells callers at one address apart by who they are."""
        assert self.decide(check_request(f"{TD}/ns/ai/sa/bot")) == "allowed:agents"
        assert self.decide(check_request(f"{TD}/ns/web/sa/x")) == "not_found:external"
        assert self.decide(check_request(f"{TD}/ns/ai/sa/bot")) == "allowed:agents"

    def test_no_identity_rules_read_nothing(self) -> None:
        plain = Policy.from_config(parse_config(config({"p": ["203.0.113.0/24"]}), env={}))
        facts = extract_facts(check_request(f"{TD}/ns/ai/sa/bot"), plain)
        assert not facts.identity


def render(tmp_path: Path, data: dict[str, Any], *argv: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run([sys.executable, "-m", "ext_authz", "envoy-config", "--config",
                           str(path), "--upstream", "billing=127.0.0.1:8000", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow  # a real Envoy or Python process per test
class TestRendering:
    TLS = ("--listen-cert", "/c.pem", "--listen-key", "/c.key", "--client-ca", "/ca.pem")

    def test_principals_need_client_certificates(self, tmp_path: Path) -> None:
        data = config({"agents": {"principals": [f"{TD}/ns/ai/sa/*"]}})
        refused = render(tmp_path, data)
        assert refused.returncode == 2
        assert "give --listen-cert, --listen-key and --client-ca" in refused.stderr
        rendered = yaml.safe_load(render(tmp_path, data, *self.TLS).stdout)
        [listener] = rendered["static_resources"]["listeners"]
        tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        assert tls["common_tls_context"]["validation_context"] == {
            "trusted_ca": {"filename": "/ca.pem"}}
        assert render(tmp_path, data, "--listen-cert", "/c.pem").returncode == 2

    def test_claims_bring_jwt_authn_and_the_metadata(self, tmp_path: Path) -> None:
        data = config({"partners": {"jwt_claims": {"group": "partners"}}},
                      jwt={**JWT, "audiences": ["gw"]})
        rendered = yaml.safe_load(render(tmp_path, data).stdout)
        manager = rendered["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"][0]["typed_config"]
        names = [f["name"] for f in manager["http_filters"]]
        assert names.index("envoy.filters.http.jwt_authn") < names.index(
            "envoy.filters.http.ext_authz")
        [jwt] = [f["typed_config"] for f in manager["http_filters"]
                 if f["name"] == "envoy.filters.http.jwt_authn"]
        provider = jwt["providers"]["mcp_ext_authz"]
        assert (provider["issuer"], provider["audiences"], provider["local_jwks"]) == (
            "https://idp.example", ["gw"], {"filename": "/etc/jwks.json"})
        assert provider["payload_in_metadata"] == "mcp_ext_authz"
        assert provider["forward"] is True
        assert jwt["rules"][0]["requires"]["requires_any"]["requirements"][1] == {
            "allow_missing_or_failed": {}}
        [authz] = [f["typed_config"] for f in manager["http_filters"]
                   if f["name"] == "envoy.filters.http.ext_authz"]
        assert authz["metadata_context_namespaces"] == ["envoy.filters.http.jwt_authn"]
        plain = yaml.safe_load(render(tmp_path, config({"p": ["192.0.2.0/24"]})).stdout)
        assert "envoy.filters.http.jwt_authn" not in json.dumps(plain)

    def test_a_remote_jwks_gets_a_cluster(self, tmp_path: Path) -> None:
        data = config({"partners": {"jwt_claims": {"group": "partners"}}}, jwt={
            "issuer": "https://idp.example", "jwks_uri": "https://idp.example/jwks.json"})
        rendered = yaml.safe_load(render(tmp_path, data).stdout)
        [jwks] = [c for c in rendered["static_resources"]["clusters"]
                  if c["name"] == "mcp_ext_authz_jwks"]
        assert jwks["transport_socket"]["typed_config"]["sni"] == "idp.example"

    def test_native_rbac_names_them(self) -> None:
        from envoy_data_plane.envoy.config.bootstrap.v3 import (
            Bootstrap,
            BootstrapStaticResources,
        )

        from ext_authz.render.bootstrap import render as render_yaml
        from ext_authz.render.native import snapshot as data_plane_resources
        from ext_authz.render.options import DataPlane, HostPort, ListenerTLS

        loaded = parse_config({**config({
            "agents": {"principals": [f"{TD}/ns/ai/sa/*", f"{TD}/ns/x/sa/y"]},
            "partners": {"jwt_claims": {"group": "partners"}}}, jwt=JWT),
            "servers": {"billing": {"upstream": "127.0.0.1:1",
                                    "available_on_public_internet": False,
                                    "visible_to": ["agents", "partners"]}}}, env={})
        plane = DataPlane(HostPort("127.0.0.1", 1), {},
                          listener_tls=ListenerTLS("/c", "/k", "/ca"))
        listener, _ = data_plane_resources(loaded, plane, watchdog=HostPort("127.0.0.1", 2))
        text = yaml.safe_load(render_yaml(Bootstrap(static_resources=BootstrapStaticResources(
            listeners=[listener]))))
        routes = text["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        [billing] = [r for r in routes if r["match"].get("path") == "/mcp/billing"]
        [policy] = billing["typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"][
            "rules"]["policies"].values()
        by_cidr, wildcard, exact, *claims = policy["principals"]
        assert "or_ids" in by_cidr  # the internal ranges, by address
        assert wildcard["authenticated"]["principal_name"] == {
            "safe_regex": {"regex": r"spiffe://cluster\.local/ns/ai/sa/[^/]+"}}
        assert exact["authenticated"]["principal_name"] == {"exact": f"{TD}/ns/x/sa/y"}
        matchers = [c["sourced_metadata"]["metadata_matcher"] for c in claims]
        assert [m["filter"] for m in matchers] == ["envoy.filters.http.jwt_authn"] * 2
        assert [m["path"] for m in matchers] == [
            [{"key": "mcp_ext_authz"}, {"key": "group"}]] * 2
        assert [list(m["value"]) for m in matchers] == [["string_match"], ["list_match"]]


class TestCheck:
    def run(self, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config({
            "agents": {"principals": [f"{TD}/ns/ai/sa/*"]},
            "partners": {"jwt_claims": {"group": "partners"}}}, jwt=JWT)))
        return subprocess.run([sys.executable, "-m", "ext_authz", "check", "--config",
                               str(path), "--peer", "198.51.100.9", "--path", "/mcp/billing",
                               *argv], capture_output=True, text=True, timeout=60, check=False)

    @pytest.mark.parametrize(("argv", "network", "identity"), [
        (["--principal", f"{TD}/ns/ai/sa/bot"], "agents",
         [f"agents by principal {TD}/ns/ai/sa/*"]),
        (["--jwt-claims", '{"group": ["x", "partners"], "sub": "u"}'], "partners",
         ["partners by JWT claim group=partners"]),
        ([], "external", []),
    ])
    def test_shows_what_matched(self, tmp_path: Path, argv: list[str], network: str,
                                identity: list[str]) -> None:
        report = json.loads(self.run(tmp_path, *argv).stdout)
        assert (report["network"], report["identity"]) == (network, identity)
        assert report["allowed"] is bool(identity)

    def test_bad_claims_json(self, tmp_path: Path) -> None:
        result = self.run(tmp_path, "--jwt-claims", "[1]")
        assert result.returncode == 2
        assert "--jwt-claims: give a JSON object" in result.stderr
