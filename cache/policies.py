"""Eviction policies: one class each, constructed alike by the runtime's ExpertCache and the simulator.

A policy instance serves one layer's cache. The SlotTable tells it of every event in the order the
rules of shared/traces/README.md fix (router order, highest gate weight first), and asks it for a
victim among the experts it may evict. `t` is the index of the current request at this layer
since the last reset, so an offline policy (Belady) can index its future by it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quant.errors import MoEOffloadError


class Policy:
    """The interface. Subclasses override what they need; the defaults do nothing."""

    name = "base"
    offline = False  # True: needs the future (`futures=`), so only the simulator can build it

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

    def bind(self, layer: int, memory: RoutingMemory) -> None:
        """Optional: which layer this instance serves, and the memory all layers of the model share.

        `make_policies` calls it once after construction; policies that look at one layer only
        ignore it.
        """


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


class FIFO(Policy):
    """First in, first out: evict the expert that entered its slot earliest. Hits change nothing."""

    name = "fifo"

    def __init__(self) -> None:
        self.inserted_at: dict[int, int] = {}
        self.clock = 0

    def reset(self) -> None:
        self.inserted_at.clear()
        self.clock = 0

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        self.clock += 1
        self.inserted_at[expert] = self.clock

    def on_evict(self, expert: int) -> None:
        self.inserted_at.pop(expert, None)

    def victim(self, candidates: Sequence[int], t: int) -> int:
        return min(candidates, key=self.inserted_at.__getitem__)


class LFU(Policy):
    """Least frequently used: evict the expert asked for least often in this sequence.

    Counts are kept for every expert of the layer, cached or not, from the start of the sequence
    (an evicted expert keeps its count). Ties go to the least recently used (an insert counts as a
    use). Aging: every `half_life` requests at this layer all counts are halved, so old popularity
    fades; `half_life=0` means no aging.
    """

    name = "lfu"

    def __init__(self, half_life: int = 0) -> None:
        if half_life < 0:
            raise ValueError(f"half_life must be >= 0, got {half_life}")
        self.half_life = half_life
        self.count: dict[int, float] = {}
        self.last_use: dict[int, int] = {}
        self.clock = 0
        self.aged_at = 0  # the request index of the last halving

    def reset(self) -> None:
        self.count.clear()
        self.last_use.clear()
        self.clock = 0
        self.aged_at = 0

    def _age(self, t: int) -> None:
        while self.half_life and t - self.aged_at >= self.half_life:
            self.aged_at += self.half_life
            for expert in self.count:
                self.count[expert] /= 2

    def on_access(self, expert: int, t: int, weight: float) -> None:
        self._age(t)
        self.count[expert] = self.count.get(expert, 0.0) + 1.0
        self.clock += 1
        self.last_use[expert] = self.clock

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        self.clock += 1
        self.last_use[expert] = self.clock

    def victim(self, candidates: Sequence[int], t: int) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0.0), self.last_use[e]))


class Belady(Policy):
    """Belady's MIN, offline: evict the expert whose next use lies furthest ahead (never = furthest).

    Simulator only: it is built with the future, one list of requests per sequence, each request
    the experts of one request at this layer. Its next-use table is computed once per sequence by a
    backward scan (`next_use[t][e]` = first request at or after `t` naming `e`), so a victim costs
    one lookup per candidate. `reset()` moves to the next sequence; call it before the first.
    Ties (two experts next used by the same request, or both never again) go to slot order.
    """

    name = "belady"
    offline = True

    def __init__(self, futures: Sequence[Sequence[Sequence[int]]]) -> None:
        self.futures = futures
        self.sequence = -1
        self.next_use: list[list[int]] = []

    def reset(self) -> None:
        self.sequence += 1
        if self.sequence >= len(self.futures):
            raise RuntimeError(f"Belady was given {len(self.futures)} sequences, asked for another")
        self.next_use = self._table(self.futures[self.sequence])

    @staticmethod
    def _table(requests: Sequence[Sequence[int]]) -> list[list[int]]:
        num_experts = 1 + max((max(r) for r in requests if r), default=-1)
        never = len(requests)  # beyond every request
        row = [never] * num_experts
        table: list[list[int]] = [row] * (len(requests) + 1)  # one row past the end: all "never"
        for t in range(len(requests) - 1, -1, -1):
            row = row.copy()
            for expert in requests[t]:
                row[expert] = t
            table[t] = row
        return table

    def victim(self, candidates: Sequence[int], t: int) -> int:
        if self.sequence < 0:
            raise RuntimeError("Belady.reset() must be called before the first sequence")
        row = self.next_use[min(t, len(self.next_use) - 1)]
        return max(candidates, key=lambda e: row[e] if e < len(row) else len(self.next_use))


class RoutingMemory:
    """What the policies of one model's layers saw this sequence, shared between them.

    Row `t` is request `t` at every layer (a token, or a prefill chunk), so a layer's policy can
    compare the current token's routing path (its experts at the layers below, and at this layer
    so far) with every earlier token's. `similarity[u]` counts the experts token `u` shares with
    the current token over the layers the current token has reached.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 512) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.routes = np.zeros((capacity, num_layers, num_experts), dtype=np.float32)  # [t, layer, e]
        self.similarity = np.zeros(capacity, dtype=np.float32)  # [u]: shared experts with token t
        self.previous_similarity = np.zeros(capacity, dtype=np.float32)  # [u]: the same for token t-1
        self.previous_shared = 0
        self.shared = 0  # experts the current token has been routed to so far (the most `u` can share)
        self.row_of: list[int] = [-1] * num_layers  # which t each layer's current row belongs to
        self.t = -1

    def reset(self) -> None:
        """A new sequence: forget which rows are current (called by every layer; idempotent)."""
        self.row_of = [-1] * self.num_layers
        self.t = -1

    def record(self, layer: int, t: int, expert: int) -> None:
        if t >= len(self.routes):
            self._grow(2 * t)
        if expert >= self.num_experts:
            self._widen(expert + 1)
        if t != self.t:  # the first access of a new token: start its similarity over
            if t == self.t + 1:  # the token before is complete: keep its similarity as context
                self.previous_similarity, self.similarity = self.similarity, self.previous_similarity
                self.previous_shared = self.shared
            else:
                self.previous_shared = 0
            self.t = t
            self.similarity[: t + 1] = 0.0
            self.shared = 0
        if self.row_of[layer] != t:
            self.routes[t, layer] = 0.0
            self.row_of[layer] = t
        self.routes[t, layer, expert] = 1.0
        self.similarity[:t] += self.routes[:t, layer, expert]
        self.shared += 1

    def _grow(self, capacity: int) -> None:
        routes = np.zeros((capacity, self.num_layers, self.num_experts), dtype=np.float32)
        routes[: len(self.routes)] = self.routes
        similarity = np.zeros(capacity, dtype=np.float32)
        similarity[: len(self.similarity)] = self.similarity
        previous = np.zeros(capacity, dtype=np.float32)
        previous[: len(self.previous_similarity)] = self.previous_similarity
        self.routes, self.similarity, self.previous_similarity = routes, similarity, previous

    def _widen(self, num_experts: int) -> None:
        routes = np.zeros((len(self.routes), self.num_layers, num_experts), dtype=np.float32)
        routes[:, :, : self.num_experts] = self.routes
        self.routes, self.num_experts = routes, num_experts


