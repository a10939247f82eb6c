"""Who is calling, from which network: client-IP resolution, identities and placement
(pure, no I/O).

Trust model: Envoy puts the direct TCP peer of the downstream connection in
`source.address`; a client controls every byte of the X-Forwarded-For header it sends.
So XFF is read only when the peer is a configured trusted proxy, and only hop by hop
from the right while each hop is itself trusted. Anything that does not parse stops the
walk and the caller is treated as external: every doubt fails closed. An identity (an mTLS
principal, a verified JWT's claims) is only what Envoy itself vouches for.
"""

from __future__ import annotations

import ipaddress
import json
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

INTERNAL = "internal"  # the built-in name of `network.internal_ranges`
EXTERNAL = "external"  # the name of an address in no configured network (or of no address)

# The longest valid entry is a bracketed IPv6 address with a port:
# "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535" is 53 characters.
_MAX_ENTRY_LENGTH = 64


class NetworkSet:
    """A fixed set of CIDRs, merged and sorted once, answering `ip in networks` by bisection."""

    __slots__ = ("_ends", "_starts", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            spans = sorted(
                (int(n.network_address), int(n.broadcast_address))
                for n in self.networks
                if n.version == version
            )
            starts, ends = self._starts[version], self._ends[version]
            for start, end in spans:
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)

    def __contains__(self, address: IPAddress) -> bool:
        value = int(address)
        starts = self._starts[address.version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[address.version][index]

    def __bool__(self) -> bool:
        return bool(self.networks)


def parse_address(text: str) -> IPAddress | None:
    """Parse one address as Envoy or a proxy writes it, or return None.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` and `[::1]:80`; unmaps IPv4-mapped IPv6
    (`::ffff:10.0.0.1` is 10.0.0.1, as the kernel would route it). Rejects zone ids, names,
    `unknown`, obfuscated identifiers (RFC 7239) and anything else.
    """
    text = text.strip()
    if not text or len(text) > _MAX_ENTRY_LENGTH or "%" in text:
        return None
    bracketed = text[0] == "["
    if bracketed:
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not isinstance(address, ipaddress.IPv6Address):
        return None if bracketed else address
    return address.ipv4_mapped or address


ClientSource = Literal[
    "peer",          # the peer is not a trusted proxy: it is the client
    "xff",           # the first untrusted hop in X-Forwarded-For, walking from the right
    "xff_leftmost",  # every hop was a trusted proxy: the leftmost is the client
    "no_peer",       # no socket address (a pipe, an internal address, an empty field)
    "bad_peer",      # the peer address does not parse
    "bad_xff",       # an X-Forwarded-For entry does not parse: the walk stops
    "xff_too_long",  # more trusted hops, or more bytes, than the configured limits
    "ext_authz",     # chosen by the ext_authz check of the same request (seen by ext_proc)
]


@dataclass(frozen=True, slots=True)
class ClientIP:
    """The address believed to be the client's, and how it was chosen (None: none trusted)."""

    address: IPAddress | None
    source: ClientSource
    hops_read: int = 0

    def explain(self) -> str:
        """Say in one sentence why this address (or none) was chosen."""
        match self.source:
            case "peer":
                return f"peer {self.address} is not a trusted proxy, so it is the client"
            case "xff":
                return (f"peer is a trusted proxy; {self.address} is the first untrusted hop"
                        f" in X-Forwarded-For ({self.hops_read} read from the right)")
            case "xff_leftmost":
                return f"every hop is a trusted proxy; the leftmost, {self.address}, is the client"
            case "no_peer":
                return "no peer socket address: treated as external"
            case "bad_peer":
                return "peer address does not parse: treated as external"
            case "bad_xff":
                return (f"X-Forwarded-For entry {self.hops_read} from the right does not parse:"
                        " treated as external")
            case "xff_too_long":
                return "X-Forwarded-For exceeds the configured limits: treated as external"
            case "ext_authz":
                return f"client {self.address} as the ext_authz check of this request chose it"


def resolve_client_ip(
    peer: str,
    x_forwarded_for: str | None,
    trusted_proxies: NetworkSet,
    *,
    max_entries: int = 32,
    max_bytes: int = 8192,
) -> ClientIP:
    """Choose the client address from the TCP peer and the X-Forwarded-For chain.

    Walks XFF from the right through trusted proxies only (rightmost untrusted wins), so a
    client can never pick its own address by prepending entries. Reads at most
    `max_entries` entries of at most `max_bytes` bytes; beyond that it fails closed.
    """
    if not peer:
        return ClientIP(None, "no_peer")
    peer_address = parse_address(peer)
    if peer_address is None:
        return ClientIP(None, "bad_peer")
    if peer_address not in trusted_proxies:
        return ClientIP(peer_address, "peer")
    if x_forwarded_for is None or not x_forwarded_for.strip():
        return ClientIP(peer_address, "xff_leftmost")
    if len(x_forwarded_for) > max_bytes:
        return ClientIP(None, "xff_too_long")
    # rsplit with maxsplit stops scanning once it has the entries it may read.
    entries = x_forwarded_for.rsplit(",", max_entries)
    unread = len(entries) > max_entries
    hops = 0
    leftmost = peer_address
    for entry in reversed(entries[1:] if unread else entries):
        hops += 1
        address = parse_address(entry)
        if address is None:
            return ClientIP(None, "bad_xff", hops)
        if address not in trusted_proxies:
            return ClientIP(address, "xff", hops)
        leftmost = address
    if unread:
        return ClientIP(None, "xff_too_long", hops)
    return ClientIP(leftmost, "xff_leftmost", hops)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the caller is, as Envoy vouches for it: never from a header a client sets.

    `principal`: the mTLS peer certificate's URI SAN (CheckRequest `source.principal`, which
    Envoy fills only from a certificate it accepted). `claims`: the claims a network rule
    names, of a JWT that Envoy's jwt_authn verified (its dynamic metadata), each as the
    string values it holds: a string claim one, an array claim its string members.
    """

    principal: str = ""
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.principal or self.claims)


NO_IDENTITY = Identity()


def claims_payload(text: str | None) -> dict[str, object] | None:
    """A JWT payload given as JSON text (for `check` and the status page's try), or a
    ValueError saying what is wrong with it."""
    if text is None:
        return None
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError("give a JSON object, the JWT's payload")
    return payload


def identity_from_claims(principal: str, payload: Mapping[str, object] | None,
                         claim_names: Iterable[str]) -> Identity:
    """An identity from what Envoy vouches for: the mTLS principal, and the named claims of a
    verified JWT payload, each as the strings it holds (a string claim one, an array claim
    its string members; any other value none)."""
    claims = []
    if payload is not None:
        for name in sorted(claim_names):
            value = payload.get(name)
            values = (value,) if isinstance(value, str) else tuple(
                v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
            if values:
                claims.append((name, values))
    return Identity(principal, tuple(claims))


@dataclass(frozen=True, slots=True)
class IdentityRule:
    """What puts a caller in one named network besides its address."""

    principals: frozenset[str] = frozenset()  # exact SPIFFE IDs
    principal_prefixes: tuple[str, ...] = ()  # `spiffe://td/ns/x/sa/*` as "spiffe://td/ns/x/sa/"
    claims: tuple[tuple[str, frozenset[str]], ...] = ()  # claim -> values, any one matching
    # As the config lists them, for the renderer (Envoy's RBAC says the same rules).
    patterns: tuple[str, ...] = field(default=(), compare=False)
    claim_values: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, principals: Iterable[str], claims: Mapping[str, Iterable[str]]) -> IdentityRule:
        principals = tuple(principals)
        exact = frozenset(p for p in principals if not p.endswith("/*"))
        prefixes = tuple(sorted((p[:-1] for p in principals if p.endswith("/*")),
                                key=len, reverse=True))
        listed = tuple((name, tuple(values)) for name, values in claims.items())
        return cls(exact, prefixes, tuple((name, frozenset(values)) for name, values in listed),
                   principals, listed)

    def __bool__(self) -> bool:
        return bool(self.principals or self.principal_prefixes or self.claims)

    def principal_matchers(self) -> list[tuple[Literal["exact", "regex"], str]]:
        """The principals as Envoy's RBAC matches them, in config order: an exact SPIFFE ID,
        or a regular expression for a wildcard (one last path segment, as `match` reads it)."""
        return [("regex", re.escape(pattern[:-1]) + "[^/]+") if pattern.endswith("/*")
                else ("exact", pattern) for pattern in self.patterns]

    def match(self, identity: Identity) -> tuple[int, str] | None:
        """How specifically the identity matches (lower is more) and by what, or None:
        an exact principal first, then a wildcard (its longest prefix first), then a claim."""
        principal = identity.principal
        if principal:
            if principal in self.principals:
                return 0, f"principal {principal}"
            for prefix in self.principal_prefixes:
                rest = principal[len(prefix):]
                # The wildcard stands for exactly one last path segment.
                if principal.startswith(prefix) and rest and "/" not in rest:
                    return 1 + max(0, 1000 - len(prefix)), f"principal {prefix}*"
        held = dict(identity.claims)
        for name, accepted in self.claims:
            matched = sorted(accepted.intersection(held.get(name, ())))
            if matched:
                return 10_000, f"JWT claim {name}={matched[0]}"
        return None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a caller sits: every named network holding it, and the one it is named by."""

    name: str  # the most specific network holding the address, or EXTERNAL
    members: frozenset[str]  # every network holding it (empty: external)
    # Which identity put the caller in which network ("agents by principal spiffe://..."):
    # said, never compared (the members decide).
    matched: tuple[str, ...] = field(default=(), compare=False)

    @property
    def internal(self) -> bool:
        return INTERNAL in self.members


NOWHERE = Placement(EXTERNAL, frozenset())  # no address, or one in no configured network


class NetworkMap:
    """Named networks (`internal` first, then config order), placing a caller among them.

    A caller is a member of every network that holds its address or names its identity; it
    is named by the most specific one (see `place`), ties going to the network listed first.
    """

    __slots__ = ("_cidrs", "_identities", "_ranked", "_rules", "_sets", "claim_names")

    def __init__(self, named: Iterable[tuple[str, Iterable[IPNetwork]]],
                 identities: Iterable[tuple[str, IdentityRule]] = ()) -> None:
        listed = [(name, tuple(networks)) for name, networks in named]
        rules = tuple(identities)
        self._cidrs = dict(listed)
        self._rules = dict(rules)
        order = {name: index for index, (name, _) in enumerate(listed)}
        self._identities = tuple((order.get(name, len(order)), name, rule)
                                 for name, rule in rules if rule)
        # The claims any rule names: the only ones read from a request.
        self.claim_names = frozenset(claim for _, _, rule in self._identities
                                     for claim, _ in rule.claims)
        self._sets = tuple((name, NetworkSet(networks)) for name, networks in listed)
        self._ranked = sorted(
            ((network, name, order) for order, (name, networks) in enumerate(listed)
             for network in networks),
            key=lambda entry: (-entry[0].prefixlen, entry[2]),
        )

    @property
    def uses_identities(self) -> bool:
        return bool(self._identities)

    @property
    def names(self) -> tuple[str, ...]:
        """Every named network, `internal` first, then in config order."""
        return (*self._cidrs, *(name for name in self._rules if name not in self._cidrs))

    def cidrs(self, name: str) -> tuple[IPNetwork, ...]:
        """The CIDRs of a named network, as configured (none for an unknown name)."""
        return self._cidrs.get(name, ())

    def identity_rule(self, name: str) -> IdentityRule:
        """What places a caller in a named network by who it is (empty: nothing)."""
        return self._rules.get(name, IdentityRule())

    def place(self, address: IPAddress | None, identity: Identity = NO_IDENTITY) -> Placement:
        """Place a caller: by address (no address at all is external) and by identity.

        Named by the most specific match: an exact principal, then a wildcard principal
        (the longest prefix first), then a JWT claim, then the longest CIDR prefix; ties go
        to the network listed first.
        """
        by_identity = []
        if identity and self._identities:
            for order, name, rule in self._identities:
                found = rule.match(identity)
                if found is not None:
                    by_identity.append((found[0], order, name, f"{name} by {found[1]}"))
        if address is None and not by_identity:
            return NOWHERE
        members = frozenset(name for name, networks in self._sets
                            if address is not None and address in networks)
        if by_identity:
            by_identity.sort()
            return Placement(by_identity[0][2], members | {e[2] for e in by_identity},
                             tuple(e[3] for e in by_identity))
        if not members:
            return NOWHERE
        for network, name, _ in self._ranked:
            if address is not None and address in network:
                return Placement(name, members)
        raise AssertionError("a member address lies in one of its networks")
