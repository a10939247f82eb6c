"""Typed, immutable configuration: YAML loading, `${VAR}` and `*_file` secrets, key-path errors."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError
from .network import EXTERNAL, INTERNAL, IdentityRule, IPNetwork

DEFAULT_INTERNAL_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)

SERVER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_])?$")
NETWORK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")  # MCP's tool-name alphabet
DEFAULT_TOOL = "*"  # the rule of every tool a server's `tools` does not list
# $$ is a dollar sign; ${VAR} and ${VAR:-default} come from the environment; any other $ is
# refused (a shell would read "$S" as a variable, we would have kept it as text).
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _parse_cidr(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a CIDR string")
    try:
        # strict=True: 10.0.0.1/8 would otherwise silently become 10.0.0.0/8; say so instead.
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid CIDR ({exc})") from None


# One CIDR of a list: an error names its index (`network.internal_ranges[1]`).
CIDR = Annotated[IPNetwork, BeforeValidator(_parse_cidr)]


def split_listen(listen: str) -> tuple[str, int]:
    """Split a validated `host:port` listen address (brackets kept on IPv6 hosts)."""
    host, _, port = listen.rpartition(":")
    return host, int(port)


def _parse_listen(value: str) -> str:
    if value.startswith("unix:"):
        if len(value) <= len("unix:"):
            raise ValueError("unix: needs a path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port or unix:/path")
    return value


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    """Where an MCP server listens: `host:port`, or a URL `http(s)://host[:port][/path]`.

    A URL names the server's MCP endpoint: its path replaces the gateway's `/mcp/NAME` (no
    path: `/`), and `https` means TLS with SNI. `host:port` is plain HTTP, the gateway's path
    forwarded unchanged.
    """

    host: str
    port: int
    scheme: Literal["http", "https"] | None = None  # None: given as host:port
    path: str | None = None  # the MCP endpoint's path (URLs only)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @classmethod
    def parse(cls, text: str) -> UpstreamAddress:
        """Parse `host:port` or an http(s) URL; ValueError saying what is wrong."""
        if "://" not in text:
            host, sep, port = text.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{text!r} is not host:port nor an http(s):// URL")
            return cls(host.strip("[]"), int(port))
        url = urllib.parse.urlsplit(text)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{text!r}: only http:// and https:// upstreams are supported")
        if url.username is not None or url.password is not None:
            raise ValueError(f"{text!r} must not carry credentials (oauth2 injects them)")
        if url.query or url.fragment:
            raise ValueError(f"{text!r} must not have a query or a fragment")
        try:
            given: int | None = url.port
        except ValueError:
            raise ValueError(f"{text!r} has a port that is not a number from 1 to 65535"
                             ) from None
        if not url.hostname:
            raise ValueError(f"{text!r} has no host")
        if given == 0:
            raise ValueError(f"{text!r} has port 0")
        scheme: Literal["http", "https"] = "https" if url.scheme == "https" else "http"
        return cls(url.hostname, given or (443 if scheme == "https" else 80), scheme,
                   url.path or "/")


class TLSSettings(_Frozen):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class GrpcSettings(_Frozen):
    listen: str = "127.0.0.1:9191"
    tls: TLSSettings | None = None

    _check_listen = field_validator("listen")(_parse_listen)


class AdminSettings(_Frozen):
    listen: str = "127.0.0.1:9192"

    _check_listen = field_validator("listen")(_parse_listen)


# A SPIFFE ID (spiffe://trust-domain/path); `*` is allowed only as a whole last segment.
_SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()+,;=:@%-]+)*$")
CLAIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.-]{0,127}$")


def _principal(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a SPIFFE ID string")
    pattern = value[:-2] if value.endswith("/*") else value
    if "*" in pattern:
        raise ValueError(f"{value!r}: '*' may stand only for a whole last path segment, as"
                         " in spiffe://td/ns/NS/sa/*")
    if not _SPIFFE_ID.match(pattern):
        raise ValueError(f"{value!r} is not a SPIFFE ID (spiffe://trust-domain/path, the"
                         " trust domain in lower case)")
    return value


SpiffePattern = Annotated[str, BeforeValidator(_principal)]


class NetworkDefinition(_Frozen):
    """A named network: a caller belongs when any CIDR, principal or claim matches.

    Written as a list, it is CIDRs alone (as before identities existed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    cidrs: tuple[CIDR, ...] = ()
    principals: tuple[SpiffePattern, ...] = ()
    # A claim of a JWT Envoy verified -> the values that place a caller here: equal to a
    # string claim, or a member of an array claim.
    jwt_claims: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list | tuple):
            return {"cidrs": data}
        if isinstance(data, dict) and isinstance(data.get("jwt_claims"), dict):
            data = {**data, "jwt_claims": {
                k: [v] if isinstance(v, str) else v for k, v in data["jwt_claims"].items()}}
        return data

    @field_validator("jwt_claims")
    @classmethod
    def _claims(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for name, values in value.items():
            if not CLAIM_NAME.match(name):
                raise ValueError(f"claim name {name!r} must be a letter or '_' then letters,"
                                 " digits, '_', ':', '.' or '-'")
            if not values or any(not v for v in values):
                raise ValueError(f"claim {name!r}: give one or more non-empty values")
        return value

    @model_validator(mode="after")
    def _something(self) -> NetworkDefinition:
        if not (self.cidrs or self.principals or self.jwt_claims):
            raise ValueError("a network needs cidrs, principals or jwt_claims")
        return self

    @property
    def identity(self) -> IdentityRule:
        return IdentityRule.of(self.principals, self.jwt_claims)


class JwtSettings(_Frozen):
    """The JWT provider Envoy's jwt_authn verifies tokens with (for `jwt_claims` rules)."""

    issuer: Annotated[str, Field(min_length=1)]
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None  # remote JWKS, fetched by Envoy
    jwks_file: str | None = None  # or a JWKS file where Envoy runs
    # Where the token is: `authorization` means "Authorization: Bearer <token>".
    header: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}$")] = "authorization"
    # Envoy's metadata key for the verified payload (Istio's RequestAuthentication uses the
    # issuer).
    payload_in_metadata: Annotated[str, Field(min_length=1, max_length=256)] = "mcp_ext_authz"

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtSettings:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks_uri (fetched by Envoy) and jwks_file")
        if self.jwks_uri is not None:
            if "://" not in self.jwks_uri:
                raise ValueError(f"jwks_uri {self.jwks_uri!r} must be an http(s):// URL")
            UpstreamAddress.parse(self.jwks_uri)
        return self


