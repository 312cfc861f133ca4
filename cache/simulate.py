"""Replay a routing trace through the runtime's own SlotTable and policy objects, counting only.

The rules are the runtime's because the engine is the runtime's: one SlotTable per layer (one
request served as a unit, misses in router order), one policy instance per layer made by
`make_policies`, and every table reset at the start of each sequence: emptied, or in exclusive mode
full from the start (experts 0..K-1) and keeping its experts across sequences. A prefetch predictor,
when given, guesses layer l+1's experts once layer l is known, and the guess goes through
`SlotTable.prefetch` before layer l+1's request, exactly as the runtime would issue it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cache.policies import POLICIES, make_policies
from cache.predictors import make_predictor
from cache.stats import CacheStats, LayerStats
from cache.table import SlotTable, check_mode, layer_slots, slots_label
from cache.trace import Trace
from quant.errors import MoEOffloadError


@dataclass
class SimResult:
    """One replay: the policy, slot count and predictor, and the counters of every layer."""

    policy: str
    slots: int | tuple[int, ...]  # one count for every layer, or one a layer
    prefetch: str
    stats: CacheStats
    tokens: int
    mode: str = "inclusive"  # the cache mode replayed

    @property
    def hit_rate(self) -> float:
        return self.stats.total().hit_rate

    @property
    def hits(self) -> int:
        return self.stats.total().hits

    @property
    def misses(self) -> int:
        return self.stats.total().misses

    @property
    def requests(self) -> int:
        return self.stats.total().requests

    @property
    def recall(self) -> float | None:
        """Share of asked-for experts the predictor had guessed; None without a predictor."""
        return self.stats.total().recall

    @property
    def per_layer(self) -> list[LayerStats]:
        return self.stats.per_layer

    def to_dict(self, per_layer: bool = False) -> dict:
        total = self.stats.total()
        row = {
            "policy": self.policy,
            "slots": self.slots,
            "prefetch": self.prefetch,
            "mode": self.mode,
            "hit_rate": round(total.hit_rate, 6),
            "hits": total.hits,
            "requests": total.requests,
            "misses": total.misses,
            "tokens": self.tokens,
            "prefetches_issued": total.prefetches_issued,
            "prefetches_used": total.prefetches_used,
            "prefetches_wasted": total.prefetches_wasted,
            "recall": None if total.recall is None else round(total.recall, 6),
        }
        if per_layer:
            row["per_layer"] = [
                {"layer": i, **{k: layer.to_dict()[k] for k in _LAYER_KEYS}}
                for i, layer in enumerate(self.stats.per_layer)
            ]
        return row


_LAYER_KEYS = ("hit_rate", "hits", "requests", "misses", "prefetches_issued", "prefetches_used", "prefetches_wasted",
               "recall")  # fmt: skip


def simulate(
    trace: Trace,
    policy: str,
    slots: int | Sequence[int],
    prefetch: str = "none",
    mode: str = "inclusive",
    **params: float,
) -> SimResult:
    """Replay `trace` with `slots` experts per layer (one count, or one a layer) under `policy` (a
    POLICIES name), with the cache `mode` the runtime ran (exclusive: the slots start and stay full).

    `params` go to the policy's constructor. The per-layer counters are always kept:
    `SimResult.to_dict(per_layer=True)` prints them.
    """
    check_mode(mode)
    sequences = trace.sequences()
    stats = CacheStats.for_layers(trace.num_layers)
    futures = None
    if policy in POLICIES and POLICIES[policy].offline:  # an offline policy is also given the future
        futures = [[[t.layers[layer].experts for t in run] for run in sequences] for layer in range(trace.num_layers)]
    policies = make_policies(policy, trace.num_layers, trace.num_experts, futures=futures, **params)
    capacities = layer_slots(slots, trace.num_layers)
    tables = [SlotTable(k, p, layer_stats) for k, p, layer_stats in zip(capacities, policies, stats.per_layer)]
    predictor = make_predictor(prefetch, trace)
    exclusive = mode == "exclusive"
    if exclusive:
        for table in tables:
            table.fill()
    for sequence in sequences:
        for table in tables:
            table.reset(keep_residents=exclusive)
        if predictor is None:
            for token in sequence:
                for table, request in zip(tables, token.layers):
                    table.request(request.experts, request.weights)
            continue
        predictor.reset()
        for token in sequence:
            decode = token.phase == "decode"
            for layer, request in enumerate(token.layers):
                if decode and layer > 0:
                    guess = predictor.guess(layer, token.layers[:layer], request.guess)
                    if guess:
                        tables[layer].prefetch(guess)
                tables[layer].request(request.experts, request.weights)
                if decode:
                    predictor.observe(layer, request)
    for table, layer_stats in zip(tables, stats.per_layer):
        # the run is over: prefetched experts no request used count as wasted, as at a reset
        layer_stats.prefetches_wasted += len(table.unused_prefetches)
    return SimResult(policy, slots_label(capacities), prefetch, stats, len(trace.tokens), mode)


@dataclass(frozen=True)
class HeldOut:
    """One sequence replayed with the parameters that did best on the other sequences."""

    reported_on: int  # the sequence scored
    tuned_on: tuple[int, ...]  # the sequences the parameters were chosen on
    params: dict
    tuned_hit_rate: float  # on `tuned_on`, with `params`
    hits: int  # on `reported_on`
    requests: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def tune(trace: Trace, policy: str, slots: int, grid: Mapping[str, Sequence[float]]) -> tuple[dict, float]:
    """The grid point with the most hits on `trace` (the first one on a tie), and its hit rate."""
    best_params: dict = {}
    best_hits, requests = -1, 0
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        total = simulate(trace, policy, slots, **params).stats.total()
        if total.hits > best_hits:
            best_params, best_hits, requests = params, total.hits, total.requests
    return best_params, best_hits / requests if requests else 0.0


def held_out(trace: Trace, policy: str, slots: int, grid: Mapping[str, Sequence[float]]) -> list[HeldOut]:
    """Each sequence scored with the grid point that did best on all the other sequences."""
    sequence_ids = trace.sequence_ids
    if len(sequence_ids) < 2:
        raise MoEOffloadError(f"trace {trace.path} has one sequence: held-out tuning needs two or more")
    rows = []
    for sequence in sequence_ids:
        others = tuple(s for s in sequence_ids if s != sequence)
        params, tuned_hit_rate = tune(trace.select(others), policy, slots, grid)
        total = simulate(trace.select([sequence]), policy, slots, **params).stats.total()
        rows.append(HeldOut(sequence, others, params, tuned_hit_rate, total.hits, total.requests))
    return rows
