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

    Token `t` is request `t` at every layer (a token, or a prefill chunk), so a layer's policy can
    compare the current token's routing path (its experts at the layers below, and at this layer
    so far) with every earlier token's. `similarity[u]` counts the experts token `u` shares with
    the current token over the layers the current token has reached.

    `record` runs on every access, so it costs one numpy call: `routes` keeps the token axis last,
    which makes one (layer, expert)'s row over the earlier tokens contiguous, and that row is added
    to `similarity` in place. Counts are integers, so a policy can look weights up by them.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 512) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.routes = np.zeros((num_layers, num_experts, capacity), dtype=np.intp)  # [layer, e, t]: 1 = routed
        self.similarity = np.zeros(capacity, dtype=np.intp)  # [u]: shared experts with token t
        self.previous_similarity = np.zeros(capacity, dtype=np.intp)  # [u]: the same for token t-1
        self.earlier = self.similarity[:0]  # [u < t]: the view of `similarity` that `record` adds to
        self.previous_shared = 0
        self.shared = 0  # experts the current token has been routed to so far (the most `u` can share)
        self.end = 0  # one past the last token recorded since the last reset: what reset() clears
        self.t = -1

    @property
    def capacity(self) -> int:
        return self.routes.shape[2]

    def reset(self) -> None:
        """A new sequence: clear the routes written (called by every layer; idempotent)."""
        self.routes[:, :, : self.end] = 0
        self.end = 0
        self.t = -1

    def record(self, layer: int, t: int, expert: int) -> None:
        if t != self.t:
            self._start(t)
        if expert >= self.num_experts:
            self._widen(expert + 1)
        self.routes[layer, expert, t] = 1
        np.add(self.earlier, self.routes[layer, expert, :t], out=self.earlier)
        self.shared += 1

    def _start(self, t: int) -> None:
        """The first access of token t: start its similarity over."""
        if t >= self.capacity:
            self._grow(2 * t)
        if t == self.t + 1:  # the token before is complete: keep its similarity as context
            self.previous_similarity, self.similarity = self.similarity, self.previous_similarity
            self.previous_shared = self.shared
        else:
            self.previous_shared = 0
        self.t = t
        self.end = max(self.end, t + 1)
        self.similarity[: t + 1] = 0
        self.earlier = self.similarity[:t]
        self.shared = 0

    def _grow(self, capacity: int) -> None:
        routes = np.zeros((self.num_layers, self.num_experts, capacity), dtype=np.intp)
        routes[:, :, : self.capacity] = self.routes
        similarity = np.zeros(capacity, dtype=np.intp)
        similarity[: len(self.similarity)] = self.similarity
        previous = np.zeros(capacity, dtype=np.intp)
        previous[: len(self.previous_similarity)] = self.previous_similarity
        self.routes, self.similarity, self.previous_similarity = routes, similarity, previous

    def _widen(self, num_experts: int) -> None:
        routes = np.zeros((self.num_layers, num_experts, self.capacity), dtype=np.intp)
        routes[:, : self.num_experts] = self.routes
        self.routes, self.num_experts = routes, num_experts


