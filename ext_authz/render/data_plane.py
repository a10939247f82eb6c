"""The listener and the upstream clusters of a config, in either data path: static in the
ext_authz bootstrap, served over ADS in the native one."""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.listener.v3 import Listener

from ..contract import JWKS_CLUSTER
from ..policy.config import Config, UpstreamAddress
from . import clusters, listener
from .enforcement import BySidecar
from .options import DataPlane, resolve_upstreams
from .plan import Plan


def resolved_plan(config: Config, plane: DataPlane) -> Plan:
    """The plan of a config with every server's upstream: a ValueError if one has none."""
    resolved = resolve_upstreams(config, plane.upstreams)
    if plane.upstream_ca is not None and not any(u.tls for u in resolved.values()):
        raise ValueError("--upstream-ca given, but no upstream is an https:// URL")
    return Plan.of(config, resolved)


def check(plan: Plan, plane: DataPlane, by: BySidecar) -> None:
    """Raise the ValueError `resources` would, without building anything (principals
    without the callers' certificates; what `by` cannot render)."""
    if plan.config.network.uses_principals and plane.listener_tls is None:
        raise ValueError("network rules name principals, which only a caller's certificate"
                         " can show: give --listen-cert, --listen-key and --client-ca")
    by.check()


def resources(plan: Plan, plane: DataPlane, by: BySidecar) -> tuple[Listener, list[Cluster]]:
    """The listener and the upstream clusters: a ValueError if the config cannot have them
    (`check`)."""
    check(plan, plane, by)
    manager = listener.connection_manager(plan, plane.timeouts, by)
    built = listener.listener(manager, plane.listen, plane.listener_tls,
                              listener.buffer_limit(plan))
    upstreams = []
    for server in plan.servers:
        assert server.upstream is not None
        upstreams.append(by.upstream_cluster(
            clusters.upstream(server.cluster, server.upstream, plane.upstream_ca), server))
    if plan.jwt is not None and plan.jwt.jwks_uri is not None:
        upstreams.append(clusters.upstream(JWKS_CLUSTER, UpstreamAddress.parse(plan.jwt.jwks_uri),
                                           plane.upstream_ca))
    return built, upstreams