class NetworkSettings(_Frozen):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    internal_ranges: tuple[CIDR, ...] = Field(
        default_factory=lambda: tuple(_parse_cidr(c) for c in DEFAULT_INTERNAL_RANGES)
    )
    trusted_proxies: tuple[CIDR, ...] = ()
    # Named networks beyond `internal` (which is internal_ranges), for servers' visible_to.
    networks: dict[str, NetworkDefinition] = Field(default_factory=dict)
    # Bounds on what one CheckRequest can make the sidecar read; beyond them it fails closed.
    max_xff_entries: Annotated[int, Field(ge=1, le=1000)] = 32
    max_xff_bytes: Annotated[int, Field(ge=64, le=1_048_576)] = 8192

    @field_validator("networks")
    @classmethod
    def _named(cls, value: dict[str, NetworkDefinition]) -> dict[str, NetworkDefinition]:
        for name in value:
            if name in (INTERNAL, EXTERNAL):
                raise ValueError(f"{name!r} is a built-in network name"
                                 " (internal is network.internal_ranges)")
            if not NETWORK_NAME.match(name):
                raise ValueError(f"network name {name!r} must be a letter then up to 62"
                                 " letters, digits, '_' or '-'")
        return value

    def named(self) -> list[tuple[str, tuple[IPNetwork, ...]]]:
        """Every named network's CIDRs, `internal` first, then in config order."""
        return [(INTERNAL, self.internal_ranges),
                *((name, network.cidrs) for name, network in self.networks.items())]

    def identities(self) -> list[tuple[str, IdentityRule]]:
        """The networks a caller can be in by who it is, with what says so."""
        return [(name, network.identity) for name, network in self.networks.items()
                if network.principals or network.jwt_claims]

    @property
    def uses_principals(self) -> bool:
        return any(network.principals for network in self.networks.values())

    @property
    def uses_claims(self) -> bool:
        return any(network.jwt_claims for network in self.networks.values())


