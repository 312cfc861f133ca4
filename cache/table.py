"""Which expert sits in which slot of one layer, and the rules that decide it.

The SlotTable is pure bookkeeping: it moves no bytes. The runtime's ExpertCache asks it what to load
where and then does the copies; the simulator asks it the same questions and only counts. Both
therefore count the same hits by construction.

The rules are those of shared/traces/README.md:
- a request (one token's experts at one layer, or one prefill chunk's) is served as a unit: an
  expert already in a slot is a hit and is never evicted to make room for another expert of the
  same request;
- when a request has more experts than there are slots, its own experts make room for each other,
  oldest served first (hits are served before misses, misses in router order);
- misses are inserted in router order (highest gate weight first), and the policy is told of every
  access in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.policies import Policy
from cache.stats import LayerStats
from quant.errors import MoEOffloadError


@dataclass(frozen=True)
class Step:
    """One expert of a request (or one prefetch load): where it is, and what it displaced."""

    expert: int
    slot: int
    hit: bool
    evicted: int | None = None  # the expert whose slot a load overwrites; None for a free slot


class SlotTable:
    """`capacity` slots of one layer, filled and emptied by `request` and `prefetch`."""

    def __init__(self, capacity: int, policy: Policy, stats: LayerStats | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a layer needs at least one slot, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.stats = stats if stats is not None else LayerStats()
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.free_slots: list[int] = list(range(capacity))
        self.unused_prefetches: set[int] = set()  # prefetched experts no request has used yet
        self.guess: tuple[int, ...] | None = None  # the prefetcher's guess for the next request, in its order
        self.t = 0  # requests served since the last reset

    def reset(self, keep_residents: bool = False) -> None:
        """A new sequence: unused prefetches count as wasted, and every slot empties; with `keep_residents`
        (exclusive mode, where each expert lives in one place only) each keeps its expert, cold: placed
        again as if before the first request."""
        residents = sorted(self.slot_of, key=self.slot_of.__getitem__) if keep_residents else []  # slot order
        self.stats.prefetches_wasted += len(self.unused_prefetches)
        self.unused_prefetches.clear()
        self.slot_of.clear()
        self.free_slots = list(range(self.capacity))
        self.guess = None
        self.t = 0
        self.policy.reset()
        for expert in residents:
            self.place(expert)  # the slots refill in order, so each resident keeps its slot

    def fill(self) -> None:
        """Exclusive mode's start: experts 0..K-1 in slots 0..K-1, as the runtime loads them."""
        for expert in range(self.capacity):
            self.place(expert)

    def settle_prefetches(self) -> None:
        """Count the experts prefetched so far as loaded: a request that finds one is a plain hit, not a
        prefetch used. A measurement window starts with this once every copy has landed (bench's timed
        steps, after the warm-up's prefetches into them), so its counters see its own prefetches only; the
        whole run's counters then count those as issued, and neither used nor wasted."""
        self.unused_prefetches.clear()

    def place(self, expert: int) -> int:
        """Put `expert` in a free slot without a request (the exclusive cache's residents); returns the slot."""
        slot = self.free_slots.pop(0)
        self._insert(expert, slot, prefetch=False)
        return slot

    def request(self, experts: Sequence[int], weights: Sequence[float] | None = None) -> list[Step]:
        """Serve one request. Returns its steps in compute order: hits first, then misses."""
        if len(set(experts)) != len(experts):
            raise ValueError(f"a request names an expert twice: {list(experts)}")
        stats, t = self.stats, self.t
        stats.requests += len(experts)
        if self.guess is not None:
            stats.guess_total += len(experts)
            stats.guess_right += sum(e in self.guess for e in experts)
            self.guess = None

        # hits are what is cached as the request starts; they are computed before any load, so a hit
        # whose slot a later miss of this request takes (fewer slots than experts) is still a hit
        start_slot = {e: self.slot_of[e] for e in experts if e in self.slot_of}
        for expert in start_slot:
            if expert in self.unused_prefetches:
                self.unused_prefetches.discard(expert)
                stats.prefetches_used += 1
        protected = set(start_slot)
        served = list(start_slot)  # hits are served first, in router order
        hits: list[Step] = []
        misses: list[Step] = []
        for i, expert in enumerate(experts):
            weight = 1.0 if weights is None else float(weights[i])
            if expert in start_slot:
                stats.hits += 1
                hits.append(Step(expert, start_slot[expert], hit=True))
            else:
                stats.misses += 1
                slot, evicted = self._make_room(protected, served)
                self._insert(expert, slot, prefetch=False)
                protected.add(expert)
                served.append(expert)
                misses.append(Step(expert, slot, hit=False, evicted=evicted))
            self.policy.on_access(expert, t, weight)
        self.t += 1
        return hits + misses

    def prefetch(self, experts: Sequence[int]) -> list[Step]:
        """Record a guess for the next request and place the guessed experts not yet in a slot.

        A later guess replaces an earlier one (an early guess corrected at the layer's output). A
        guessed expert already cached is never evicted for another guessed one; when no other slot
        is left, the remaining guesses are not loaded. Returns the loads to issue.
        """
        self.guess = tuple(experts)
        protected = set(self.guess) & set(self.slot_of)
        loads: list[Step] = []
        for expert in experts:
            if expert in self.slot_of:
                continue
            if not self.free_slots and not any(e not in protected for e in self.slot_of):
                break
            slot, evicted = self._make_room(protected, served=[])
            self._insert(expert, slot, prefetch=True)
            protected.add(expert)
            self.unused_prefetches.add(expert)
            self.stats.prefetches_issued += 1
            loads.append(Step(expert, slot, hit=False, evicted=evicted))
        return loads

    def _make_room(self, protected: set[int], served: list[int]) -> tuple[int, int | None]:
        if self.free_slots:
            return self.free_slots.pop(0), None
        in_slot_order = sorted(self.slot_of, key=self.slot_of.__getitem__)
        candidates = [e for e in in_slot_order if e not in protected]
        if candidates:
            victim = self.policy.victim(candidates, self.t)
        else:  # the request alone fills every slot: its oldest served expert makes room
            victim = next(e for e in served if e in self.slot_of)
        slot = self.slot_of.pop(victim)
        self.policy.on_evict(victim)
        if victim in self.unused_prefetches:
            self.unused_prefetches.discard(victim)
            self.stats.prefetches_wasted += 1
        return slot, victim

    def _insert(self, expert: int, slot: int, prefetch: bool) -> None:
        self.slot_of[expert] = slot
        self.policy.on_insert(expert, self.t, prefetch)


