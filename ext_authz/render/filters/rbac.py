"""The RBAC filter (native data path): Envoy itself decides who may reach a server.

Rendered from the compiled policy: a server's `Visibility` and each named network's CIDRs
and identity rule, as the sidecar judges them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from envoy_data_plane.envoy.config.core.v3 import CidrRange
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Principal,
    PrincipalAuthenticated,
    PrincipalSet,
    Rbac,
    RbacAction,
    SourcedMetadata,
)
from envoy_data_plane.envoy.config.rbac.v3 import Policy as RbacPolicy
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from ...contract import JWT_FILTER, RBAC_FILTER
from ...policy.compile import Policy
from ...policy.network import INTERNAL, IdentityRule, IPNetwork


def http_filter() -> HttpFilter:
    """The filter, with no rules: each route not for everyone carries its own."""
    return HttpFilter(name=RBAC_FILTER, typed_config=AnyMessage.pack(RbacFilter()))


def per_route(policy: Policy, server: str) -> AnyMessage | None:
    """A route's rules, or None for a route everyone may take."""
    rbac = visibility(policy, server)
    return None if rbac is None else AnyMessage.pack(RbacPerRoute(rbac=RbacFilter(rules=rbac)))


def _cidrs(networks: Iterable[IPNetwork]) -> list[Principal]:
    principals = []
    for network in networks:
        principals.append(Principal(remote_ip=CidrRange(
            address_prefix=str(network.network_address), prefix_len=network.prefixlen)))
        if network.version == 4:
            # The sidecar reads ::ffff:a.b.c.d as a.b.c.d (as the kernel routes it); Envoy's
            # CIDR match does not, so an IPv4 range also names its mapped form.
            mapped = ipaddress.IPv6Network(
                f"::ffff:{network.network_address}/{96 + network.prefixlen}")
            principals.append(Principal(remote_ip=CidrRange(
                address_prefix=str(mapped.network_address), prefix_len=mapped.prefixlen)))
    return principals


def _identity_principals(rule: IdentityRule, claims_key: str) -> list[Principal]:
    """Who is in a network by identity, as RBAC says it: Envoy's own view of the mTLS peer
    (`authenticated`) and jwt_authn's verified payload (dynamic metadata)."""
    principals = []
    for kind, value in rule.principal_matchers():
        matcher = (StringMatcher(safe_regex=RegexMatcher(regex=value)) if kind == "regex"
                   else StringMatcher(exact=value))
        principals.append(Principal(authenticated=PrincipalAuthenticated(
            principal_name=matcher)))
    for claim, values in rule.claim_values:
        path = [MetadataMatcherPathSegment(key=claims_key),
                MetadataMatcherPathSegment(key=claim)]
        for value in values:
            exact = ValueMatcher(string_match=StringMatcher(exact=value))
            for held in (exact, ValueMatcher(list_match=ListMatcher(one_of=exact))):
                principals.append(Principal(sourced_metadata=SourcedMetadata(
                    metadata_matcher=MetadataMatcher(filter=JWT_FILTER, path=path,
                                                     value=held))))
    return principals


def visibility(policy: Policy, server: str) -> Rbac | None:
    """Who may reach a server's routes in the native data path: None for everyone.

    The client address is Envoy's (`remote_ip`: the XFF walk through trusted_proxies). Where
    that walk cannot go on (an entry that does not parse, an ip:port entry, too many
    hops), Envoy falls back to the trusted proxy's own address, which the sidecar never
    takes for the client: so no address in trusted_proxies is ever let in here. Unknown
    server names (the catch-all) are let in by no one.
    """
    known = policy.servers.get(server)
    if known is not None and known.public:
        return None
    if known is None:
        return Rbac(action=RbacAction.ALLOW, policies={})  # nobody: the unknown server's 404
    visible = list(policy.networks.cidrs(INTERNAL))
    identified: list[Principal] = []
    for name in known.visibility.audience:
        visible += policy.networks.cidrs(name)
        identified += _identity_principals(policy.networks.identity_rule(name),
                                           policy.claims_key or "")
    principals = identified
    if visible:
        seen = Principal(or_ids=PrincipalSet(ids=_cidrs(visible)))
        proxies = policy.trusted_proxies.networks
        if proxies:
            proxy = Principal(or_ids=PrincipalSet(ids=_cidrs(proxies)))
            seen = Principal(and_ids=PrincipalSet(ids=[seen, Principal(not_id=proxy)]))
        principals = [seen, *identified]
    if not principals:
        return Rbac(action=RbacAction.ALLOW, policies={})
    return Rbac(action=RbacAction.ALLOW, policies={
        f"servers.{server}": RbacPolicy(permissions=[Permission(any=True)],
                                        principals=principals)})
