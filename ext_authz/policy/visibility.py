"""Who sees a server, and each tool, prompt and resource of it: the rules, compiled."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..mcp.uri_template import is_template, template_pattern
from .config import DEFAULT_TOOL, ItemKind, ItemSettings
from .network import Placement


@dataclass(frozen=True, slots=True)
class Visibility:
    """Who sees a server or an item of it, and the config key that says so."""

    public: bool
    visible_to: frozenset[str]
    key: str  # e.g. "servers.github" or "servers.github.tools.delete_repo"
    audience: tuple[str, ...] = field(default=(), compare=False)  # visible_to, in config order

    def judge(self, placement: Placement) -> tuple[bool, str]:
        """Whether a caller so placed sees it, and the config key that decided."""
        if self.public:
            return True, f"{self.key}.available_on_public_internet"
        if placement.internal:
            return True, "network.internal_ranges"
        if not self.visible_to.isdisjoint(placement.members):
            return True, f"{self.key}.visible_to"
        setting = "visible_to" if self.visible_to else "available_on_public_internet"
        return False, f"{self.key}.{setting}"

    @classmethod
    def of(cls, key: str, public: bool, visible_to: tuple[str, ...]) -> Visibility:
        return cls(public, frozenset(visible_to), key, visible_to)


@dataclass(frozen=True, slots=True)
class ItemRules:
    """The rules of one kind of item of a server: tools and prompts by name, resources by
    URI or URI template; "*" for the rest. Empty: the server's own rule holds for them all."""

    kind: ItemKind
    named: Mapping[str, Visibility] = field(default_factory=dict)  # every key but "*"
    # Resource templates, in config order: the first whose expansions hold a URI rules it.
    templates: tuple[tuple[re.Pattern[str], str], ...] = ()
    default: Visibility | None = None  # "*"

    def __bool__(self) -> bool:
        return bool(self.named) or self.default is not None

    def __getitem__(self, key: str) -> Visibility:
        """The rule under a configured key ("*" included)."""
        if key == DEFAULT_TOOL and self.default is not None:
            return self.default
        return self.named[key]

    def rule(self, name: str) -> tuple[str, Visibility] | None:
        """The rule that holds the item of this name (a resource's URI, or a template), and
        its key: its own, else (resources) the first template it fits, else "*", else none
        (the server's own rule holds)."""
        found = self.named.get(name)
        if found is not None:
            return name, found
        for pattern, key in self.templates:
            if pattern.fullmatch(name):
                return key, self.named[key]
        return (DEFAULT_TOOL, self.default) if self.default is not None else None

    def visible(self, name: str, placement: Placement) -> bool:
        """Whether a caller so placed sees (listed) and may use the item of this name."""
        found = self.rule(name)
        return found is None or found[1].judge(placement)[0]

    @classmethod
    def compile(cls, kind: ItemKind, server_key: str,
                items: Mapping[str, ItemSettings]) -> ItemRules:
        rules = {name: Visibility.of(f"{server_key}.{kind}s.{name}",
                                     rule.available_on_public_internet, rule.visible_to)
                 for name, rule in items.items()}
        default = rules.pop(DEFAULT_TOOL, None)
        templates = tuple((template_pattern(key), key) for key in rules
                          if kind == "resource" and is_template(key))
        return cls(kind, rules, templates, default)


def naming(kind: str, key: str) -> tuple[str, str]:
    """A decision's `tool` and `item` for the rule under `key` of this kind of item."""
    return (key, "") if kind == "tool" else ("", f"{kind}s.{key}")


def named_item(item: str) -> tuple[ItemKind, str]:
    """The kind and key of a decision's `item` (what `naming` made: "prompts.KEY")."""
    kinds, _, key = item.partition(".")
    return ("prompt" if kinds == "prompts" else "resource"), key


def hidden_detail(kind: str, key: str, network: str) -> str:
    """Why an item is hidden, naming the configured rule, never the caller's name: under
    "*" that is any text a caller sends, and only configured names may reach the log."""
    what = f'a {kind} under the "*" rule' if key == DEFAULT_TOOL else f"{kind} {key!r}"
    return f"{what} is hidden from the {network} network"
