"""Typed, immutable configuration: YAML loading, `${VAR}` and `*_file` secrets, key-path errors.

The package's public names, from its modules: models (the settings), credentials (tokens,
oauth2, token_exchange), networks, base (addresses), load, problems and example.
"""

from .base import UpstreamAddress, split_listen
from .credentials import (
    ACCESS_TOKEN_TYPE,
    OAuth2Settings,
    TokenExchangeSettings,
    TokenSettings,
)
from .example import EXAMPLE_CONFIG, example_config
from .load import load_config, parse_config, parse_yaml
from .models import (
    DEFAULT_TOOL,
    SERVER_NAME,
    TOOL_NAME,
    AdminSettings,
    Config,
    DecisionLogSettings,
    DefaultSettings,
    GrpcSettings,
    ItemKind,
    ItemSettings,
    McpSettings,
    ReloadSettings,
    RoutingSettings,
    ServerInfo,
    ServerSettings,
    TLSSettings,
    with_port_offset,
)
from .networks import (
    CLAIM_NAME,
    DEFAULT_INTERNAL_RANGES,
    NETWORK_NAME,
    JwtSettings,
    NetworkDefinition,
    NetworkSettings,
)
from .problems import config_warnings

__all__ = [
    "ACCESS_TOKEN_TYPE", "CLAIM_NAME", "DEFAULT_INTERNAL_RANGES", "DEFAULT_TOOL",
    "EXAMPLE_CONFIG", "NETWORK_NAME",
    "SERVER_NAME", "TOOL_NAME", "AdminSettings", "Config", "DecisionLogSettings",
    "DefaultSettings", "GrpcSettings", "ItemKind", "ItemSettings", "JwtSettings",
    "McpSettings", "NetworkDefinition",
    "NetworkSettings", "OAuth2Settings", "ReloadSettings", "RoutingSettings", "ServerInfo",
    "ServerSettings", "TLSSettings", "TokenExchangeSettings", "TokenSettings", "UpstreamAddress",
    "config_warnings", "example_config", "load_config", "parse_config", "parse_yaml",
    "split_listen", "with_port_offset",
]
