"""The config: typed, immutable settings models (pydantic), one per section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    StrictBool,
    field_validator,
    model_validator,
)

from ...mcp.uri_template import uri_rule_problem
from .base import (
    FrozenModel,
    PositiveSeconds,
    UpstreamAddress,
    in_file_only,
    parse_listen,
    split_listen,
)
from .credentials import OAuth2Settings, TokenExchangeSettings, TokenSettings
from .networks import JwtSettings, NetworkSettings

SERVER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_])?$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")  # MCP's tool-name alphabet
# A prompt's name (MCP sets no alphabet): printable, no spaces at its ends.
PROMPT_NAME = re.compile(r"^[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]{0,254}[^\x00-\x20\x7f])?$")
DEFAULT_TOOL = "*"  # the rule of every tool (prompt, resource) a server's rules do not list
ItemKind = Literal["tool", "prompt", "resource"]  # what a server's item rules are about


class TLSSettings(FrozenModel):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class GrpcSettings(FrozenModel):
    listen: str = "127.0.0.1:9191"
    tls: TLSSettings | None = None
    # Whoever can open a stream on the gRPC listener reads every server's token (Check
    # answers, SDS): beyond loopback it takes mTLS (tls.client_ca_file), or this, said in
    # so many words.
    allow_unauthenticated: StrictBool = False

    _check_listen = field_validator("listen", mode="before")(parse_listen)


class AdminAuth(FrozenModel):
    # The status page's token: the file's content, surrounding whitespace stripped. Scripts
    # send it as `Authorization: Bearer ...`, a browser as HTTP Basic's password.
    token_file: Path
    # What load_config read there: not a key of the config (a token is given in a file
    # only), and never dumped.
    token: SecretStr | None = Field(default=None, exclude=True)

    _file_only = model_validator(mode="before")(in_file_only("token", "the token"))


class AdminSettings(FrozenModel):
    listen: str = "127.0.0.1:9192"
    page: StrictBool = True  # the status page at / and its JSON under /api/
    auth: AdminAuth | None = None

    _check_listen = field_validator("listen", mode="before")(parse_listen)


class RoutingSettings(FrozenModel):
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


class DefaultSettings(FrozenModel):
    available_on_public_internet: StrictBool = True

class ItemSettings(FrozenModel):
    """The rule of a tool, prompt or resource of a server: who sees it listed and may use it."""

    # Defaults to its server's value (filled in by Config). An item only narrows its server.
    available_on_public_internet: StrictBool
    visible_to: tuple[str, ...] = ()


class ServerInfo(FrozenModel):
    name: str
    version: str = ""


class ServerSettings(FrozenModel):
    # A security boolean: true or false, never "yes", 1 or "off" coerced.
    available_on_public_internet: StrictBool
    # What the registry shows of the server, to the callers who may see it.
    title: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    description: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    # Networks (names from network.networks) that see an internal-only server too.
    visible_to: tuple[str, ...] = ()
    # The credential the gateway sends upstream: its own (client credentials), or the
    # caller's exchanged for one per user (RFC 8693). At most one; neither, and callers
    # bring their own token, passed on.
    oauth2: OAuth2Settings | None = None
    token_exchange: TokenExchangeSettings | None = None
    # Where `envoy-config` sends this server's requests (`--upstream` overrides it).
    upstream: str | None = None
    tools: dict[str, ItemSettings] = Field(default_factory=dict)
    # The same for prompts, by name, and for resources, by URI or URI template (RFC 6570):
    # each "*" for the rest.
    prompts: dict[str, ItemSettings] = Field(default_factory=dict)
    resources: dict[str, ItemSettings] = Field(default_factory=dict)
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

    @model_validator(mode="after")
    def _one_credential(self) -> ServerSettings:
        if self.oauth2 is not None and self.token_exchange is not None:
            raise ValueError("set oauth2 (the gateway's own token) or token_exchange (the"
                             " caller's, exchanged), not both")
        return self

    @property
    def token_settings(self) -> tuple[tuple[str, OAuth2Settings], ...]:
        """Its token endpoint settings by key (`oauth2`, `token_exchange`): what load_config
        reads the credential files of."""
        return tuple((key, settings) for key, settings in (
            ("oauth2", self.oauth2), ("token_exchange", self.token_exchange))
            if settings is not None)

    def item_rules(self) -> tuple[tuple[ItemKind, dict[str, ItemSettings]], ...]:
        """Its rules by kind of item: tools, prompts, resources."""
        return (("tool", self.tools), ("prompt", self.prompts), ("resource", self.resources))

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        if value is not None:
            UpstreamAddress.parse(value)
        return value

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, value: dict[str, ItemSettings]) -> dict[str, ItemSettings]:
        for name in value:
            if name != DEFAULT_TOOL and not TOOL_NAME.match(str(name)):
                raise ValueError(f"tool name {name!r} must be 1-128 letters, digits,"
                                 " '_', '-', '.' or '/', or \"*\" for every tool not listed")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompt_names(cls, value: dict[str, ItemSettings]) -> dict[str, ItemSettings]:
        for name in value:
            if name != DEFAULT_TOOL and not PROMPT_NAME.match(str(name)):
                raise ValueError(f"prompt name {name!r} must be 1-256 printable characters,"
                                 " no spaces at its ends, or \"*\" for every prompt not listed")
        return value

    @field_validator("resources")
    @classmethod
    def _resource_keys(cls, value: dict[str, ItemSettings]) -> dict[str, ItemSettings]:
        for key in value:
            if key != DEFAULT_TOOL:
                problem = uri_rule_problem(str(key))
                if problem:
                    raise ValueError(f"resource {key!r}: {problem}")
        return value


class McpSettings(FrozenModel):
    # Bounds on the JSON-RPC bodies read for tool rules (servers with `tools`). Envoy
    # refuses a bigger body itself (413); a batch of more messages is a 400.
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    max_batch_messages: Annotated[int, Field(ge=1, le=1000)] = 32
    # Bound on an answer read to be rewritten (tools/list and tools/call on tool-rule
    # routes): Envoy's buffers are sized to hold it, and a bigger one is a 502 at once.
    max_answer_bytes: Annotated[int, Field(ge=64 * 1024, le=64 * 1024 * 1024)] = (
        16 * 1024 * 1024)


class DecisionLogSettings(FrozenModel):
    enabled: StrictBool = True
    path: Path | None = None  # None: stdout
    # Denials are always written; allowed checks with this probability.
    sample_allowed: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Name the `sub` of a caller whose token was exchanged (token_exchange servers). Off,
    # the log names no user; it never holds a token.
    include_subject: StrictBool = False


class ReloadSettings(FrozenModel):
    # Poll the config file (and the secret and TLS files it names) for changes.
    watch: StrictBool = True
    poll_interval_s: PositiveSeconds = 2.0


class Config(FrozenModel):
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
                for kind in ("tools", "prompts", "resources"):
                    if isinstance(server.get(kind), dict):
                        # ... and each tool, prompt and resource its server's value.
                        server[kind] = {
                            item: {"available_on_public_internet": server_public,
                                   **(rule or {})}
                            if isinstance(rule, dict | None) else rule
                            for item, rule in server[kind].items()}
            servers[name] = server
        return {**data, "servers": servers}

    def credentials(self) -> dict[str, OAuth2Settings]:
        """The client-credentials settings of every server that has them: its oauth2, or
        its token exchange's actor (the gateway's own token, sent as the actor)."""
        found = {}
        for name, server in self.servers.items():
            settings = server.oauth2 or (server.token_exchange.actor
                                         if server.token_exchange is not None else None)
            if settings is not None:
                found[name] = settings
        return found

    def exchanges(self) -> dict[str, TokenExchangeSettings]:
        """The token exchange settings of every server that exchanges its callers' tokens."""
        return {n: s.token_exchange for n, s in self.servers.items()
                if s.token_exchange is not None}

    def watched_files(self) -> tuple[Path, ...]:
        """Files besides the config itself whose change should trigger a reload."""
        files: list[Path] = []
        for server in self.servers.values():
            files += [settings.credential_file for _, settings in server.token_settings
                      if settings.credential_file is not None]
        if self.grpc.tls is not None:
            tls = self.grpc.tls
            files += [f for f in (tls.cert_file, tls.key_file, tls.client_ca_file) if f]
        if self.admin is not None and self.admin.auth is not None:
            files.append(self.admin.auth.token_file)
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
