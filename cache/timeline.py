"""Decode on a time line: when each expert copy and each expert's compute would run, from measured costs.

`bench` measures a decode on a GPU. This predicts one anywhere, from a few costs, so that a schedule
can be judged before a GPU runs it, and a measurement can be held against what its schedule allows.
It replays a routing trace as bench replays it (the longest sequence's decode tokens: a prompt's
worth as one prefill request per layer, untimed warm-up steps, then the timed steps) through the
runtime's own SlotTable and policies, and times every step in the order the runtime issues it on CUDA:

- the device computes in order on one stream: a layer's resident part (attention, norms, router,
  residual, and the host's read of the routing, which leaves the device idle: `resident_s`), then the
  layer's experts in the order the cache serves them (`expert_s` each);
- once the resident part has ended the host decides the request and starts the layer's loads, then
  the prefetches of the layers ahead, each on one copy stream, in the order issued (`copy_s` each);
- an expert whose load has not landed blocks the host (the runtime waits on the load's event, and
  counts that wait as `stall_s`); the expert starts `wake_s` after the load ends;
- the eviction policy's bookkeeping takes the host `access_s` per expert asked for and `eviction_s` per
  victim chosen (benchmarks/policy_cost.py measures both), before the loads it decides are issued;
- in exclusive mode each load is a swap: the victim goes back on the other direction's stream
  (`back_s`), and each direction waits for the previous swap's copy of the other, as
  `ExpertCache._load` orders them.

Not modelled: copies and kernels slowing each other down; the host falling behind the device anywhere
but at a routing read or a stalled load; and in exclusive mode, the routing read's few bytes queueing
behind a victim's copy back (device to host, the same direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.policies import POLICIES, make_policies
from cache.stats import CacheStats, LayerStats
from cache.table import SlotTable, Step, check_mode, layer_slots, request_order, slots_label
from cache.trace import Token, Trace
from quant.errors import MoEOffloadError

PREFETCH = ("none", "oracle")
# `moe-offload timeline`'s defaults: the 9d0bc23 H100 bench run's compute per token and pinned bandwidth, a
# 2-bit Mixtral-8x7B expert's bytes and MLP time (benchmarks/timeline_check.py), and one expert graph's
# launch as the wake (assumed, not measured)
H100 = dict(compute_ms=23.928, expert_ms=0.2161, bandwidth_gbps=53.43, expert_bytes=66_748_416, wake_us=20.0)


@dataclass(frozen=True)
class Costs:
    """Seconds of the work of one decode step, as bench measures it."""

    compute_s: float  # a token's decode with every expert in its slot (bench's compute_s_per_token)
    expert_s: float  # one expert's MLP for one token
    copy_s: float  # one expert, host to device
    back_s: float | None = None  # one expert, device to host (exclusive mode); None: as copy_s
    wake_s: float = 0.0  # from a load the host waited for to its expert starting
    access_s: float = 0.0  # the host's policy bookkeeping per expert asked for
    eviction_s: float = 0.0  # and per victim it chooses

    @classmethod
    def from_rates(cls, *, compute_ms: float, expert_ms: float, bandwidth_gbps: float, expert_bytes: int,
                   wake_us: float, back_bandwidth_gbps: float | None = None, access_us: float = 0.0,
                   eviction_us: float = 0.0) -> Costs:  # fmt: skip
        """Costs from the units bench and policy_cost.py report: milliseconds, microseconds, GB/s and bytes."""
        back_s = None if back_bandwidth_gbps is None else expert_bytes / (back_bandwidth_gbps * 1e9)
        return cls(compute_s=compute_ms / 1e3, expert_s=expert_ms / 1e3, copy_s=expert_bytes / (bandwidth_gbps * 1e9),
                   back_s=back_s, wake_s=wake_us / 1e6, access_s=access_us / 1e6,
                   eviction_s=eviction_us / 1e6)  # fmt: skip

    def policy_s(self, accesses: int, steps: Sequence[Step]) -> float:
        """The host's policy bookkeeping for `accesses` experts asked for and the victims among `steps`."""
        return accesses * self.access_s + sum(step.evicted is not None for step in steps) * self.eviction_s

    @property
    def copy_back_s(self) -> float:
        return self.copy_s if self.back_s is None else self.back_s

    def resident_s(self, layers: int, top_k: int) -> float:
        """A layer's time outside its experts: what is left of compute_s once its experts are taken out."""
        resident = self.compute_s / layers - top_k * self.expert_s
        if resident < 0:
            raise MoEOffloadError(
                f"{layers} layers x {top_k} experts x {self.expert_s * 1e3:g} ms per expert is more than the "
                f"{self.compute_s * 1e3:g} ms of compute per token; give a smaller --expert-ms"
            )
        return resident

    def copies_s(self, loads: float, mode: str) -> float:
        """The link's time for `loads` expert loads; a swap's is its slower direction's."""
        per_load = self.copy_s if mode == "inclusive" else max(self.copy_s, self.copy_back_s)
        return loads * per_load


