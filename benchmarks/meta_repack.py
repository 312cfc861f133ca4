"""What holding an expert's scales and zeros in another order costs: at load, and at each kernel call.

    python benchmarks/meta_repack.py [--hidden 4096] [--intermediate 14336] [--expert-bits 2] [--rounds 5]
                                     [--out OUT]

Files keep every expert's meta in grid order; a load on the CPU repacks each one by output, and one with
--meta-rows by packed row (quant/packing.py, ExpertFormat.in_order). For each order, this times putting one
expert of Mixtral-8x7B's shapes, as its file holds it, into a row of the arena: a plain copy for grid order,
ExpertFormat.pack for the others (the best of --rounds). It also times the Python check gemv.supports makes of
w1's layout at every call, which a decode in CUDA graphs pays only at capture (--no-cuda-graphs pays it each
call). Writes benchmarks/results/meta_repack.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import ms_per_call, run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import gemv  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import EXPERT_PRESETS  # noqa: E402
from quant.packing import META_ORDERS, ExpertFormat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--expert-bits", default="2", choices=[bits for bits, spec in EXPERT_PRESETS.items() if spec])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta_repack.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    if args.rounds < 1:
        raise MoEOffloadError(f"--rounds must be at least 1, got {args.rounds}")
    grid = ExpertFormat.build(args.hidden, args.intermediate, EXPERT_PRESETS[args.expert_bits], torch.bfloat16)
    stored = grid.random(torch.Generator().manual_seed(0))  # as a file holds it
    x = torch.randn(1, args.hidden)
    rows = []
    print(f"{'order':>6} {'held as':>7} {'ms an expert':>13} {'supports us':>12}")
    for order in META_ORDERS:
        fmt = grid.in_order(order)
        row = torch.empty(fmt.nbytes, dtype=torch.uint8)  # a row of the arena
        times = []
        for _ in range(args.rounds):
            begin = time.perf_counter()
            if fmt is grid:
                row.copy_(stored)
            else:
                fmt.pack(**grid.unpack(stored), out=row)
            times.append((time.perf_counter() - begin) * 1000)
        w1 = fmt.unpack(row)["w1"]
        check_us = ms_per_call(lambda w1=w1: gemv.supports(x, w1), 2000) * 1000
        rows.append({"order": order, "held_as": fmt.meta_order, "ms_per_expert": round(min(times), 2),
                     "supports_us": round(check_us, 2), "kernel_reads_it": gemv.supports(x, w1)})  # fmt: skip
        print(f"{order:>6} {fmt.meta_order:>7} {min(times):>13.2f} {check_us:>12.2f}")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "expert": dict(hidden=args.hidden, intermediate=args.intermediate, bits=args.expert_bits, bytes=grid.nbytes),
        "results": rows,
        "note": "ms_per_expert: the best of the rounds, one expert into a reused row; supports_us: gemv.supports on "
        "w1 (the Triton kernel serves output order on no matrix: kernel_reads_it false there)",
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
