"""The CPU's fused kernel against dequantizing in tiles, one Mixtral-8x7B expert matrix, by tokens.

    python benchmarks/cpu_gemv_tokens.py [--bits 2,3,4] [--tokens 1,2,4,8,16,32,64] [--rounds 3]
                                         [--token-type int8|float32] [--vnni 512|256] [--matrices N]
                                         [--meta-order output|grid]

For each expert preset, a synthetic 14336 x 4096 matrix (w1's shape) times 1 to 64 float32 tokens: through
quant/cpu_gemv.py (its limits lifted, to show where they should lie) and through quant/linear.py's tiles.
The two take turns, `--rounds` times; each figure is the fastest round. The C rounds tokens to int8 where
the CPU has VNNI (the default there), at its widest (`--vnni 256`: AVX-VNNI's loop, where the CPU has
both), or keeps them float32 (`--token-type float32`, and where it has none). `--matrices N` multiplies N
matrices in turn, each call the next, so that with N of 3 or more (44 MB and over) the weights come from memory
and not from the cache, as in decode, where a step reads each expert once; the default, 1, times one matrix
over and over, out of the cache when it fits (a 2-bit one, 22 MB with its scales, fits a 32 MB L3). 8-bit scale
and zero codes (2-bit's) are by output, as load holds experts on the CPU, or in grid order (`--meta-order grid`), as
files keep them (quant/packing.py). Writes
benchmarks/results/cpu_gemv_tokens.json: what MAX_TOKENS, MAX_TOKENS_BLOCKED and MAX_TOKENS_3BIT in quant/cpu_gemv.py
rest on, and why int8 tokens' loops have no such limit.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import ms_per_call, run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import cpu_gemv  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace, random_quantized  # noqa: E402
from quant.linear import linear  # noqa: E402
from quant.packing import by_output, with_meta_by_output  # noqa: E402

SHAPE = (14336, 4096)  # Mixtral-8x7B's w1
TOKENS = {"float32": "float32 tokens", "int8": "int8 tokens (3-bit's loop keeps them float32)"}


def in_turn(call, weights: Iterator):
    """call(weight) on the next of `weights` at each call: the weights taken in turn, for ms_per_call."""
    return lambda: call(next(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-type", choices=("int8", "float32"), default="int8")
    parser.add_argument("--vnni", type=int, choices=(512, 256), help="the int8 loop's width (default: the widest)")
    parser.add_argument("--matrices", type=int, default=1, help="matrices taken in turn (3 or more: out of cache)")
    order = "8-bit scales and zeros by output (as load holds them on the CPU) or in grid order (as files keep them)"
    parser.add_argument("--meta-order", choices=("output", "grid"), default="output", help=order)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_gemv_tokens.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    cpu_gemv.INT8_TOKENS = args.token_type == "int8"
    widths = cpu_gemv.vnni_widths(cpu_gemv.library())
    if cpu_gemv.INT8_TOKENS and not widths:
        raise SystemExit("--token-type int8: this CPU has no VNNI; pass --token-type float32")
    if args.vnni is not None:
        if args.vnni not in widths:
            raise SystemExit(f"--vnni {args.vnni}: this CPU has {' and '.join(map(str, widths)) or 'none'}")
        cpu_gemv.vnni = lambda lib: args.vnni

    most = max(map(int, args.tokens.split(",")))
    cpu_gemv.MAX_TOKENS = cpu_gemv.MAX_TOKENS_BLOCKED = cpu_gemv.MAX_TOKENS_3BIT = most  # int8's have none
    rows = []
    for bits in args.bits.split(","):
        weights = [random_quantized(SHAPE, EXPERT_PRESETS[bits], torch.Generator().manual_seed(seed))
                   for seed in range(args.matrices)]  # fmt: skip
        if args.meta_order == "output" and by_output(SHAPE, EXPERT_PRESETS[bits]):
            weights = [with_meta_by_output(weight) for weight in weights]
        turn = itertools.cycle(weights)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, SHAPE[1], generator=torch.Generator().manual_seed(1))
            fused, tiles = Workspace(), Workspace()
            rounds = {"c_ms": [], "tiles_ms": []}
            c_call = in_turn(functools.partial(cpu_gemv.gemv, x, workspace=fused), turn)
            tiles_call = in_turn(functools.partial(linear, x, workspace=tiles), turn)
            for _ in range(args.rounds):
                rounds["c_ms"].append(ms_per_call(c_call, 5))
                rounds["tiles_ms"].append(ms_per_call(tiles_call, 3))
            row = {"bits": int(bits), "tokens": tokens, **{k: round(min(v), 2) for k, v in rounds.items()}}
            rows.append(row)
            print(f"{bits}-bit, {tokens:2} tokens: C {row['c_ms']:7.2f} ms, tiles {row['tiles_ms']:7.2f} ms")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "matrix": f"{SHAPE[0]} x {SHAPE[1]}, {TOKENS[args.token_type]}",
        "matrices": args.matrices,
        "meta_order": args.meta_order,
        "vnni_bits": cpu_gemv.int8_width(),
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