@dataclass
class TimedRun:
    """One replay's timed decode steps: how long they took, and the cache counters they made."""

    policy: str
    slots: int | tuple[int, ...]  # one count for every layer, or one a layer
    mode: str
    prefetch: str
    depth: int | None
    tokens: int
    decode_s: float
    stall_s: float  # the host's waits for loads
    h2d_busy_s: float  # the host-to-device stream copying
    bound_s: float  # bench's bound: max(compute per token, missed loads' copy time per token)
    stats: LayerStats  # the timed steps' counters, all layers summed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s

    @property
    def fraction_of_bound(self) -> float:
        return self.bound_s * self.tokens_per_s

    def to_dict(self) -> dict:
        s = self.stats
        return {
            "policy": self.policy,
            "slots": self.slots,
            "mode": self.mode,
            "prefetch": self.prefetch,
            "depth": self.depth,
            "tokens": self.tokens,
            "decode_tokens_per_s": round(self.tokens_per_s, 4),
            "bound_tokens_per_s": round(1 / self.bound_s, 4),
            "fraction_of_bound": round(self.fraction_of_bound, 4),
            "hit_rate": round(s.hit_rate, 4),
            "misses": s.misses,
            "prefetches_used": s.prefetches_used,
            "stall_s": round(self.stall_s, 4),
            "link_busy": round(self.h2d_busy_s / self.decode_s, 4),  # share of the decode the link copied
        }


def prefill_request(tokens: Sequence[Token], layer: int, top_k: int) -> tuple[list[int], list[float]]:
    """A replayed prefill's request at `layer`, as the MoE block makes it from bench's replayed routing
    (each token's top-k gate weights scaled to sum to 1)."""
    ids = torch.tensor([t.layers[layer].experts[:top_k] for t in tokens])  # [T, k]
    weights = torch.tensor([t.layers[layer].weights[:top_k] for t in tokens], dtype=torch.float32)  # [T, k]
    return request_order(ids, weights / weights.sum(-1, keepdim=True))