class PathMatch(Policy):
    """Ours, online: keep the experts that were needed soon after tokens routed like this one.

    Code repeats itself, and so does its routing. When layer `l` must evict during token `t`, each
    earlier token `u` gets a weight from how much of token t's routing path so far (layers 0..l,
    read from the RoutingMemory the layers share) it shares, plus `context` times how much token
    u-1 shares with token t-1 over every layer: weight = exp(sharpness x share) x
    recency^(t-1-u). Each u then votes for the experts this layer needed soon after it, an expert
    next needed d tokens after u getting gamma^(d-1). The vote is mixed with the layer's own
    frequency (decayed by `decay` per request): score = mix x vote + (1 - mix) x frequency share.
    The lowest score is evicted; ties go to the least recently used. The defaults are PATH_GRID's
    best point on the whole shared trace; README gives the held-out figures (tuned on one problem,
    scored on the other).
    """

    name = "path"

    def __init__(
        self,
        sharpness: float = 16.0,
        context: float = 0.0,
        recency: float = 0.98,
        gamma: float = 0.5,
        mix: float = 0.5,
        decay: float = 0.95,
    ) -> None:
        self.sharpness = sharpness
        self.context = context
        self.recency = recency
        self.gamma = gamma
        self.mix = mix
        self.decay = decay
        self.layer = 0
        self.memory = RoutingMemory(1, 8)  # replaced by bind(); alone, a layer sees only itself
        self.reset()

    def bind(self, layer: int, memory: RoutingMemory) -> None:
        self.layer = layer
        self.memory = memory

    def reset(self) -> None:
        self.memory.reset()
        num_experts = self.memory.num_experts
        self.frequency = np.zeros(num_experts)
        self.soon = np.zeros((256, num_experts))  # [u, e]: gamma^(d-1), e next used d requests after u
        self.used_at = np.zeros(num_experts, dtype=np.int64)  # the last request that used e (0 before)
        self.last_use: dict[int, int] = {}
        self.clock = 0
        self.t = -1

    def on_access(self, expert: int, t: int, weight: float) -> None:
        if t != self.t:
            self.t = t
            self.frequency *= self.decay
        if t >= len(self.soon) or expert >= self.soon.shape[1]:
            self._grow(max(t + 1, 2 * len(self.soon)), max(expert + 1, self.soon.shape[1]))
        self.frequency[expert] += 1.0
        since = self.used_at[expert]
        self.soon[since:t, expert] = self.gamma ** np.arange(t - since - 1, -1, -1)
        self.used_at[expert] = t
        self.memory.record(self.layer, t, expert)
        self._touch(expert)

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        self._touch(expert)

    def _touch(self, expert: int) -> None:
        self.clock += 1
        self.last_use[expert] = self.clock

    def _grow(self, rows: int, num_experts: int) -> None:
        soon = np.zeros((rows, num_experts))
        soon[: len(self.soon), : self.soon.shape[1]] = self.soon
        self.soon = soon
        self.frequency = np.pad(self.frequency, (0, num_experts - len(self.frequency)))
        self.used_at = np.pad(self.used_at, (0, num_experts - len(self.used_at)))

    def victim(self, candidates: Sequence[int], t: int) -> int:
        score = self._scores(t)
        return min(candidates, key=lambda e: (score[e] if e < len(score) else 0.0, self.last_use[e]))

    def _scores(self, t: int) -> np.ndarray:
        # U = earlier tokens u whose next token is complete (u + 1 < t), E = experts
        memory = self.memory
        total = self.frequency.sum()
        frequency = self.frequency / total if total else self.frequency  # E
        num_earlier = min(t - 1, len(self.soon))
        if num_earlier < 1:
            return frequency
        if memory.t == t and memory.shared:
            share = memory.similarity[:num_earlier] / memory.shared  # U
            if self.context and memory.previous_shared:
                # token u-1 against token t-1, over every layer: a two-token routing context
                share[1:] += self.context * memory.previous_similarity[: num_earlier - 1] / memory.previous_shared
            weight = np.exp(self.sharpness * (share - share.max()))
        else:  # this token has no routing yet: every earlier token counts alike
            weight = np.ones(num_earlier)
        if self.recency != 1.0:
            weight = weight * self.recency ** np.arange(num_earlier - 1, -1, -1)
        vote = weight @ self.soon[:num_earlier] / weight.sum()  # E
        return self.mix * vote + (1.0 - self.mix) * frequency


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "path": PathMatch, "belady": Belady}
ONLINE_POLICIES = [name for name, cls in POLICIES.items() if not cls.offline]