class RoutingSettings(_Frozen):
    context_extension_key: str = "mcp_server"
    path_prefix: str | None = "/mcp/"
    host_suffix: str | None = None
    # GET here lists the servers the caller may see (None: no registry).
    registry_path: str | None = "/mcp"

    @field_validator("registry_path")
    @classmethod
    def _registry_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c in value for c in "?#;")
                                  or value.startswith("/.well-known/")):
            raise ValueError(f"{value!r} must be a path starting with '/' (no '?', '#' or ';',"
                             " not under /.well-known/)")
        return value

    @model_validator(mode="after")
    def _registry_apart(self) -> RoutingSettings:
        path, prefix = self.registry_path, self.path_prefix
        if path is not None and prefix is not None and path.startswith(prefix):
            raise ValueError(f"registry_path {path!r} is under path_prefix {prefix!r}, where"
                             " server names go")
        return self

    @field_validator("path_prefix")
    @classmethod
    def _slashes(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("/") and value.endswith("/")):
            raise ValueError(f"{value!r} must start and end with '/'")
        return value

    @field_validator("host_suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and (not value or ":" in value):
            raise ValueError(f"{value!r} must be a non-empty host suffix without a port")
        return value.lower() if value else value


class DefaultSettings(_Frozen):
    available_on_public_internet: StrictBool = True


# Upper bounds say what is sane, and keep every derived Envoy timeout one Envoy accepts.
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class TokenSettings(_Frozen):
    expiry_buffer_s: Annotated[float, Field(ge=0, le=86400)] = 60
    min_ttl_s: PositiveSeconds = 10
    default_ttl_s: PositiveSeconds = 300
    # One token request; Envoy's ext_authz waits this long plus 0.5 s.
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 5
    retry_initial_s: PositiveSeconds = 1
    retry_max_s: PositiveSeconds = 60


class OAuth2Settings(_Frozen):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        match = re.match(r"^https?://([^/?#\s]+)", value)
        if not match:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if "@" in match.group(1):
            raise ValueError("must not carry credentials; use client_id and client_secret")
        return value

    @property
    def display_url(self) -> str:
        """The token URL without its query string, fit for logs and error messages."""
        return self.token_url.split("?", 1)[0].split("#", 1)[0]

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scope in value:
            if not scope or any(c.isspace() for c in scope):
                raise ValueError(f"scope {scope!r} must be non-empty and contain no spaces")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> OAuth2Settings:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret and client_secret_file")
        if self.client_secret is not None and not self.client_secret.get_secret_value():
            raise ValueError("client_secret is empty")
        return self

    def secret(self) -> str:
        """Return the client secret (a `client_secret_file` has been read at load time)."""
        assert self.client_secret is not None, "load_config reads client_secret_file"
        return self.client_secret.get_secret_value()

    @cached_property
    def cache_key(self) -> tuple[str, ...]:
        """Identify a credential without holding its secret: a rotated secret is a new key."""
        digest = hashlib.sha256(self.secret().encode()).hexdigest()
        return (
            self.token_url,
            self.client_id,
            digest,
            self.auth_method,
            " ".join(self.scopes),
            self.audience or "",
            self.resource or "",
        )


class ToolSettings(_Frozen):
    # Defaults to its server's value (filled in by Config). A tool only narrows its server.
    available_on_public_internet: StrictBool
    visible_to: tuple[str, ...] = ()


class ServerInfo(_Frozen):
    name: str
    version: str = ""


class ServerSettings(_Frozen):
    # A security boolean: true or false, never "yes", 1 or "off" coerced.
    available_on_public_internet: StrictBool
    # What the registry shows of the server, to the callers who may see it.
    title: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    description: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    # Networks (names from network.networks) that see an internal-only server too.
    visible_to: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None
    # Where `envoy-config` sends this server's requests (`--upstream` overrides it).
    upstream: str | None = None
    tools: dict[str, ToolSettings] = Field(default_factory=dict)
    # Who answers a tools/call of a hidden tool. `server` (the default): the server itself,
    # asked for a fresh name it cannot have, so the answer is its own for an unknown tool,
    # byte for byte (needs the ext_proc filter envoy-config sets up; where there is none,
    # as under Istio, the sidecar answers as `tool_error`). Or the sidecar, imitating one:
    # `tool_error` (a result with isError, as the official Python SDK does) or
    # `jsonrpc_error` (error -32602, as the MCP specification's example does).
    unknown_tool_reply: Literal["server", "tool_error", "jsonrpc_error"] = "server"
    # The name and version the MCP server reports (results of MCP 2026-07-28 carry them, so a
    # hidden tool's answer must too). Unset: the configured name and an empty version.
    server_info: ServerInfo | None = None

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        if value is not None:
            UpstreamAddress.parse(value)
        return value

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, value: dict[str, ToolSettings]) -> dict[str, ToolSettings]:
        for name in value:
            if name != DEFAULT_TOOL and not TOOL_NAME.match(str(name)):
                raise ValueError(f"tool name {name!r} must be 1-128 letters, digits,"
                                 " '_', '-', '.' or '/', or \"*\" for every tool not listed")
        return value