class Clock:
    """Every layer's slots with times in place of CUDA events: when each load lands and when each stream
    is next free. Mirrors ExpertCache's fetch, prefetch and _load, the MoE block's order (offload/moe.py's
    decode_experts) and bench's OraclePrefetcher.

    ExpertCache also makes a load wait for the compute that last read its slot row, and a miss wait
    for an expert of its own request whose slot it takes. Neither can hold a decode step up here: with
    at least top-k slots a request never evicts its own experts, and every other row was last read at
    an earlier layer or token, whose compute had ended when the routing read that issues the load came
    back."""

    def __init__(self, tables: list[SlotTable], sequence: list[Token], costs: Costs, *, mode: str, prefetch: str,
                 depth: int, top_k: int) -> None:  # fmt: skip
        self.tables, self.sequence, self.costs, self.mode = tables, sequence, costs, mode
        self.prefetch, self.depth, self.top_k = prefetch, depth, top_k
        self.resident_s = costs.resident_s(len(tables), top_k)
        self.base = [sum(t.capacity for t in tables[:layer]) for layer in range(len(tables))]
        self.ready = [0.0] * sum(t.capacity for t in tables)  # slot -> when its last load lands
        self.host = self.device = self.h2d = self.d2h = 0.0  # when each is next free
        self.stall_s = self.h2d_busy_s = 0.0
        self.issued = -1  # the oracle's last (position, layer) loaded, flattened, as OraclePrefetcher's

    def experts(self, position: int, layer: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        request = self.sequence[position % len(self.sequence)].layers[layer]
        return request.experts[: self.top_k], request.weights[: self.top_k]

    def sync(self) -> float:
        """torch.cuda.synchronize: everything issued has ended."""
        self.host = self.device = max(self.host, self.device, self.h2d, self.d2h)
        return self.host

    def step(self, position: int) -> None:
        for layer in range(len(self.tables)):
            self.layer(position, layer)

    def layer(self, position: int, layer: int) -> None:
        """Resident part, routing read, this layer's loads, the oracle's, then the experts in turn."""
        experts, weights = self.experts(position, layer)
        self.device = max(self.device, self.host) + self.resident_s
        self.host = self.device  # the routing read waits for the resident part
        steps = self.tables[layer].request(experts, weights)
        self.host += self.costs.policy_s(len(experts), steps)
        for step in steps:
            if not step.hit:
                self.load(layer, step)
        self.ahead(position, layer)
        for step in steps:
            self.compute(layer, step)

    def ahead(self, position: int, layer: int) -> None:
        """The oracle: the loads of the next `depth` layers, in compute order, on into the next token."""
        if self.prefetch != "oracle":
            return
        layers = len(self.tables)
        now = position * layers + layer
        if not now <= self.issued <= now + self.depth:  # the first step
            self.issued = now
        for flat in range(self.issued + 1, now + self.depth + 1):
            self.load_guess(flat % layers, self.experts(*divmod(flat, layers))[0])
        self.issued = now + self.depth

    def load_guess(self, layer: int, experts: Sequence[int]) -> None:
        steps = self.tables[layer].prefetch(experts)
        self.host += self.costs.policy_s(0, steps)
        for step in steps:
            self.load(layer, step)

    def compute(self, layer: int, step: Step) -> None:
        """One expert: the host waits for its load if it has not landed, then the device computes it."""
        slot = self.base[layer] + step.slot
        if self.ready[slot] > self.host:  # the host waits on the load's event
            self.stall_s += self.ready[slot] - self.host
            self.host = self.ready[slot] + self.costs.wake_s
        self.device = max(self.device, self.host) + self.costs.expert_s

    def load(self, layer: int, step: Step) -> None:
        """One load on the copy stream. In exclusive mode a swap: the victim goes back on the other
        stream, and each direction first waits for the previous swap's copy the other way."""
        start = max(self.h2d, self.host)
        if self.mode == "exclusive":
            back = max(self.d2h, self.host, self.h2d) + self.costs.copy_back_s  # self.h2d: the last swap's in
            start = max(start, self.d2h)  # the last swap's back
            self.d2h = back
        self.ready[self.base[layer] + step.slot] = self.h2d = start + self.costs.copy_s
        self.h2d_busy_s += self.costs.copy_s


def timeline(
    trace: Trace,
    costs: Costs,
    *,
    policy: str = "lru",
    slots: int | Sequence[int] = 5,
    mode: str = "inclusive",
    prefetch: str = "oracle",
    depth: int | None = None,
    top_k: int | None = None,
    num_experts: int | None = None,
    tokens: int = 128,
    prompt_tokens: int = 16,
    warmup: int = 2,
    no_cache: bool = False,
    clock_class: type[Clock] = Clock,
) -> TimedRun:
    """Replay `trace` as `bench --route-trace` would decode it, and time it with `costs`.

    `slots` is one count for every layer or one a layer (as bench's plan may give them).
    `prefetch` oracle loads the next `depth` layers' experts at each layer (None: every layer but one),
    as bench's OraclePrefetcher; none loads on demand only. `top_k`: the experts a token uses (None: the
    most a replayed row names, the model's top-k in a trace the model wrote; a row with fewer is refused).
    `no_cache` empties the slots before every step (bench's no_cache baseline). Exclusive mode starts
    with experts 0..slots-1 in every layer's slots, as a freshly loaded model does. `clock_class` times the
    steps (a subclass may order them otherwise: benchmarks/timeline_check.py replays an earlier commit's
    order)."""
    layers = trace.num_layers
    num_experts = num_experts or trace.num_experts
    if top_k is None:
        top_k = max(len(request.experts) for token in trace.longest_decode(1) for request in token.layers)
    # a bad value names the CLI's option, which passes its values here: one check serves `timeline` and Python
    if prefetch not in PREFETCH:
        raise MoEOffloadError(f"--prefetch {prefetch!r} is unknown here: choose {' or '.join(PREFETCH)}")
    if policy not in POLICIES or POLICIES[policy].offline:
        online = ", ".join(name for name, p in POLICIES.items() if not p.offline)
        raise MoEOffloadError(f"--policy {policy!r} is unknown or offline: choose one of {online}")
    check_mode(mode)
    capacities = layer_slots(slots, layers)
    if not top_k <= min(capacities) <= max(capacities) <= num_experts:
        got = slots if isinstance(slots, int) else f"{min(capacities)} to {max(capacities)}"
        raise MoEOffloadError(f"--slots must be between {top_k} (top-k) and {num_experts} (the experts per layer), "
                              f"got {got}")  # fmt: skip
    if no_cache and mode == "exclusive":
        raise MoEOffloadError("no cache empties the slots, which exclusive mode cannot: use inclusive mode")
    depth = layers - 1 if depth is None else depth
    if prefetch == "oracle" and layers < 2:
        raise MoEOffloadError(f"trace {trace.path} has one layer: the oracle loads later layers; use --prefetch none")
    if prefetch == "oracle" and not 1 <= depth < layers:
        raise MoEOffloadError(f"--depth must be between 1 and {layers - 1} (the layers but one), got {depth}")
    if tokens < 1:
        raise MoEOffloadError(f"--tokens must be at least 1, got {tokens}")
    if prompt_tokens < 1:  # no CLI option: the keyword
        raise MoEOffloadError(f"prompt_tokens must be at least 1, got {prompt_tokens}")

    sequence = trace.longest_decode(top_k)
    stats = CacheStats.for_layers(layers)
    policies = make_policies(policy, layers, num_experts)
    tables = [SlotTable(k, p, s) for k, p, s in zip(capacities, policies, stats.per_layer)]
    if mode == "exclusive":
        for table in tables:
            table.fill()
    clock = clock_class(tables, sequence, costs, mode=mode, prefetch=prefetch, depth=depth, top_k=top_k)

    def step(position: int) -> None:
        if no_cache:
            for table in tables:
                table.reset()
        clock.step(position)

    prompt = [sequence[p % len(sequence)] for p in range(prompt_tokens)]
    for layer in range(layers):  # the prefill: one request per layer, untimed
        tables[layer].request(*prefill_request(prompt, layer, top_k))
    for position in range(prompt_tokens, prompt_tokens + warmup):
        step(position)
    start, before = clock.sync(), stats.total()
    for table in tables:  # as bench: the copies have landed, and the window counts its own prefetches
        table.settle_prefetches()
    stall_before, busy_before = clock.stall_s, clock.h2d_busy_s
    for position in range(prompt_tokens + warmup, prompt_tokens + warmup + tokens):
        step(position)
    decode_s = clock.sync() - start
    after = stats.total()
    decode = after - before
    missed = (decode.misses + decode.prefetches_used) / tokens
    bound_s = max(costs.compute_s, costs.copies_s(missed, mode))
    depth = depth if prefetch == "oracle" else None
    return TimedRun(policy, slots_label(capacities), mode, prefetch, depth, tokens, decode_s,
                    clock.stall_s - stall_before, clock.h2d_busy_s - busy_before, bound_s, decode)  # fmt: skip