def check_mode(mode: str) -> None:
    """The cache modes a replay (the simulator, the time line) follows; `fill` and `reset(keep_residents)`
    are exclusive mode's rules. `simulate` and `timeline` check their --cache-mode with it before reading the trace,
    so the message names the option (the runtime's `auto` is no mode a replay can follow: "here")."""
    if mode not in ("inclusive", "exclusive"):
        raise MoEOffloadError(f"--cache-mode {mode!r} is unknown here: choose inclusive or exclusive (the mode the "
                              "traced run used)")  # fmt: skip


def layer_slots(slots: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Slots per layer from one count for every layer or one count a layer (as the planner gives them)."""
    if isinstance(slots, int):
        return (slots,) * num_layers
    if len(slots) != num_layers:
        raise MoEOffloadError(f"slots per layer names {len(slots)} layers, the trace has {num_layers}")
    return tuple(slots)


def slots_label(capacities: Sequence[int]) -> int | tuple[int, ...]:
    """How a run names its slots: the count when every layer has it, else one count a layer."""
    return capacities[0] if len(set(capacities)) == 1 else tuple(capacities)


def request_order(ids: torch.Tensor, weights: torch.Tensor) -> tuple[list[int], list[float]]:
    """The experts a layer asks the cache for, highest weight first.

    One token (decode): its top-k in router order. Many tokens (prefill): every expert any token
    chose, ordered by the gate weight it carries in total, served as one request.
    """
    # A = active experts per token, E' = distinct experts asked for
    if ids.shape[0] == 1:
        # may synchronize the device: the cache decides on the host which experts to load
        return ids[0].tolist(), weights[0].tolist()
    experts, inverse = torch.unique(ids, return_inverse=True)  # [E'], [T, A]
    totals = torch.zeros(experts.shape[0], dtype=torch.float32, device=ids.device)
    totals.index_add_(0, inverse.flatten(), weights.flatten().float())
    order = torch.argsort(totals, descending=True, stable=True)
    # may synchronize the device, as above
    return experts[order].tolist(), totals[order].tolist()
