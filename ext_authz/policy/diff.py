"""Who gains or loses what between two configs: every caller class against every server and
item rule, judged by the compiled Policy that serves requests (never a second reading of
the YAML), and the changes in who belongs to which class."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from .compile import Policy, ServerPolicy
from .config import ItemKind
from .network import EXTERNAL, INTERNAL, NOWHERE, IPNetwork, Placement

Seen = Literal["visible", "hidden", "absent"]
ITEM_KINDS: tuple[ItemKind, ...] = ("tool", "prompt", "resource")


@dataclass(frozen=True, slots=True)
class Item:
    """A server, or one rule of its tools, prompts or resources (its key, "*" included)."""

    server: str
    kind: Literal["server", "tool", "prompt", "resource"] = "server"
    key: str = ""

    @property
    def label(self) -> str:
        base = f"servers.{self.server}"
        return base if self.kind == "server" else f"{base}.{self.kind}s.{self.key}"


@dataclass(frozen=True, slots=True)
class Cell:
    """What callers of one class get of one item under one config, and the key that says so
    (empty where the config has no such server)."""

    seen: Seen
    rule: str = ""


ABSENT = Cell("absent")


@dataclass(frozen=True, slots=True)
class Change:
    caller: str  # "external", "internal" or a named network
    item: Item
    before: Cell
    after: Cell

    @property
    def widens(self) -> bool:
        return self.after.seen == "visible"

    @property
    def widens_external(self) -> bool:
        return self.widens and self.caller == EXTERNAL

    def to_json(self) -> dict[str, Any]:
        return {"caller": self.caller, "item": self.item.label, "server": self.item.server,
                "kind": self.item.kind, "key": self.item.key,
                "before": self.before.seen, "after": self.after.seen,
                "rule_before": self.before.rule, "rule_after": self.after.rule,
                "widens": self.widens, "widens_external": self.widens_external}


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """Who belongs to a caller class, changed: addresses, principals or claim values added
    to it or taken out (`trusted_proxies`: whose X-Forwarded-For is believed)."""

    network: str  # a network's name, or "trusted_proxies"
    what: str  # "addresses", "principals", "claim NAME", "network"
    added: tuple[str, ...]
    removed: tuple[str, ...]
    # Someone joins a class that sees more than external callers do, or a proxy is trusted.
    widens_external: bool

    @property
    def key(self) -> str:
        if self.network == "trusted_proxies":
            return "network.trusted_proxies"
        if self.network == INTERNAL:
            return "network.internal_ranges"
        return f"network.networks.{self.network}"

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network, "key": self.key, "what": self.what,
                "added": list(self.added), "removed": list(self.removed),
                "widens_external": self.widens_external}


@dataclass(frozen=True, slots=True)
class CredentialChange:
    """What a server's upstream gets as its Authorization, changed (ServerPolicy.credential):
    not who sees what, but whose token the upstream holds."""

    server: str
    before: str
    after: str

    @property
    def passes_callers_on(self) -> bool:
        """The callers' own tokens now reach the upstream."""
        return self.after == "caller"

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "key": f"servers.{self.server}", "before": self.before,
                "after": self.after, "passes_callers_on": self.passes_callers_on}


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    changes: tuple[Change, ...]  # those that widen access for external callers first
    memberships: tuple[MembershipChange, ...]
    credentials: tuple[CredentialChange, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes or self.memberships or self.credentials)

    @property
    def widens_external(self) -> bool:
        return (any(c.widens_external for c in self.changes)
                or any(m.widens_external for m in self.memberships))

    def to_json(self) -> dict[str, Any]:
        return {"widens_external": self.widens_external,
                "changes": [c.to_json() for c in self.changes],
                "memberships": [m.to_json() for m in self.memberships],
                "credentials": [c.to_json() for c in self.credentials]}


def callers(*policies: Policy) -> list[str]:
    """The caller classes: external, internal, then every named network of either config."""
    names = [EXTERNAL, INTERNAL]
    for policy in policies:
        names += [n for n in policy.networks.names if n not in names]
    return names


def placement(policy: Policy, caller: str) -> Placement:
    """A caller of this class alone (a network this config lacks holds nobody: external)."""
    if caller == EXTERNAL or caller not in policy.networks.names:
        return NOWHERE
    return Placement(caller, frozenset({caller}))


def items(*policies: Policy) -> list[Item]:
    """Every server of either config, each followed by its item rules (config order)."""
    found: dict[Item, None] = {}
    for policy in policies:
        for name in policy.servers:
            found.setdefault(Item(name))
    order = {item.server: index for index, item in enumerate(found)}
    for server in list(found):
        for kind in ITEM_KINDS:
            for policy in policies:
                configured = policy.servers.get(server.server)
                if configured is not None:
                    rules = configured.rules(kind)
                    keys = [*rules.named, *(["*"] if rules.default is not None else [])]
                    for key in keys:
                        found.setdefault(Item(server.server, kind, key))
    return sorted(found, key=lambda i: order[i.server])  # stable: a server, then its rules