class McpSettings(_Frozen):
    # Bounds on the JSON-RPC bodies read for tool rules (servers with `tools`). Envoy
    # refuses a bigger body itself (413); a batch of more messages is a 400.
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    max_batch_messages: Annotated[int, Field(ge=1, le=1000)] = 32


class DecisionLogSettings(_Frozen):
    enabled: StrictBool = True
    path: Path | None = None  # None: stdout
    # Denials are always written; allowed checks with this probability.
    sample_allowed: Annotated[float, Field(ge=0, le=1)] = 1.0


class ReloadSettings(_Frozen):
    # Poll the config file (and the secret and TLS files it names) for changes.
    watch: StrictBool = True
    poll_interval_s: PositiveSeconds = 2.0


class Config(_Frozen):
    grpc: GrpcSettings = GrpcSettings()
    admin: AdminSettings | None = AdminSettings()
    decision_log: DecisionLogSettings = DecisionLogSettings()
    reload: ReloadSettings = ReloadSettings()
    network: NetworkSettings = NetworkSettings()
    routing: RoutingSettings = RoutingSettings()
    defaults: DefaultSettings = DefaultSettings()
    tokens: TokenSettings = TokenSettings()
    mcp: McpSettings = McpSettings()
    jwt: JwtSettings | None = None  # needed by jwt_claims rules
    servers: dict[str, ServerSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        # Each server inherits `defaults.available_on_public_internet` unless it sets its own,
        # so the resolved value is visible in one place (ServerSettings) after loading.
        if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
            return data
        defaults = data.get("defaults")
        public = True
        if isinstance(defaults, dict) and isinstance(
            defaults.get("available_on_public_internet"), bool
        ):
            public = defaults["available_on_public_internet"]
        servers = {}
        for name, server in data["servers"].items():
            if server is None:
                server = {}
            if isinstance(server, dict):
                server = {"available_on_public_internet": public, **server}
                server_public = server["available_on_public_internet"]
                if isinstance(server.get("tools"), dict):
                    # ... and each tool its server's value.
                    server["tools"] = {
                        tool: {"available_on_public_internet": server_public, **(rule or {})}
                        if isinstance(rule, dict | None) else rule
                        for tool, rule in server["tools"].items()}
            servers[name] = server
        return {**data, "servers": servers}

    def credentials(self) -> dict[str, OAuth2Settings]:
        """The client-credentials settings of every server that has them."""
        return {n: s.oauth2 for n, s in self.servers.items() if s.oauth2 is not None}

    def watched_files(self) -> tuple[Path, ...]:
        """Files besides the config itself whose change should trigger a reload."""
        files: list[Path] = []
        for server in self.servers.values():
            if server.oauth2 is not None and server.oauth2.client_secret_file is not None:
                files.append(server.oauth2.client_secret_file)
        if self.grpc.tls is not None:
            tls = self.grpc.tls
            files += [f for f in (tls.cert_file, tls.key_file, tls.client_ca_file) if f]
        return tuple(files)

    @field_validator("servers")
    @classmethod
    def _names(cls, value: dict[str, ServerSettings]) -> dict[str, ServerSettings]:
        for name in value:
            if not SERVER_NAME.match(str(name)):
                raise ValueError(
                    f"server name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
                    " and start and end with a letter or digit"
                )
        return value


def _shift(listen: str, offset: int) -> str:
    if listen.startswith("unix:"):
        return f"{listen}.{offset}"
    host, port = split_listen(listen)
    return f"{host}:{port + offset}" if port else listen


def with_port_offset(config: Config, offset: int) -> Config:
    """The config of worker `offset`: gRPC and admin ports shifted by it (unix paths suffixed)."""
    if offset == 0:
        return config
    grpc = config.grpc.model_copy(update={"listen": _shift(config.grpc.listen, offset)})
    admin = config.admin
    if admin is not None:
        admin = admin.model_copy(update={"listen": _shift(admin.listen, offset)})
    return config.model_copy(update={"grpc": grpc, "admin": admin})


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)
# YAML 1.1 reads yes/no/on/off as booleans; for security booleans only true and false may
# mean true and false (YAML 1.2's core schema): `off` stays a string, and is refused.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass
class _Expansion:
    """What substituting ${VAR}s found: problems, and the keys an unset variable left blank."""

    env: Mapping[str, str]
    require: bool  # an unset variable is a problem (not so for dry runs and envoy-config)
    problems: list[str] = field(default_factory=list)
    unset: set[str] = field(default_factory=set)

    def expand(self, value: Any, path: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self.expand(v, f"{path}.{k}" if path else str(k))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def substitute(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name is None:
                self.problems.append(f"{path}: a lone '$' (write $$ for a dollar sign, ${{VAR}}"
                                     " or ${VAR:-default} for an environment variable)")
                return text
            value = self.env.get(name, "")
            if value:
                return value
            if default is not None:
                return default
            if name not in self.env:
                self.unset.add(path)
                if self.require:
                    self.problems.append(f"{path}: environment variable ${{{name}}} is not set")
                return f"unset-{name}"
            return value

        return _VAR.sub(substitute, value)


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part.startswith(("function-", "tagged-union")) or part in {"list[...]"}:
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts) or "(top level)"


# pydantic's messages for the common mistakes, in our words.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a setting here (misspelt, or in the wrong section?)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "finite_number": "must be a finite number",
}
# Where a setting's value may be shown back (never a secret's).
_SHOWN_TYPES = frozenset(("bool_type", "bool_parsing", "int_type", "int_parsing",
                          "int_from_float", "float_type", "float_parsing", "literal_error",
                          "greater_than", "greater_than_equal", "less_than",
                          "less_than_equal"))


