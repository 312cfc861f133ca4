"""What the planner's leftover slots are worth: an even split against the planner's, on the Mixtral trace.

python benchmarks/planned_slots.py [--trace PATH] [--out benchmarks/results/planned_slots.json]

For synthetic Mixtral-8x7B with 2-bit experts (66.7 MB an expert; the resident weights measured from
synth's own tensors; what a prefill of the whole context needs kept free, as the runtime plans it), each
GPU budget and context gives a number of slots for all layers together.
An even split uses `layers x (total // layers)` of them; the planner (offload/planner.py) hands the rest
to the first layers, one each. For both it prints the slots used, the hit rate LRU and path reach on
the shared trace (simulate, no prefetch), and the decode the time-line model predicts with LRU and the
oracle at the H100 costs of `moe-offload timeline`'s defaults. A model on one trace, not a GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from cache.simulate import simulate  # noqa: E402
from cache.timeline import H100, Costs, timeline  # noqa: E402
from cache.trace import read_trace  # noqa: E402
from offload.bench import bench_context, environment, write_json  # noqa: E402
from offload.planner import GiB, plan_memory  # noqa: E402
from offload.synth import prefill_reserve, preset_config, resident_bytes, synthetic_format  # noqa: E402
from quant.files import check_writable  # noqa: E402

SHARED_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
BUDGETS_GIB = (8, 10, 12, 15)
BENCH_CONTEXT = bench_context(prompt_tokens=16, tokens=128)  # bench's defaults: 147
CONTEXTS = (4096, BENCH_CONTEXT)  # the default context, and bench's
COSTS = Costs.from_rates(**H100)  # `moe-offload timeline`'s defaults


@functools.cache
def _resident_bytes() -> int:
    """On the GPU: what synth writes but the embedding table, which a CUDA run keeps in RAM (offload/embedding.py)."""
    return resident_bytes("mixtral-8x7b") - _host_resident_bytes()


def _host_resident_bytes() -> int:
    config = preset_config("mixtral-8x7b")
    return config.vocab_size * config.hidden_size * torch.bfloat16.itemsize  # the embedding table


@functools.cache
def _reserve(context: int) -> int:
    return prefill_reserve("mixtral-8x7b", context)


def mixtral_plan(gpu_gib: float, context: int) -> tuple[int, ...]:
    """The planner's slots per layer for synthetic 2-bit Mixtral-8x7B (bfloat16 KV cache)."""
    config = preset_config("mixtral-8x7b")
    plan = plan_memory(device=torch.device("cuda"), num_layers=config.num_layers, num_experts=config.num_experts,
                       expert_bytes=synthetic_format(config, "2").nbytes, resident_bytes=_resident_bytes(),
                       host_resident_bytes=_host_resident_bytes(),
                       kv_bytes=config.kv_cache_bytes(context, torch.bfloat16), reserve_bytes=_reserve(context),
                       device_budget=int(gpu_gib * GiB), host_budget=64 * GiB)  # fmt: skip
    return plan.slots_per_layer


def timed(trace, slots: tuple[int, ...], top_k: int) -> float | None:
    """The time line's decode, LRU with the oracle; None where a layer has fewer slots than top-k."""
    return round(timeline(trace, COSTS, slots=slots).tokens_per_s, 2) if min(slots) >= top_k else None