def descending_powers(base: float, length: int) -> np.ndarray:
    """[base^(length-1), ..., base^1, base^0].

    Its last k entries are `base ** np.arange(k - 1, -1, -1)` bit for bit (numpy's power of one
    element does not depend on where it sits in the array; tests/test_policies.py checks it), so
    a slice of one table stands in for a fresh arange and power on every call.
    """
    return base ** np.arange(length - 1, -1, -1)


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

    On a GPU this bookkeeping runs on the host between a decode step's kernel launches, so it is
    written for few numpy calls per event (a call's ~0.5 µs of overhead is most of the cost at these
    sizes): powers come from tables, and exp(sharpness x share) from a table indexed by the shared
    count. Each score is still computed with the dtypes and order of operations of the formula
    above, so the victims are those of the plain formula bit for bit: tests/test_policies.py pins
    them, and benchmarks/policy_cost.py compares every victim on the shared trace.
    """

    name = "path"
    # the largest `shared` whose weight table ((shared+1)^2 floats) is kept; past it (long prefill
    # chunks) the weights are computed from the similarity vector on every call
    table_limit = 128

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
        self.weight_tables: dict[int, np.ndarray] = {}  # shared -> [most, k]; depend on nothing reset() clears
        self.reset()

    def bind(self, layer: int, memory: RoutingMemory) -> None:
        self.layer = layer
        self.memory = memory

    def reset(self) -> None:
        self.memory.reset()
        num_experts = self.memory.num_experts
        self.frequency = np.zeros(num_experts)
        self.soon = np.zeros((256, num_experts))  # [u, e]: gamma^(d-1), e next used d requests after u
        self.used_at = [0] * num_experts  # the last request that used e (0 before); read on every access
        self._power_tables(len(self.soon))
        self.last_use: dict[int, int] = {}
        self.clock = 0
        self.t = -1

    def _power_tables(self, rows: int) -> None:
        self.gamma_powers = descending_powers(self.gamma, rows)  # [d]: gamma^(rows-1-d)
        self.recency_powers = descending_powers(self.recency, rows)  # [d]: recency^(rows-1-d)

    def on_access(self, expert: int, t: int, weight: float) -> None:
        if t != self.t:
            self.t = t
            self.frequency *= self.decay
        if t >= len(self.soon) or expert >= self.soon.shape[1]:
            self._grow(max(t + 1, 2 * len(self.soon)), max(expert + 1, self.soon.shape[1]))
        self.frequency[expert] += 1.0
        # every u in since..t-1 next needed `expert` at t: gamma^(t-1-u), the table's last t - since
        since = self.used_at[expert]
        if since == t - 1:  # also used by the token before (4 accesses in 10 on the shared trace)
            self.soon[since, expert] = self.gamma_powers[-1]  # one element: cheaper than a slice
        else:
            self.soon[since:t, expert] = self.gamma_powers[len(self.gamma_powers) - (t - since) :]
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
        self.used_at += [0] * (num_experts - len(self.used_at))
        self._power_tables(rows)

    def victim(self, candidates: Sequence[int], t: int) -> int:
        if len(candidates) == 1:  # nothing to compare
            return candidates[0]
        scores = self._scores(t, candidates)
        # the lowest score, then the least recently used (clock values are distinct: no tie is left)
        return min(zip(scores, map(self.last_use.__getitem__, candidates), candidates))[2]

    def _scores(self, t: int, experts: Sequence[int]) -> list[float]:
        """The score of each of `experts` (one this layer never saw scores 0)."""
        # U = earlier tokens u whose next token is complete (u + 1 < t), E = experts
        memory = self.memory
        num_experts = len(self.frequency)
        # Python floats from here on: the same doubles, with cheaper arithmetic than numpy scalars
        # ndarray.sum() without its Python wrapper; a zero total leaves the counts unscaled (x / 1.0 is x)
        total = float(np.add.reduce(self.frequency)) or 1.0
        frequency = self.frequency.tolist()  # E
        num_earlier = min(t - 1, len(self.soon))
        if num_earlier < 1:
            return [frequency[e] / total if e < num_experts else 0.0 for e in experts]
        if memory.t == t and memory.shared:
            weight = self._path_weight(num_earlier)  # U
        else:  # this token has no routing yet: every earlier token counts alike
            weight = np.ones(num_earlier)
        if self.recency != 1.0:
            weight = weight * self.recency_powers[len(self.recency_powers) - num_earlier :]  # U, float64
        # np.dot makes the same BLAS call as `@` here (gemv), with less Python around it. With
        # recency 1 the weights stay float32 and so does their sum, as in the plain formula.
        vote = (np.dot(weight, self.soon[:num_earlier]) / np.add.reduce(weight)).tolist()  # E
        mix, keep = self.mix, 1.0 - self.mix
        return [mix * vote[e] + keep * (frequency[e] / total) if e < num_experts else 0.0 for e in experts]

    def _path_weight(self, num_earlier: int) -> np.ndarray:
        """[u]: exp(sharpness x (share_u - max share)), share_u = similarity[u] / shared (+ context)."""
        memory = self.memory
        similarity = memory.similarity[:num_earlier]  # U
        with_context = self.context and memory.previous_shared
        if not with_context and memory.shared <= self.table_limit:
            # the weight depends on the count similarity[u] alone: look it up
            table = self.weight_tables.get(memory.shared)
            if table is None:
                table = self.weight_tables[memory.shared] = self._weight_table(memory.shared)
            most = similarity[similarity.argmax()]  # argmax: cheaper than max()
            return table[most].take(similarity)
        share = similarity.astype(np.float32) / memory.shared  # U
        if with_context:  # token u-1 against token t-1, over every layer: a two-token routing context
            previous = memory.previous_similarity[: num_earlier - 1].astype(np.float32)
            share[1:] += self.context * previous / memory.previous_shared
        return np.exp(self.sharpness * (share - share.max()))

    def _weight_table(self, shared: int) -> np.ndarray:
        """[most, k]: the weight of an earlier token sharing k experts when the best shares `most`.

        The float32 operations `_path_weight` applies to a whole similarity vector, applied to each
        possible count, so a lookup gives the same floats (tests/test_policies.py checks it).
        """
        share = np.arange(shared + 1, dtype=np.float32) / shared  # [k]
        table = np.exp(self.sharpness * (share - share[:, None]))  # [most, k], float32
        # _scores multiplies the weights by recency in float64: convert once here (exactly), not per call
        return table.astype(np.float64) if self.recency != 1.0 else table


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
        raise MoEOffloadError(f"--policy {name!r} is unknown: choose one of {', '.join(POLICIES)}")
    if cls.offline and "futures" not in params:
        raise MoEOffloadError(
            f"--policy {name!r} is offline (it needs the future): only `moe-offload simulate` can run it"
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
