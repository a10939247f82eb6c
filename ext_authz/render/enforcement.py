"""Who enforces in a data path: what each adds to the listener both render.

In the ext_authz data path (`BySidecar`, here) the sidecar decides every request and sets
every token; the native data path (`native.ByEnvoy`) has Envoy do both itself and asks the
sidecar only where it must read a body or answer for the caller. Everything the native
path does differently is an override in native.py.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLogFilter, StatusCodeFilter
from envoy_data_plane.envoy.config.accesslog.v3 import ComparisonFilter as Comparison
from envoy_data_plane.envoy.config.accesslog.v3 import ComparisonFilterOp as ComparisonOp
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    RuntimeUInt32,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ..contract import LOCAL_REPLY_HEADER
from ..policy.routing import RouteKind
from .plan import Plan, ServerPlan


def status_is(code: int, name: str) -> AccessLogFilter:
    """A local-reply (or access-log) filter: the response status is `code` (a runtime key
    `mcp_ext_authz.NAME_status` may say another)."""
    return AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=Comparison(
        op=ComparisonOp.EQ,
        value=RuntimeUInt32(default_value=code, runtime_key=f"mcp_ext_authz.{name}_status"))))


def mark_local_reply() -> HeaderValueOption:
    """The header that marks a local reply for the answers filter (LOCAL_REPLY_HEADER)."""
    return HeaderValueOption(
        header=HeaderValue(key=LOCAL_REPLY_HEADER, value="1"),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)


class BySidecar:
    """The ext_authz data path: the sidecar decides, on every route."""

    authz_disabled = False  # ext_authz on every route
    validate_clusters: bool | None = None  # Envoy's default: every route's cluster exists
    # The mark Envoy sets on its own 404s (a local reply: here the sidecar's denial, via
    # ext_authz), for the answers filter to let them by unheld: a hidden server's 404 on a
    # route whose answers it reads would otherwise wait a round trip to the sidecar that the
    # catch-all's does not (a timing tell; and by then Envoy has read the body and keeps
    # the connection, where the catch-all's closes it).
    local_reply_marker: str | None = LOCAL_REPLY_HEADER

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
        """Envoy's own 404s (the sidecar's denials) marked, and only those: an upstream's
        404 is no local reply."""
        return LocalReplyConfig(mappers=[ResponseMapper(
            filter=status_is(404, "not_found"), headers_to_add=[mark_local_reply()])])

    def check(self) -> None:
        """Raise a ValueError if Envoy could not take what this data path renders."""

    def upstream_cluster(self, cluster: Cluster, server: ServerPlan) -> Cluster:
        """A server's upstream cluster, as this data path sends to it."""
        return cluster


BY_SIDECAR = BySidecar()
