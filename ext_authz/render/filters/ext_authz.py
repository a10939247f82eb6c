"""The ext_authz filter: the sidecar decides each request from its headers."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    GrpcService,
    GrpcServiceEnvoyGrpc,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    CheckSettings,
    ExtAuthz,
    ExtAuthzPerRoute,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage

from ...contract import AUTHZ_CLUSTER, EXT_AUTHZ_FILTER, JWT_FILTER
from ..options import AUTHZ_TIMEOUT_MARGIN_S
from ..plan import Plan


def http_filter(plan: Plan, *, disabled: bool = False) -> HttpFilter:
    """The filter; `disabled` where only the routes that name it turn it on (native)."""
    authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=timedelta(seconds=plan.config.tokens.timeout_s + AUTHZ_TIMEOUT_MARGIN_S),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,  # never let a request through unchecked
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # The claims of a JWT jwt_authn verified: the only claims the sidecar believes.
        metadata_context_namespaces=[JWT_FILTER] if plan.jwt is not None else [],
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, disabled=disabled,
                      typed_config=AnyMessage.pack(authz))


def per_route(extensions: dict[str, str]) -> AnyMessage:
    """A route's context extensions: what the route is for, so the sidecar never reads the
    client-chosen path."""
    settings = CheckSettings(context_extensions=extensions)
    return AnyMessage.pack(ExtAuthzPerRoute(check_settings=settings))