def _problem(error: Any) -> str:
    """One pydantic error as `key.path: what is wrong`, in our words."""
    path = _key_path(error["loc"])
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        message = str(context.get("error", error["msg"]))
    elif kind == "literal_error":
        message = f"must be one of {context.get('expected')}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter(context.values()), "")
        words = {"greater_than": "more than", "greater_than_equal": "at least",
                 "less_than": "less than", "less_than_equal": "at most"}[kind]
        message = f"must be {words} {bound}"
    else:
        message = _MESSAGES.get(kind, error["msg"])
    if kind in _SHOWN_TYPES and "secret" not in path and not isinstance(
            error.get("input"), dict | list):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def _visibility_problems(config: Config) -> list[str]:
    """Check every visible_to against the named networks, and that tools only narrow."""
    known = [name for name, _ in config.network.named()]
    problems = []

    def unknown(key: str, names: tuple[str, ...]) -> None:
        for index, name in enumerate(names):
            if name not in known:
                problems.append(f"{key}[{index}]: unknown network {name!r}"
                                f" (known: {', '.join(known)})")

    for server_name, server in config.servers.items():
        key = f"servers.{server_name}"
        if server.visible_to and server.available_on_public_internet:
            problems.append(f"{key}.visible_to: only a server with"
                            " available_on_public_internet: false takes visible_to"
                            " (a public server is visible to every network)")
        unknown(f"{key}.visible_to", server.visible_to)
        for tool_name, tool in server.tools.items():
            tool_key = f"{key}.tools.{tool_name}"
            if tool.available_on_public_internet and not server.available_on_public_internet:
                problems.append(f"{tool_key}.available_on_public_internet: a tool of an"
                                " internal-only server cannot be public (a tool only narrows"
                                " what its server allows)")
            if tool.visible_to and tool.available_on_public_internet:
                problems.append(f"{tool_key}.visible_to: only a tool with"
                                " available_on_public_internet: false takes visible_to")
            unknown(f"{tool_key}.visible_to", tool.visible_to)
            if not server.available_on_public_internet:
                for index, name in enumerate(tool.visible_to):
                    if name in known and name not in (INTERNAL, *server.visible_to):
                        problems.append(
                            f"{tool_key}.visible_to[{index}]: network {name!r} cannot see"
                            f" server {server_name!r} (add it to {key}.visible_to first:"
                            " a tool only narrows what its server allows)")
    return problems


