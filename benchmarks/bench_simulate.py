"""Time every policy x slots 1..8 on the shared Mixtral trace; print the table and write JSON.

python benchmarks/bench_simulate.py [--trace PATH] [--out benchmarks/results/simulate_shared_trace.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from benchmarks import run_script  # noqa: E402
from cache.policies import POLICIES  # noqa: E402
from cache.simulate import simulate  # noqa: E402
from cache.trace import read_trace  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant.files import check_writable  # noqa: E402

SHARED_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
SLOTS = range(1, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=SHARED_TRACE)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "simulate_shared_trace.json")
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    start = time.perf_counter()
    trace = read_trace(args.trace)
    results = [simulate(trace, name, slots) for name in POLICIES for slots in SLOTS]
    seconds = time.perf_counter() - start

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"hit rate on {args.trace.name} ({len(trace.tokens)} tokens, {trace.num_layers} layers)",
    )
    table.add_column("policy", no_wrap=True)
    for slots in SLOTS:
        table.add_column(str(slots), justify="right", no_wrap=True)
    for name in POLICIES:
        table.add_row(name, *(f"{r.hit_rate:.4f}" for r in results if r.policy == name))
    console = Console()
    console.print(table)
    console.print(f"{len(POLICIES)} policies x {len(SLOTS)} slot counts in {seconds:.2f} s (reading included)")

    record = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "results": [r.to_dict() for r in results],
        "seconds": round(seconds, 3),
    }
    write_json(args.out, record, "--out")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
