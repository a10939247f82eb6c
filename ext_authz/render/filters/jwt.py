"""The jwt_authn filter: a caller's JWT verified, for the claims network rules name."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import DataSource, HttpUri
from envoy_data_plane.envoy.config.route.v3 import RouteMatch
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtCacheConfig,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Empty

from ...contract import JWKS_CLUSTER, JWT_FILTER, JWT_PROVIDER
from ...policy.config import JwtSettings

JWT_CACHE_SIZE = 1000  # tokens per Envoy worker


def http_filter(jwt: JwtSettings) -> HttpFilter:
    """Verify a caller's JWT (signature, issuer, audience, expiry) for the claims in rules.

    A missing or failing token is let through without claims (`allow_missing_or_failed`):
    the caller is then placed by address alone, and a token meant for the upstream (a
    server whose callers bring their own) still reaches it (`forward`).
    """
    provider = JwtProvider(issuer=jwt.issuer, audiences=list(jwt.audiences), forward=True,
                           payload_in_metadata=jwt.payload_in_metadata,
                           # A caller sends the same token again and again: its signature is
                           # checked once (Envoy still checks its expiry on every request).
                           jwt_cache_config=JwtCacheConfig(jwt_cache_size=JWT_CACHE_SIZE))
    if jwt.jwks_file is not None:
        provider.local_jwks = DataSource(filename=jwt.jwks_file)
    else:
        assert jwt.jwks_uri is not None
        provider.remote_jwks = RemoteJwks(
            http_uri=HttpUri(uri=jwt.jwks_uri, cluster=JWKS_CLUSTER,
                             timeout=timedelta(seconds=5)),
            cache_duration=timedelta(minutes=5))
    if jwt.header != "authorization":
        provider.from_headers = [JwtHeader(name=jwt.header)]
    either = JwtRequirement(requires_any=JwtRequirementOrList(requirements=[
        JwtRequirement(provider_name=JWT_PROVIDER),
        JwtRequirement(allow_missing_or_failed=Empty())]))
    authentication = JwtAuthentication(
        providers={JWT_PROVIDER: provider},
        rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=either)])
    return HttpFilter(name=JWT_FILTER, typed_config=AnyMessage.pack(authentication))