def cell(policy: Policy, item: Item, where: Placement) -> Cell:
    """What a caller so placed gets of an item under this policy."""
    server = policy.servers.get(item.server)
    if server is None:
        return ABSENT
    sees, rule = server.visibility.judge(where)
    if not sees or item.kind == "server":
        return Cell("visible" if sees else "hidden", rule)
    return _item_cell(server, item, where, rule)


def _item_cell(server: ServerPolicy, item: Item, where: Placement, server_rule: str) -> Cell:
    assert item.kind != "server"
    found = server.rules(item.kind).rule(item.key)
    if found is None:  # no rule of this config holds it: its server's does
        return Cell("visible", server_rule)
    sees, rule = found[1].judge(where)
    return Cell("visible" if sees else "hidden", rule)


def diff(old: Policy, new: Policy) -> PolicyDiff:
    """Every (caller class, item) whose visibility differs, and every membership change."""
    changes = []
    for caller in callers(old, new):
        before_at, after_at = placement(old, caller), placement(new, caller)
        for item in items(old, new):
            before, after = cell(old, item, before_at), cell(new, item, after_at)
            if (before.seen == "visible") != (after.seen == "visible"):
                changes.append(Change(caller, item, before, after))
    changes.sort(key=lambda c: (not c.widens_external, not c.widens))
    credentials = tuple(
        CredentialChange(name, old.servers[name].credential, new.servers[name].credential)
        for name in new.servers
        if name in old.servers and old.servers[name].credential != new.servers[name].credential)
    return PolicyDiff(tuple(changes), tuple(_memberships(old, new)), credentials)


def _sees_more_than_external(policy: Policy, network: str) -> bool:
    where, outside = placement(policy, network), NOWHERE
    return any(cell(policy, item, where).seen == "visible"
               and cell(policy, item, outside).seen != "visible"
               for item in items(policy))


def _memberships(old: Policy, new: Policy) -> Iterator[MembershipChange]:
    added_proxies = _address_difference(new.trusted_proxies.networks,
                                        old.trusted_proxies.networks)
    removed_proxies = _address_difference(old.trusted_proxies.networks,
                                          new.trusted_proxies.networks)
    if added_proxies or removed_proxies:
        yield MembershipChange("trusted_proxies", "addresses", added_proxies, removed_proxies,
                               bool(added_proxies))
    for name in callers(old, new)[1:]:
        widening = _sees_more_than_external(new, name)
        if (name in old.networks.names) != (name in new.networks.names):
            added = name in new.networks.names
            yield MembershipChange(name, "network", ("defined",) if added else (),
                                   () if added else ("defined",), added and widening)
        before, after = old.networks, new.networks
        for what, gained, lost in (
                ("addresses", _address_difference(after.cidrs(name), before.cidrs(name)),
                 _address_difference(before.cidrs(name), after.cidrs(name))),
                ("principals", *_set_difference(after.identity_rule(name).patterns,
                                                before.identity_rule(name).patterns)),
                *_claim_differences(dict(before.identity_rule(name).claim_values),
                                    dict(after.identity_rule(name).claim_values))):
            if gained or lost:
                yield MembershipChange(name, what, gained, lost, bool(gained) and widening)


def _set_difference(new: Iterable[str], old: Iterable[str]) -> tuple[tuple[str, ...],
                                                                      tuple[str, ...]]:
    new, old = list(new), list(old)
    return (tuple(v for v in new if v not in old), tuple(v for v in old if v not in new))


def _claim_differences(old: dict[str, tuple[str, ...]], new: dict[str, tuple[str, ...]]
                       ) -> Iterator[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    for claim in [*old, *(c for c in new if c not in old)]:
        yield (f"claim {claim}", *_set_difference(new.get(claim, ()), old.get(claim, ())))


def _address_difference(these: Iterable[IPNetwork], others: Iterable[IPNetwork]
                        ) -> tuple[str, ...]:
    """The addresses of `these` that no network of `others` holds, as CIDRs."""
    others = list(others)
    left: list[IPNetwork] = []
    for network in these:
        pieces = [network]
        for other in others:
            if other.version != network.version:
                continue
            kept: list[IPNetwork] = []
            for piece in pieces:
                if piece.subnet_of(other):  # type: ignore[arg-type]
                    continue
                if other.subnet_of(piece):  # type: ignore[arg-type]
                    kept += piece.address_exclude(other)  # type: ignore[arg-type]
                else:
                    kept.append(piece)
            pieces = kept
        left += pieces
    return tuple(str(n) for n in ipaddress.collapse_addresses(
        n for n in left if n.version == 4)) + tuple(str(n) for n in ipaddress.collapse_addresses(
            n for n in left if n.version == 6))