# The grid PathMatch's parameters are tuned on (held-out figures: cache.simulate.held_out).
PATH_GRID: dict[str, list[float]] = {
    "sharpness": [8.0, 16.0],
    "context": [0.0, 0.5],
    "recency": [0.98, 1.0],
    "gamma": [0.5, 0.7],
    "mix": [0.5, 0.7],
}


def make_policy(name: str, **params) -> Policy:
    """The one factory: a fresh policy for one layer. `params` go to the policy's constructor."""
    cls = POLICIES.get(name)
    if cls is None:
        raise MoEOffloadError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")
    if cls.offline and "futures" not in params:
        raise MoEOffloadError(
            f"policy {name!r} is offline (it needs the future): only `moe-offload simulate` can run it"
        )
    try:
        return cls(**params)
    except TypeError as error:
        raise MoEOffloadError(f"policy {name!r} does not take parameters {sorted(params)}: {error}") from None


def make_policies(
    name: str,
    num_layers: int,
    num_experts: int,
    futures: Sequence[Sequence[Sequence[Sequence[int]]]] | None = None,
    **params,
) -> list[Policy]:
    """One policy per layer of a model, bound to its layer and to one RoutingMemory they share.

    `futures[layer]` is what an offline policy is given: that layer's requests, one list per
    sequence. The runtime calls this with online policies only.
    """
    memory = RoutingMemory(num_layers, num_experts)
    policies = []
    for layer in range(num_layers):
        extra = {} if futures is None else {"futures": futures[layer]}
        policy = make_policy(name, **extra, **params)
        policy.bind(layer, memory)
        policies.append(policy)
    return policies