def best_split(trace, policy: str, total: int) -> tuple[tuple[int, ...], float]:
    """The split of `total` slots over the layers that hits most on `trace`, chosen with the trace in
    hand (an upper bound for any split fixed in advance): each layer's hits at 1..E slots, as layers
    count apart, then a knapsack over the layers. Returns the split and its hit rate."""
    by_slots = {k: simulate(trace, policy, k) for k in range(1, trace.num_experts + 1)}
    best = {0: (0, ())}  # slots given so far -> (most hits, the split that gets them)
    for layer in range(trace.num_layers):
        after: dict[int, tuple[int, tuple[int, ...]]] = {}
        for used, (hits, split) in best.items():
            for k, run in by_slots.items():
                candidate = (hits + run.per_layer[layer].hits, split + (k,))
                if used + k <= total and candidate[0] > after.get(used + k, (-1,))[0]:
                    after[used + k] = candidate
        best = after
    hits, split = best[total]
    return split, hits / by_slots[1].requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=SHARED_TRACE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "planned_slots.json")
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    config = preset_config("mixtral-8x7b")
    trace = read_trace(args.trace)
    rows = []
    for context in CONTEXTS:
        for gib in BUDGETS_GIB:
            planned = mixtral_plan(gib, context)
            even = (min(planned),) * config.num_layers
            row = {"gpu_gib": gib, "context": context}
            for name, slots in (("even", even), ("planned", planned)):
                row[name] = {
                    "slots": sum(slots),
                    "lru_hit_rate": round(simulate(trace, "lru", slots).hit_rate, 4),
                    "path_hit_rate": round(simulate(trace, "path", slots).hit_rate, 4),
                    "lru_oracle_tokens_per_s": timed(trace, slots, config.top_k),
                }
            # the remainder in the last layers instead: how much the choice of layers matters
            row["planned"]["lru_hit_rate_remainder_last"] = round(simulate(trace, "lru", planned[::-1]).hit_rate, 4)
            rows.append(row)

    five, six = (simulate(trace, "lru", k).per_layer for k in (5, 6))
    gains = [b.hits - a.hits for a, b in zip(five, six)]  # what a sixth slot gains, layer by layer
    split, rate = best_split(trace, "lru", 5 * config.num_layers)
    even_rate = simulate(trace, "lru", 5).hit_rate
    best = {"policy": "lru", "slots": 5 * config.num_layers, "split": list(split), "hit_rate": round(rate, 4),
            "even_hit_rate": round(even_rate, 4)}  # fmt: skip

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"even split -> planned slots, synthetic Mixtral-8x7B 2-bit, {args.trace.name}")  # fmt: skip
    for column in ("GPU", "context", "slots", "LRU hit rate", "path hit rate", "tok/s (model: LRU, oracle)"):
        table.add_column(column, justify="right", no_wrap=True)

    def change(key: str, form: str) -> str:
        before, after = row["even"][key], row["planned"][key]
        return "-" if before is None else f"{before:{form}} -> {after:{form}}"

    for row in rows:
        table.add_row(f"{row['gpu_gib']} GiB", str(row["context"]), change("slots", "d"),
                      change("lru_hit_rate", ".3f"), change("path_hit_rate", ".3f"),
                      change("lru_oracle_tokens_per_s", ".2f"))  # fmt: skip
    console = Console(width=120)
    console.print(table)
    moved = max(abs(r["planned"]["lru_hit_rate_remainder_last"] - r["planned"]["lru_hit_rate"]) for r in rows)
    console.print(f"the remainder in the last layers instead of the first: LRU hit rate changes by {moved:.4f} at most")
    console.print(f"a sixth slot gains {min(gains)} to {max(gains)} hits a layer (LRU; layer 0: {gains[0]})")
    console.print(f"the best split of {best['slots']} slots chosen with the trace in hand (LRU): hit rate "
                  f"{rate:.4f} against {even_rate:.4f} for 5 in every layer")  # fmt: skip
    record = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "trace": str(args.trace),
        "expert_bytes": synthetic_format(config, "2").nbytes,
        "resident_bytes": _resident_bytes(),  # on the GPU
        "host_resident_bytes": _host_resident_bytes(),  # in RAM: the embedding table
        "reserve_bytes": {str(context): _reserve(context) for context in CONTEXTS},  # kept for a prefill
        "costs": dataclasses.asdict(COSTS),
        "results": rows,
        "best_static_split": best,
        "lru_sixth_slot_gain_by_layer": gains,
    }
    write_json(args.out, record, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
