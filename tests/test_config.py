"""Config loading: documented defaults, secrets, and errors that name their key path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import SecretStr

from ext_authz.errors import ConfigError
from ext_authz.policy.config import (
    DEFAULT_INTERNAL_RANGES,
    TokenExchangeSettings,
    config_warnings,
    example_config,
    load_config,
    parse_yaml,
)
from tests.certs import make_certs

MINIMAL = """
servers:
  github:
    oauth2:
      token_url: https://idp.example.com/oauth2/token
      client_id: mcp-gateway
      client_secret: ${GITHUB_MCP_SECRET}
      scopes: [repo.read]
  billing-db:
    available_on_public_internet: false
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_yaml(text, env=env or {})
    return raised.value.problems


class TestDefaults:
    def test_documented_defaults(self) -> None:
        """Listen addresses, internal ranges, routing and token timings are the documented ones."""
        config = parse_yaml(MINIMAL, env={"GITHUB_MCP_SECRET": "s"})
        assert config.grpc.listen == "127.0.0.1:9191"
        assert config.admin is not None
        assert config.admin.listen == "127.0.0.1:9192"
        assert config.network.internal_ranges == tuple(
            ipaddress.ip_network(c) for c in DEFAULT_INTERNAL_RANGES)
        assert config.network.trusted_proxies == ()
        assert config.routing.context_extension_key == "mcp_server"
        assert config.routing.path_prefix == "/mcp/"
        assert config.routing.host_suffix is None
        tokens = config.tokens
        assert (tokens.expiry_buffer_s, tokens.min_ttl_s, tokens.default_ttl_s,
                tokens.timeout_s) == (60, 10, 300, 5)
        github = config.servers["github"]
        assert github.available_on_public_internet is True
        assert github.oauth2 is not None
        assert github.oauth2.auth_method == "client_secret_basic"
        assert github.oauth2.secret() == "s"
        assert config.servers["billing-db"].available_on_public_internet is False

    def test_defaults_section_applies_to_servers(self) -> None:
        """`defaults.available_on_public_internet` is inherited unless a server sets its own."""
        config = parse_yaml("defaults: {available_on_public_internet: false}\n"
                            "servers: {a: {}, b: null, c: {available_on_public_internet: true}}")
        assert [s.available_on_public_internet for s in config.servers.values()] == [
            False, False, True]

    def test_admin_null_disables(self) -> None:
        """`admin: null` turns the admin listener off."""
        assert parse_yaml("admin: null").admin is None

    def test_config_is_immutable(self) -> None:
        """Config objects are frozen."""
        config = example_config()
        with pytest.raises(ValueError, match="frozen"):
            config.grpc.listen = "0.0.0.0:1"  # type: ignore[misc]

    def test_example_config(self) -> None:
        """The built-in example has a public and an internal-only server."""
        servers = example_config().servers
        assert {n: s.available_on_public_internet for n, s in servers.items()} == {
            "everything": True, "billing-db": False}


