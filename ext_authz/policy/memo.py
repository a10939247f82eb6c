"""Bounded memos: what the hot path derives once and looks up after (pure, no I/O).

Every cache of the sidecar is one of these two. Each is cleared whole when full, rather
than evicting one entry at a time: the same few callers ask the same few things again and
again, so a full memo means an unusual burst, and starting over costs one miss per key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .decision import Decision

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class Memo(dict[K, V]):
    """A dict that holds at most `size` entries: `keep` clears it when full.

    A dict itself, so that a look-up on the hot path is `dict.get`, no more.
    """

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: K, value: V) -> V:
        """Remember a value (clearing every other one first when full); return it."""
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value


class PerDecision(Generic[T]):
    """Values derived from a Decision (its encoded metadata, its log fields), remembered.

    Keyed by identity: decide() hands out the same Decision object for the same inputs, so
    the hot path looks a value up instead of hashing the decision's fields. The decision is
    kept beside its value, so its id cannot be reused while the entry exists. Bounded.
    """

    __slots__ = ("_derive", "_entries")

    def __init__(self, derive: Callable[[Decision], T], size: int = 4096) -> None:
        self._derive = derive
        self._entries: Memo[int, tuple[Decision, T]] = Memo(size)

    def __getitem__(self, decision: Decision) -> T:
        entry = self._entries.get(id(decision))
        if entry is not None and entry[0] is decision:
            return entry[1]
        return self._entries.keep(id(decision), (decision, self._derive(decision)))[1]
