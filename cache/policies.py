"""Eviction policies: one class each, constructed alike by the runtime's ExpertCache and the simulator.

A policy instance serves one layer's cache. The SlotTable tells it of every event in the order the
rules of shared/traces/README.md fix (router order, highest gate weight first), and asks it for a
victim among the experts it may evict. `t` is the index of the current request at this layer
since the last reset, so an offline policy (Belady) can index its future by it.
"""

from __future__ import annotations

from collections.abc import Sequence


class Policy:
    """The interface. Subclasses override what they need; the defaults do nothing."""

    name = "base"

    def reset(self) -> None:
        """A new sequence starts: forget everything."""

    def on_access(self, expert: int, t: int, weight: float) -> None:
        """`expert` was asked for by request `t` (after its insert, if it was a miss)."""

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        """`expert` was placed in a slot, on demand or by the prefetcher."""

    def on_evict(self, expert: int) -> None:
        """`expert` left its slot."""

    def victim(self, candidates: Sequence[int], t: int) -> int:
        """Which of `candidates` (cached experts, in slot order) to evict."""
        raise NotImplementedError


class LRU(Policy):
    """Least recently used. An insert counts as a use, so a fresh prefetch is the most recent."""

    name = "lru"

    def __init__(self) -> None:
        self.last_use: dict[int, int] = {}
        self.clock = 0  # ticks once per event, so two accesses of one request are ordered

    def reset(self) -> None:
        self.last_use.clear()
        self.clock = 0

    def _touch(self, expert: int) -> None:
        self.clock += 1
        self.last_use[expert] = self.clock

    def on_access(self, expert: int, t: int, weight: float) -> None:
        self._touch(expert)

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        self._touch(expert)

    def on_evict(self, expert: int) -> None:
        self.last_use.pop(expert, None)

    def victim(self, candidates: Sequence[int], t: int) -> int:
        return min(candidates, key=self.last_use.__getitem__)


POLICIES: dict[str, type[Policy]] = {"lru": LRU}