def _read_files(config: Config) -> tuple[Config, list[str]]:
    """Read every `client_secret_file` into `client_secret`; check the TLS files load."""
    problems = []
    servers = dict(config.servers)
    for name, server in config.servers.items():
        oauth2 = server.oauth2
        if oauth2 is None or oauth2.client_secret_file is None:
            continue
        key = f"servers.{name}.oauth2.client_secret_file"
        try:
            secret = oauth2.client_secret_file.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{key}: cannot read {str(oauth2.client_secret_file)!r} ({exc})")
            continue
        if not secret:
            problems.append(f"{key}: {str(oauth2.client_secret_file)!r} is empty")
            continue
        resolved = oauth2.model_copy(update={"client_secret": SecretStr(secret)})
        servers[name] = server.model_copy(update={"oauth2": resolved})
    if config.grpc.tls is not None:
        problems += _tls_problems(config.grpc.tls)
    return config.model_copy(update={"servers": servers}), problems


def _tls_problems(tls: TLSSettings) -> list[str]:
    # Load them as the gRPC listener will, so that a key that does not match its certificate
    # is said so here, not as "cannot listen" at start nor as a successful reload.
    missing = [f"grpc.tls.{key}: {str(path)!r} is not a readable file"
               for key in ("cert_file", "key_file", "client_ca_file")
               if (path := getattr(tls, key)) is not None and not Path(path).is_file()]
    if missing:
        return missing
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        reason = "does not match grpc.tls.cert_file" if "KEY_VALUES_MISMATCH" in str(
            exc) else f"cannot be loaded with grpc.tls.cert_file ({exc.reason or exc})"
        return [f"grpc.tls.key_file: {str(tls.key_file)!r} {reason}"]
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(tls.client_ca_file)
        except ssl.SSLError as exc:
            return [f"grpc.tls.client_ca_file: {str(tls.client_ca_file)!r} holds no usable"
                    f" CA certificate ({exc.reason or exc})"]
    return []


