"""Experts in huge pages against 4 KiB pages, on the CPU, in one process taking turns.

    python benchmarks/huge_pages.py [--experts 8] [--tokens 1] [--rounds 4] [--seconds 5] [--out OUT]

On the CPU the experts are computed where they lie, and the expert cache asks Linux for huge pages there
(cache/expert_cache.py: huge_pages). This packs `--experts` synthetic 2-bit Mixtral-8x7B experts into two arenas,
one left in 4 KiB pages and one advised into huge pages, then multiplies a token by their w1 and w2 matrices, the
experts in turn, each arena for `--seconds` a round, the two in turn. Each figure is a round's milliseconds a call.
Writes benchmarks/results/huge_pages.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from cache.expert_cache import huge_pages  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import cpu_gemv  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace  # noqa: E402
from quant.packing import ExpertFormat  # noqa: E402

PAGES = ("4 KiB", "huge")


def arena(experts: int, fmt: ExpertFormat, grid: ExpertFormat, huge: bool) -> tuple[torch.Tensor, float]:
    """`experts` synthetic experts packed into fresh rows, advised into huge pages first with `huge`; and the
    seconds the packing took (it writes, so faults, every page)."""
    rows = torch.empty(experts, fmt.nbytes, dtype=torch.uint8)
    if huge and not huge_pages(rows):
        raise MoEOffloadError("Linux gave no huge pages here (/sys/kernel/mm/transparent_hugepage/enabled: never?)")
    experts_in_grid = [grid.random(torch.Generator().manual_seed(seed)) for seed in range(experts)]
    begin = time.perf_counter()
    for row, expert in zip(rows, experts_in_grid, strict=True):
        fmt.pack(**grid.unpack(expert), out=row)
    return rows, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="each arena's time a round")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "huge_pages.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    grid = ExpertFormat.build(4096, 14336, EXPERT_PRESETS["2"], torch.bfloat16)
    fmt = grid.on_cpu()  # as load holds them on the CPU
    arenas, pack_s = {}, {}
    for pages in PAGES:
        rows, pack_s[pages] = arena(args.experts, fmt, grid, huge=pages == "huge")
        arenas[pages] = [fmt.unpack(row) for row in rows]
    x = {name: torch.randn(args.tokens, k, generator=torch.Generator().manual_seed(1))
         for name, k in (("w1", 4096), ("w2", 14336))}  # fmt: skip
    workspace, runs = Workspace(), []
    print(f"{'round':>5} {'matrix':>6} " + " ".join(f"{pages + ', ms':>12}" for pages in PAGES))
    for round_ in range(1, args.rounds + 1):
        for matrix in ("w1", "w2"):
            row = {"round": round_, "matrix": matrix}
            for pages in PAGES:
                weights = itertools.cycle([expert[matrix] for expert in arenas[pages]])
                for _ in range(2 * args.experts):  # the kernel built, the caches warm
                    cpu_gemv.gemv(x[matrix], next(weights), workspace=workspace)
                calls, begin = 0, time.perf_counter()
                while time.perf_counter() - begin < args.seconds:
                    cpu_gemv.gemv(x[matrix], next(weights), workspace=workspace)
                    calls += 1
                row[pages] = round((time.perf_counter() - begin) / calls * 1000, 4)
            runs.append(row)
            print(f"{round_:>5} {matrix:>6} " + " ".join(f"{row[pages]:>12.3f}" for pages in PAGES))
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": "synthetic mixtral-8x7b experts, 2-bit, scales and zeros by output",
        "experts": args.experts,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "pack_s": {pages: round(seconds, 3) for pages, seconds in pack_s.items()},
        "ms_per_call": runs,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