class TestSecrets:
    def test_secret_file(self, tmp_path: Path) -> None:
        """client_secret_file is read once, trailing newline stripped."""
        secret = tmp_path / "secret"
        secret.write_text("from-file\n")
        config = parse_yaml(f"""
servers:
  a:
    oauth2: {{token_url: "http://idp/t", client_id: c, client_secret_file: "{secret}"}}
""")
        assert config.servers["a"].oauth2 is not None
        assert config.servers["a"].oauth2.secret() == "from-file"

    def test_secret_not_in_repr(self) -> None:
        """A loaded secret does not show in the config's repr."""
        config = parse_yaml(MINIMAL, env={"GITHUB_MCP_SECRET": "hunter2-secret"})
        assert "hunter2-secret" not in repr(config)

    def test_dollar_escape(self) -> None:
        """`$$` is a literal dollar sign."""
        config = parse_yaml("""
servers:
  a: {oauth2: {token_url: "http://idp/t", client_id: c, client_secret: "p$$ss"}}
""")
        assert config.servers["a"].oauth2 is not None
        assert config.servers["a"].oauth2.secret() == "p$ss"


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (MINIMAL, "servers.github.oauth2.client_secret: environment variable"
                      " ${GITHUB_MCP_SECRET} is not set"),
            ("network: {internal_ranges: [10.0.0.1/8]}",
             "network.internal_ranges[0]: '10.0.0.1/8' is not a valid CIDR"),
            ("network: {trusted_proxies: [not-a-cidr]}", "network.trusted_proxies[0]:"),
            ("grpc: {listen: nowhere}", "grpc.listen:"),
            ("servers: {a: {available_on_public_internet: maybe}}",
             "servers.a.available_on_public_internet:"),
            ("servers: {a: {oauth2: {token_url: 'ftp://x', client_id: c, client_secret: s}}}",
             "servers.a.oauth2.token_url:"),
            ("servers: {a: {oauth2: {token_url: 'https://u:p@x/t', client_id: c,"
             " client_secret: s}}}", "servers.a.oauth2.token_url: must not carry"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c}}}",
             "servers.a.oauth2: set exactly one of client_secret"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s,"
             " auth_method: client_secret_jwt}}}", "servers.a.oauth2.auth_method:"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s,"
             " auth_method: private_key_jwt}}}",
             "servers.a.oauth2: auth_method private_key_jwt needs private_key_file"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s,"
             " auth_method: private_key_jwt, private_key_file: /k.pem}}}",
             "servers.a.oauth2: auth_method private_key_jwt signs with private_key_file"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s,"
             " private_key_file: /k.pem}}}",
             "servers.a.oauth2: private_key_file and key_id are for auth_method private_key_jwt"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c,"
             " auth_method: private_key_jwt, private_key: PEM}}}",
             "servers.a.oauth2: give the private key in a file"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s},"
             " token_exchange: {token_url: 'https://x/t', client_id: c, client_secret: s}}}",
             "servers.a: set oauth2 (the gateway's own token) or token_exchange"),
            ("servers: {a: {token_exchange: {token_url: 'https://x/t', client_id: c,"
             " client_secret: s}}}", "servers.a.token_exchange: needs `jwt`"),
            ("jwt: {issuer: i, jwks_file: /j, header: x-token}\n"
             "servers: {a: {token_exchange: {token_url: 'https://x/t', client_id: c,"
             " client_secret: s}}}",
             "servers.a.token_exchange.subject_token: the caller's token is exchanged from"),
            ("servers: {a: {token_exchange: {token_url: 'https://x/t', client_id: c,"
             " client_secret: s, subject_token: header}}}",
             "servers.a.token_exchange.subject_token:"),
            ("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c, client_secret: s,"
             " scopes: ['a b']}}}", "servers.a.oauth2.scopes:"),
            ("servers: {a: {visible: true}}", "servers.a.visible: is not a setting here"),
            ("servers: {'bad/name': {}}", "servers: server name 'bad/name'"),
            ("tokens: {timeout_s: 0}", "tokens.timeout_s:"),
            ("routing: {path_prefix: mcp}", "routing.path_prefix:"),
            ("routing: {registry_path: servers}", "routing.registry_path: 'servers' must be"),
            ("routing: {registry_path: '/mcp?x'}", "routing.registry_path: '/mcp?x' must be"),
            ("routing: {registry_path: /.well-known/mcp}", "routing.registry_path:"),
            ("routing: {registry_path: /mcp/list}",
             "routing: registry_path '/mcp/list' is under path_prefix '/mcp/'"),
            ("servers: {a: {title: ''}}", "servers.a.title:"),
            ("servers: {a: {description: 7}}", "servers.a.description:"),
            ("grpc: {tls: {cert_file: /nonexistent.pem, key_file: /nonexistent.key}}",
             "grpc.tls.cert_file: '/nonexistent.pem' is not a readable file"),
            ("servers: {a: {}}\nservers: {b: {}}", "(yaml) line 2, column 1: duplicate key"
                                                   " 'servers'"),
            ("servers: [a, b", "(yaml) line 1, column 15:"),
            ("- a\n- b", "(top level): expected a mapping"),
            ("network: {networks: {internal: [10.0.0.0/8]}}",
             "network.networks: 'internal' is a built-in network name"),
            ("network: {networks: {p: [10.0.0.1/8]}}",
             "network.networks.p.cidrs[0]: '10.0.0.1/8' is not a valid CIDR"),
            ("network: {networks: {'9x': [10.0.0.0/8]}}", "network name '9x' must be"),
            ("servers: {a: {visible_to: [p]}}\nnetwork: {networks: {p: [10.0.0.0/8]}}",
             "servers.a.visible_to: only a server with available_on_public_internet: false"),
            ("servers: {a: {available_on_public_internet: false, visible_to: [partner]}}",
             "servers.a.visible_to[0]: unknown network 'partner' (known: internal)"),
            ("servers: {a: {available_on_public_internet: false,"
             " tools: {t: {available_on_public_internet: true}}}}",
             "servers.a.tools.t.available_on_public_internet: a tool of an internal-only"),
            ("servers: {a: {tools: {t: {visible_to: [internal]}}}}",
             "servers.a.tools.t.visible_to: only a tool with available_on_public_internet"),
            ("servers: {a: {tools: {t: {available_on_public_internet: false,"
             " visible_to: [nope]}}}}", "servers.a.tools.t.visible_to[0]: unknown network"),
            ("network: {networks: {p: [10.0.0.0/8]}}\nservers: {a: {available_on_public_"
             "internet: false, tools: {t: {visible_to: [p]}}}}",
             "servers.a.tools.t.visible_to[0]: network 'p' cannot see server 'a'"),
            ("servers: {a: {tools: {'bad name': {}}}}", "servers.a.tools: tool name"),
            ("servers: {a: {unknown_tool_reply: silence}}", "servers.a.unknown_tool_reply:"),
            ("mcp: {max_batch_messages: 0}", "mcp.max_batch_messages:"),
        ],
    )
    def test_error_names_key_path(self, text: str, expected: str) -> None:
        """Every error names the key path and what is wrong with it."""
        found = problems(text)
        assert any(p.startswith(expected) or expected in p for p in found), found

    def test_every_bad_cidr_is_named_with_its_index(self) -> None:
        """Each bad entry of a list is its own problem, at its index, in our words."""
        found = problems("network: {internal_ranges: [10.0.0.0/8, 10.0.0.1/8, nope],"
                         " trusted_proxies: [x]}")
        assert [p.split(":", 1)[0] for p in found] == [
            "network.internal_ranges[1]", "network.internal_ranges[2]",
            "network.trusted_proxies[0]"]
        assert not any("Value error" in p for p in found)

    @pytest.mark.parametrize("value", ['"yes"', "yes", "on", '"off"', "1", "0", '"true"', "y"])
    def test_security_booleans_are_true_or_false(self, value: str) -> None:
        """available_on_public_internet takes true or false only: nothing is coerced."""
        for text in (f"servers: {{a: {{available_on_public_internet: {value}}}}}",
                     f"defaults: {{available_on_public_internet: {value}}}",
                     "servers: {a: {tools: {t: {available_on_public_internet: "
                     f"{value}}}}}}}}}"):
            found = problems(text)
            assert any("available_on_public_internet: must be true or false" in p
                       for p in found), found

    def test_an_unset_variable_is_one_problem_among_the_others(self) -> None:
        """An unset ${VAR} does not hide the other mistakes, nor add one of its own."""
        found = problems("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c,"
                         " client_secret: '${S}'}}}\ngrpc: {listen: x}\nbogus: 1")
        assert found == ["servers.a.oauth2.client_secret: environment variable ${S} is not set",
                         "grpc.listen: 'x' is not host:port or unix:/path",
                         "bogus: is not a setting here (misspelt, or in the wrong section?)"]

    @pytest.mark.parametrize(
        ("secret", "env", "expected"),
        [("${S:-fallback}", {}, "fallback"), ("${S:-fallback}", {"S": ""}, "fallback"),
         ("${S:-fallback}", {"S": "set"}, "set"), ("a$$b", {}, "a$b"),
         ("${S}x", {"S": "y"}, "yx")],
    )
    def test_variables_with_defaults(self, secret: str, env: dict[str, str],
                                     expected: str) -> None:
        """${VAR:-default} takes the default when VAR is unset or empty, as a shell does."""
        config = parse_yaml("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c,"
                            f" client_secret: '{secret}'}}}}}}", env=env)
        assert config.servers["a"].oauth2 is not None
        assert config.servers["a"].oauth2.secret() == expected

    @pytest.mark.parametrize("secret", ["$S", "pa$s", "${S", "${S:?missing}", "$"])
    def test_a_lone_dollar_is_refused(self, secret: str) -> None:
        """"$S" would be a variable to a shell and text to us: refused, saying how to write it."""
        found = problems("servers: {a: {oauth2: {token_url: 'https://x/t', client_id: c,"
                         f" client_secret: '{secret}'}}}}}}", env={"S": "x"})
        assert any("a lone '$'" in p for p in found), found

    def test_whole_internet_warnings(self) -> None:
        """0.0.0.0/0 or ::/0 as trusted proxies or an internal range: valid, but warned of."""
        config = parse_yaml("network: {trusted_proxies: ['0.0.0.0/0'],"
                            " internal_ranges: ['10.0.0.0/8', '::/0']}\nservers: {a: {}}")
        assert [w.split(":", 1)[0] for w in config_warnings(config)] == [
            "network.trusted_proxies[0]", "network.internal_ranges[1]"]
        assert config_warnings(example_config()) == []

    def test_a_copy_derives_nothing_from_the_secret_before_it(self) -> None:
        """load_config reads a secret file into a copy of the settings: a cache key or an
        actor worked out before must not carry over (pydantic copies cached properties)."""
        settings = TokenExchangeSettings(token_url="https://x/t", client_id="c",
                                         client_secret="old", actor_token=True)
        key, actor = settings.cache_key, settings.actor
        assert actor is not None
        copied = settings.model_copy(update={"client_secret": SecretStr("new")})
        assert copied.cache_key != key
        assert copied.actor is not None
        assert copied.actor.secret() == "new"
        assert settings.actor is actor  # the original keeps its own

    def test_an_exchange_of_any_audience_is_warned_of(self) -> None:
        """A token exchange with no jwt.audiences would take the issuer's tokens for any
        other service too: valid, but warned of; naming the audience silences it."""
        text = ("jwt: {issuer: https://login, jwks_file: /j%s}\n"
                "servers: {a: {token_exchange: {token_url: 'https://x/t', client_id: c,"
                " client_secret: s}}}")
        assert [w.split(":", 1)[0] for w in config_warnings(parse_yaml(text % ""))] == [
            "jwt.audiences"]
        assert config_warnings(parse_yaml(text % ", audiences: [gw]")) == []

    def test_not_utf8_is_one_line(self, tmp_path: Path) -> None:
        """A config file that is not UTF-8 is a ConfigError naming the byte."""
        path = tmp_path / "c.yaml"
        path.write_bytes(b"servers: {a: {}}\n# caf\xe9\n")
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert raised.value.problems == ["(file): not UTF-8 text (byte 22 is 0xe9)"]

    def test_dry_runs_need_no_secrets(self, tmp_path: Path) -> None:
        """secrets=False: unset variables and unreadable secret files are no problem."""
        config = parse_yaml(f"""
servers:
  a: {{oauth2: {{token_url: "http://i/t", client_id: c, client_secret: "${{NOPE}}"}}}}
  b: {{oauth2: {{token_url: "http://i/t", client_id: c, client_secret_file: "{tmp_path}/x"}}}}
""", env={}, secrets=False)
        assert set(config.servers) == {"a", "b"}

    def test_tls_key_that_does_not_match_its_certificate(self, tmp_path: Path) -> None:
        """Said at load time, naming the key, not later as "cannot listen"."""
        certs = make_certs(tmp_path)
        found = problems(f"grpc: {{tls: {{cert_file: '{certs.server_cert}',"
                         f" key_file: '{certs.client_key}'}}}}")
        assert found == [f"grpc.tls.key_file: '{certs.client_key}' does not match"
                         " grpc.tls.cert_file"]
        found = problems(f"grpc: {{tls: {{cert_file: '{certs.server_cert}',"
                         f" key_file: '{certs.server_key}',"
                         f" client_ca_file: '{certs.server_key}'}}}}")
        assert found[0].startswith("grpc.tls.client_ca_file:")
        parse_yaml(f"grpc: {{tls: {{cert_file: '{certs.server_cert}',"
                   f" key_file: '{certs.server_key}', client_ca_file: '{certs.ca}'}}}}")

    def test_tools_inherit_their_server(self) -> None:
        """A tool without available_on_public_internet takes its server's value."""
        config = parse_yaml("""
network: {networks: {p: [192.0.2.0/24]}}
servers:
  open: {tools: {t: null, u: {available_on_public_internet: false, visible_to: [p]}}}
  closed: {available_on_public_internet: false, visible_to: [p], tools: {t: {}}}
""", env={})
        open_tools, closed_tools = config.servers["open"].tools, config.servers["closed"].tools
        assert open_tools["t"].available_on_public_internet is True
        assert open_tools["u"].visible_to == ("p",)
        assert closed_tools["t"].available_on_public_internet is False
        assert config.network.named()[0][0] == "internal"

    def test_duplicate_key_is_an_error(self) -> None:
        """A key given twice is refused rather than silently keeping the last."""
        assert any("duplicate key 'servers'" in p
                   for p in problems("servers: {a: {}}\nservers: {b: {}}"))

    def test_all_errors_reported_at_once(self) -> None:
        """Several mistakes are all listed, not just the first."""
        found = problems("grpc: {listen: x}\ntokens: {timeout_s: -1}\nbogus: 1")
        assert len(found) == 3

    def test_unreadable_secret_file(self, tmp_path: Path) -> None:
        """A missing secret file names its key and path."""
        found = problems(f"""
servers:
  a: {{oauth2: {{token_url: "http://i/t", client_id: c, client_secret_file: "{tmp_path}/nope"}}}}
""")
        assert found[0].startswith("servers.a.oauth2.client_secret_file: cannot read")

    @pytest.mark.parametrize(("text", "expected"), [
        ("", "(file): empty: a config names its MCP servers under `servers`"),
        ("# only a comment\n", "(file): empty:"),
        ("grpc: {listen: 9191}",
         "grpc.listen: give host:port (e.g. 127.0.0.1:9191), not a bare port"),
        ("admin: {listen: 9192}", "admin.listen: give host:port (e.g. 127.0.0.1:9192)"),
        ("network: {networks: {partners: 10.0.0.0/8}}",
         "network.networks.partners: write a network as a list of CIDRs ([10.0.0.0/8])"),
        ("grpc: {listen: '127.0.0.1:9191'}\nadmin: {listen: '127.0.0.1:9191'}",
         "admin.listen: 127.0.0.1:9191 is where grpc.listen (127.0.0.1:9191) listens too"),
        ("grpc: {listen: '0.0.0.0:7000', allow_unauthenticated: true}\n"
         "admin: {listen: '127.0.0.1:7000'}", "admin.listen: 127.0.0.1:7000 is where"),
        ("grpc: {listen: 'unix:/run/s'}\nadmin: {listen: 'unix:/run/s'}",
         "admin.listen: unix:/run/s is where"),
        ("servers: {a: {\n", "(yaml) line 2, column 1: expected the node content, but found"),
    ])
    def test_one_line_for_each_common_slip(self, tmp_path: Path, text: str,
                                           expected: str) -> None:
        """Each as validate says it, for the file (never "<unicode string>"), and nothing
        else: no second, knock-on problem."""
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(path, env={})
        assert len(raised.value.problems) == 1, raised.value.problems
        assert raised.value.problems[0].startswith(expected), raised.value.problems
        assert "unicode string" not in str(raised.value)

    @pytest.mark.parametrize("text", [
        "grpc: {listen: '127.0.0.1:9191'}\nadmin: {listen: '127.0.0.1:9192'}",
        "grpc: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}",  # any free port
        "grpc: {listen: '127.0.0.1:9191'}\nadmin: {listen: '127.0.0.2:9191'}",
    ])
    def test_listeners_apart_are_fine(self, text: str) -> None:
        assert parse_yaml(text + "\nservers: {a: {}}", env={}).admin is not None

    def test_no_server_is_a_warning(self) -> None:
        assert "servers: none configured" in config_warnings(parse_yaml("servers: {}", env={}))[0]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is a ConfigError, not a traceback."""
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(tmp_path / "absent.yaml")


class TestExposure:
    """Whoever reaches the gRPC listener reads every token: beyond loopback, mTLS or a word."""

    @pytest.mark.parametrize("listen", ["127.0.0.1:9191", "127.0.0.2:9", "localhost:9191",
                                        "[::1]:9191", "unix:/run/sidecar.sock"])
    def test_this_host_only_is_fine(self, listen: str) -> None:
        assert parse_yaml(f"grpc: {{listen: '{listen}'}}", env={}).grpc.listen == listen

    @pytest.mark.parametrize("listen", ["0.0.0.0:9191", "[::]:9191", "10.0.0.5:9191",
                                        "sidecar.internal:9191"])
    def test_beyond_it_is_refused_in_one_line(self, listen: str) -> None:
        [problem] = problems(f"grpc: {{listen: '{listen}'}}")
        assert problem.startswith(f"grpc.listen: {listen} is reachable beyond this host")
        assert "grpc.allow_unauthenticated: true" in problem

    def test_said_in_so_many_words(self) -> None:
        config = parse_yaml("grpc: {listen: '0.0.0.0:9191', allow_unauthenticated: true}",
                            env={})
        assert config.grpc.allow_unauthenticated
        # A security boolean: never "yes" coerced.
        refused = problems("grpc: {listen: '0.0.0.0:9191', allow_unauthenticated: 'yes'}")
        assert any(p.startswith("grpc.allow_unauthenticated:") for p in refused), refused


class TestStatusPageExposure:
    """The status page shows the config and recent callers: beyond loopback, a token."""

    def test_beyond_loopback_without_a_token_is_refused_in_one_line(self) -> None:
        [problem] = problems("admin: {listen: '0.0.0.0:9192'}")
        assert problem.startswith("admin.listen: 0.0.0.0:9192 is reachable beyond this host")
        assert "admin.auth.token_file" in problem

    @pytest.mark.parametrize("admin", ["{listen: '127.0.0.1:9192'}",
                                       "{listen: '0.0.0.0:9192', page: false}",
                                       "{listen: 'unix:/run/admin.sock'}"])
    def test_loopback_or_no_page_needs_none(self, admin: str) -> None:
        assert parse_yaml(f"admin: {admin}\nservers: {{a: {{}}}}", env={}).admin is not None

    def test_the_token_file_is_read_and_checked(self, tmp_path: Path) -> None:
        short = tmp_path / "short"
        short.write_text("abc\n")
        found = problems(f"admin: {{listen: '0.0.0.0:9192', auth: {{token_file: '{short}'}}}}")
        assert found == [f"admin.auth.token_file: '{short}' holds 3 characters; give at"
                         " least 16 (e.g. `openssl rand -hex 32 > FILE`)"]
        missing = problems("admin: {listen: '0.0.0.0:9192', auth: {token_file: /nope}}")
        assert missing[0].startswith("admin.auth.token_file: cannot read '/nope'")

    def test_the_token_is_read_from_its_file_only(self, tmp_path: Path) -> None:
        path = tmp_path / "token"
        path.write_text("  0123456789abcdef0123\n")
        config = parse_yaml(f"admin: {{auth: {{token_file: '{path}'}}}}\nservers: {{a: {{}}}}",
                            env={})
        assert config.admin is not None
        assert config.admin.auth is not None
        assert config.admin.auth.token is not None
        assert config.admin.auth.token.get_secret_value() == "0123456789abcdef0123"
        assert "0123456789abcdef0123" not in repr(config)
        [problem] = problems(f"admin: {{auth: {{token_file: '{path}', token: x}}}}")
        assert problem.startswith("admin.auth: give the token in a file, as token_file")
