"""The built-in example config."""

from __future__ import annotations

from .load import parse_yaml
from .models import Config

EXAMPLE_CONFIG = """\
# The built-in example config: what `mcp-ext-authz serve` serves without --config, and what
# `mcp-ext-authz example-config` prints. Copy it, then make it yours; docs/configuration.md
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
  # One that acts for each caller (RFC 8693: the caller's token, as Envoy verified it with
  # the top-level `jwt` settings, exchanged for its own; docs/token-exchange.md):
  #   crm:
  #     token_exchange:
  #       token_url: https://idp.example.com/oauth2/token
  #       client_id: mcp-gateway
  #       client_secret_file: /run/secrets/mcp-gateway
  #       audience: crm
"""


def example_config() -> Config:
    """Return the built-in example config (two servers, no credentials to fetch)."""
    return parse_yaml(EXAMPLE_CONFIG, env={}, source="built-in example")
