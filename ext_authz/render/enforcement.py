"""Who enforces in a data path: what each adds to the listener both render.

In the ext_authz data path (`BySidecar`, here) the sidecar decides every request and sets
every token; the native data path (`native.ByEnvoy`) has Envoy do both itself and asks the
sidecar only where it must read a body or answer for the caller. Everything the native
path does differently is an override in native.py.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
    LocalReplyConfig,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ..policy.routing import RouteKind
from .plan import Plan, ServerPlan


class BySidecar:
    """The ext_authz data path: the sidecar decides, on every route."""

    authz_disabled = False  # ext_authz on every route
    validate_clusters: bool | None = None  # Envoy's default: every route's cluster exists
    # A header Envoy's local replies carry for the answers filter to skip them (None: it
    # sees them all; here every denial comes from the sidecar, after it has been asked).
    local_reply_marker: str | None = None

    def route_filters(self, plan: Plan, server: str, kind: RouteKind,
                      common: dict[str, AnyMessage]) -> dict[str, AnyMessage]:
        """A route's per-filter configs, given those both data paths set."""
        return common

    def route_metadata(self, server: str) -> dict[str, Struct]:
        """Route metadata beyond the challenge filter's."""
        return {}

    def log_fields(self, fields: dict[str, str]) -> dict[str, str]:
        """The access log's fields, given those both data paths log."""
        return fields

    def filters_before_authz(self) -> list[HttpFilter]:
        return []

    def local_replies(self) -> LocalReplyConfig | None:
        return None

    def check(self) -> None:
        """Raise a ValueError if Envoy could not take what this data path renders."""

    def upstream_cluster(self, cluster: Cluster, server: ServerPlan) -> Cluster:
        """A server's upstream cluster, as this data path sends to it."""
        return cluster


BY_SIDECAR = BySidecar()