def config_warnings(config: Config) -> list[str]:
    """What is valid but almost certainly a mistake: said on stderr and in the service log."""
    warnings = []
    for key, networks in (("network.trusted_proxies", config.network.trusted_proxies),
                          ("network.internal_ranges", config.network.internal_ranges),
                          *((f"network.networks.{name}", network.cidrs)
                            for name, network in config.network.networks.items())):
        for index, network in enumerate(networks):
            if network.prefixlen == 0:
                meaning = ("every address may then forge X-Forwarded-For"
                           if key == "network.trusted_proxies" else
                           "every caller, the whole internet, is then in it")
                warnings.append(f"{key}[{index}]: {network} holds every address: {meaning}")
    return warnings


def parse_config(data: Any, env: Mapping[str, str] | None = None,
                 source: str = "config", *, secrets: bool = True) -> Config:
    """Validate a parsed YAML document into a Config, or raise ConfigError listing every problem.

    With `secrets=False` (dry runs, `envoy-config`) no secret is needed: an unset ${VAR}
    becomes a placeholder, and no `client_secret_file` nor TLS file is read.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping"], source)
    expansion = _Expansion(os.environ if env is None else env, require=secrets)
    expanded = expansion.expand(data)
    problems = expansion.problems
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        # A setting an unset variable left blank is reported once, as unset.
        problems += [problem for error in exc.errors()
                     if _key_path(error["loc"]) not in expansion.unset
                     for problem in (_problem(error),)]
        raise ConfigError(problems, source) from None
    problems += _visibility_problems(config)
    if config.network.uses_claims and config.jwt is None:
        problems += [f"network.networks.{name}.jwt_claims: needs `jwt`, the provider whose"
                     " tokens Envoy verifies (issuer, jwks_uri or jwks_file)"
                     for name, network in config.network.networks.items() if network.jwt_claims]
    if secrets:
        config, file_problems = _read_files(config)
        problems += file_problems
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *,
                secrets: bool = True) -> Config:
    """Read and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"(file): not UTF-8 text (byte {exc.start} is"
                           f" 0x{exc.object[exc.start]:02x})"], source) from None
    except OSError as exc:
        raise ConfigError([f"(file): cannot read ({exc.strerror})"], source) from None
    return parse_yaml(text, env, source, secrets=secrets)


def parse_yaml(text: str, env: Mapping[str, str] | None = None, source: str = "config", *,
               secrets: bool = True) -> Config:
    """Validate YAML text into a Config."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"(yaml): {exc}".replace("\n", " ")], source) from None
    return parse_config(data, env, source, secrets=secrets)


EXAMPLE_CONFIG = """\
# The built-in example config: what `mcp-ext-authz serve` serves without --config, and what
# `mcp-ext-authz example-config` prints. Copy it, then make it yours; README "Configure"
# lists every key.
grpc:
  listen: 127.0.0.1:9191          # where Envoy's ext_authz (and ext_proc) filter reaches us
admin:
  listen: 127.0.0.1:9192          # /metrics, /healthz, /readyz
network:
  # internal_ranges: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 127.0.0.0/8, ...]
  #   (the default: private and loopback ranges; callers there see every server)
  trusted_proxies: []             # load balancers in front of Envoy, whose X-Forwarded-For
                                  # is believed; none here
routing:
  path_prefix: /mcp/              # /mcp/<server> names the server
servers:
  # Two servers without credentials, so that nothing needs a token endpoint:
  everything:                     # /mcp/everything: seen by every caller
    available_on_public_internet: true
  billing-db:                     # /mcp/billing-db: internal callers only; everyone else
    available_on_public_internet: false   # gets the 404 an unknown server gets
  # A server with tool rules and an injected token looks like this:
  #   github:
  #     upstream: https://api.githubcopilot.com/mcp/   # for `envoy-config`
  #     oauth2:
  #       token_url: https://idp.example.com/oauth2/token
  #       client_id: mcp-gateway
  #       client_secret: ${GITHUB_MCP_SECRET}         # or client_secret_file: /run/secrets/x
  #     tools:
  #       delete_repo: {available_on_public_internet: false}
"""


def example_config() -> Config:
    """Return the built-in example config (two servers, no credentials to fetch)."""
    return parse_yaml(EXAMPLE_CONFIG, env={}, source="built-in example")
