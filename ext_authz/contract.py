"""Every name the sidecar and the Envoy config it renders must agree on.

The renderer writes these into Envoy's config; the edges read them back from what Envoy
sends (context extensions, dynamic metadata, node metadata, health-check paths). Spelt
once, here, so that the two sides cannot drift apart. Imports nothing of ours.
"""

from __future__ import annotations

# -- gRPC services the sidecar serves ---------------------------------------------------

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"

# -- HTTP filters, and the dynamic-metadata namespaces named after them -------------------

# Envoy keeps the metadata of a filter's answers under the filter's name.
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"  # the request's body (tool rules)
ANSWERS_FILTER = "mcp_ext_authz.answers"  # a second ext_proc filter, for the answers
# A third, on token-exchange routes: an upstream's 401 (and only that) evicts the token.
REFUSALS_FILTER = "mcp_ext_authz.refusals"
CHALLENGE_FILTER = "mcp_ext_authz.challenge"  # Lua: an upstream's 401 names the gateway
JWT_FILTER = "envoy.filters.http.jwt_authn"  # also the namespace of its verified payloads
RBAC_FILTER = "envoy.filters.http.rbac"
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
ROUTE_NAMESPACE = "mcp_ext_authz"  # route metadata: the server a route is for
JWT_PROVIDER = "mcp_ext_authz"

# -- clusters --------------------------------------------------------------------------

AUTHZ_CLUSTER = "mcp_ext_authz"
# The same sidecar, for the request ext_proc filter alone: its streams (headers to judged
# body) are cut at --receive-timeout, which no other stream to the sidecar may be.
BODIES_CLUSTER = "mcp_ext_authz_bodies"
XDS_CLUSTER = "mcp_ext_authz_xds"
JWKS_CLUSTER = "mcp_ext_authz_jwks"
UPSTREAM_CLUSTER_PREFIX = "mcp_"  # + a server name


def upstream_cluster(server: str) -> str:
    """The cluster of a server's upstream."""
    return f"{UPSTREAM_CLUSTER_PREFIX}{server}"


# -- context extensions (route -> ext_authz) ---------------------------------------------

# A context extension with this value names no server: `envoy-config` puts it on the
# catch-all route, so whatever Envoy itself would not route is answered not_found.
NO_SERVER = ""
# `envoy-config` marks its registry and discovery routes with this context extension; without
# it (Istio), the path says.
KIND_EXTENSION = "mcp_route"
# `envoy-config` marks the routes whose tool rules its ext_proc filter judges: ext_authz then
# decides the server alone, before Envoy buffers any body, so a hidden server answers exactly
# as an unknown one whatever the body. Without the mark, ext_authz needs the body itself.
TOOL_RULES_EXTENSION = "mcp_tool_rules"
TOOL_RULES_BY_EXT_PROC = "ext_proc"

# -- dynamic metadata: ext_authz's answer, read by Envoy's access log and by ext_proc ------

DECISION_ID = "decision_id"
SERVER = "server"
NETWORK = "network"
NETWORKS = "networks"  # comma-joined: every network the caller is in (for ext_proc)
CLIENT_IP = "client_ip"
REASON = "reason"
TOOL = "tool"
REWRITE = "rewrite"  # "resource": the answer is a discovery document to rewrite
RESOURCE = "resource"  # the gateway URL that document must name
EXCHANGED = "exchanged"  # the cache key of the exchanged token sent upstream
CHALLENGE_ORIGIN = "origin"  # the challenge filter's own: the origin the caller used
CHALLENGE_METADATA_PATH = "metadata_path"  # route metadata: a server's discovery path

# -- OAuth discovery --------------------------------------------------------------------

# RFC 9728's well-known prefix: the metadata of `https://host/mcp/x` is at
# `https://host/.well-known/oauth-protected-resource/mcp/x` (or, for `https://host`, at
# the prefix itself).
PROTECTED_RESOURCE = "/.well-known/oauth-protected-resource"

# -- the native data path ----------------------------------------------------------------

# Marks Envoy's own answer for a hidden server (RBAC's, mapped to the unknown server's 404)
# so that the answers filter lets it by untouched, as it does the unknown server's; removed
# from every upstream answer before that filter, and from every answer before it leaves.
LOCAL_REPLY_HEADER = "x-mcp-ext-authz-local-reply"

# Envoy's node metadata carries envoy-config's flags under this key; listener, clusters and
# token secrets come from the sidecar on one ADS stream.
NODE_KEY = "mcp_ext_authz"
TOKEN_SECRET_PREFIX = "mcp_ext_authz_token/"
# The admin listener's watchdog path, + a server name: 200 while the sidecar holds a usable
# token for it.
TOKENS_PATH = "/tokens/"


def token_secret_name(server: str) -> str:
    """The SDS secret holding a server's bearer token (native data path)."""
    return f"{TOKEN_SECRET_PREFIX}{server}"


# The key that seals hidden items' fresh names (hex, at least 16 bytes): `serve --workers`
# gives its workers one, so that any of them puts back a name another sealed.
SEAL_KEY_ENV = "MCP_EXT_AUTHZ_SEAL_KEY"
