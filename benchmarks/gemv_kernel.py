"""The fused dequantize+GEMV kernel against dequantize-then-matmul, on Mixtral-8x7B's expert shapes (CUDA).

    python benchmarks/gemv_kernel.py [--sweep] [--variants] [--copies N] [--dtype bfloat16]
        [--out benchmarks/results/gemv_kernel.json]

For 2-, 3- and 4-bit experts and one token: microseconds per matrix, the quantized bytes each read per second, w1
and w3 as one gated launch (gemv.gated) against the two apart, and one whole expert MLP (w1, w3, w2) dequantized,
fused with w1 and w3 apart, and fused with them gated (gemv.GATED). Where the meta can lie by packed row (2 bits:
quant/packing.py's with_meta_by_row), each matrix and the gated pair are timed so too (quant/gemv.py's META_ROWS).
Times are device time per call, from CUDA graphs of back-to-back calls (fused_eager_us adds what a Python caller pays:
Triton's launch on the host), over copies of the weights that together overflow L2, so every call reads its codes from
memory as a decode step does.
--variants also times each (late_sum, fast_codes, stages, mantissa_codes) variant of the kernel (mantissa_codes only
where it applies: 2 and 4 bits), the default launch with K split over 2, 4 and 8 programs (SPLITS) and with
early_meta flipped (the gated pair's too), and the default variant at a few other 2-bit launches (LAUNCHES);
--sweep times every launch shape (block_n x block_k x warps, per variant with --variants), reporting the best per
matrix, to choose quant/gemv.py's defaults.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.moe import expert_mlp  # noqa: E402
from quant import gemv  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.gemv_tune import KEYWORDS, LAUNCH_SHAPES, VARIANTS, multiply, timed_us  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace, dequantize, quantized_nbytes  # noqa: E402
from quant.linear import TRITON, linear  # noqa: E402
from quant.packing import ExpertFormat, by_row, with_meta_by_row  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 14336  # Mixtral-8x7B
# With --variants, the default variant at these launches (block_n, block_k, warps) too: 9d0bc23's sweep found w2's
# best, (1, 2048, 2), apart from w1's, which is the 2-bit default; these few time w2's and two between, where a
# whole sweep (--sweep) takes longer than a GPU call has
LAUNCHES = {2: [(1, 2048, 2), (1, 1024, 2), (2, 1024, 2)]}
SPLITS = (2, 4, 8)  # with --variants, the default launch with K split over these many programs (gemv.SPLIT_K)


def on_copies(fn, x, copies: list, *args, **kwargs) -> list:
    """fn(x, copy, *args, **kwargs) for each copy of the weights: the calls that timed_us takes in turn."""
    return [functools.partial(fn, x, copy, *args, **kwargs) for copy in copies]


def eager_us(calls: list, repeats: int = 50) -> float:
    """Median microseconds of one call as a Python caller pays for it: CUDA events around each call on an
    idle device, so the host's launch is in the figure."""
    for call in calls:
        call()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def best_launch(calls_with, packed: bool) -> dict:
    """The fastest launch shape of LAUNCH_SHAPES: calls_with(block_n=, block_k=, num_warps=) makes the calls to time."""
    timings = []
    for n, k, w in itertools.product(*LAUNCH_SHAPES[packed]):
        try:
            timings.append((timed_us(calls_with(block_n=n, block_k=k, num_warps=w), repeats=20), n, k, w))
        except gemv.CANNOT_LAUNCH:  # e.g. pipelined stages of a large tile: no launch
            continue
    us, n, k, w = min(timings)
    return {"us": round(us, 1), "block_n": n, "block_k": k, "num_warps": w}


def measure(device: torch.device, dtype: torch.dtype, l2_bytes: int, args: argparse.Namespace) -> tuple[list, list]:
    """Each bits' w1 and w2 as main's options ask (variants, sweep, copies), and the whole expert MLP both ways:
    main's "matrices" and "expert_mlp". Separate from main so that a test runs it on the CPU, interpreted."""
    rows, mlps = [], []
    for bits in ("2", "3", "4"):
        fmt = ExpertFormat.build(HIDDEN, INTERMEDIATE, EXPERT_PRESETS[bits], dtype)
        nbytes = quantized_nbytes((INTERMEDIATE, HIDDEN), fmt.spec)  # w2's too: the same number of weights
        copies = args.copies or math.ceil(2 * l2_bytes / nbytes)
        experts = []  # `copies` random experts: a call reads what the call before it evicted from L2
        for seed in range(copies):
            packed = torch.empty(fmt.nbytes, dtype=torch.uint8, device=device)
            experts.append(fmt.unpack(fmt.random(torch.Generator(device).manual_seed(seed), packed)))
        x = torch.randn(1, HIDDEN, device=device, dtype=dtype)
        for name in ("w1", "w2"):  # w3 has w1's shape
            q = experts[0][name]
            xin = x if name == "w1" else torch.randn(1, INTERMEDIATE, device=device, dtype=dtype)
            out = torch.empty(1, q.shape[0], device=device, dtype=dtype)
            workspace = Workspace()
            reference = xin.float() @ dequantize(q, torch.float32).T
            error = (gemv.gemv(xin, q, out).float() - reference).abs().max().item() / reference.abs().max().item()
            matrices = [weights[name] for weights in experts]
            # (**gemv's keywords); the workspace holds split-K's partial sums, as in decode
            fused_calls = functools.partial(on_copies, gemv.gemv, xin, matrices, out, Workspace())
            unfused = timed_us(on_copies(linear, xin, matrices, workspace, out))
            fused_us, fused_eager = timed_us(fused_calls()), eager_us(fused_calls())
            together = gemv._rows_together(q)
            row = {"bits": int(bits), "matrix": name, "shape": list(q.shape), "quantized_bytes": nbytes,
                   "rows_together": together, "weight_copies": copies,
                   "dequantize_matmul_us": round(unfused, 1), "fused_us": round(fused_us, 1),
                   "fused_eager_us": round(fused_eager, 1), "fused_gb_per_s": round(nbytes / fused_us / 1e3, 1),
                   "relative_error": error}  # fmt: skip
            sweep = args.sweep and bits in args.sweep_bits.split(",")
            mantissa = gemv.reads_bytes(q)
            default = gemv.default_variant(q)
            if args.variants:
                row["variants"] = []  # each variant at the default launch, and its best with --sweep
                for variant in VARIANTS:
                    late_sum, fast_codes, stages, mantissa_codes = variant
                    if stages > 1 and together == 1:  # _gemv_kernel keeps one stage (quant/gemv.py: PACKED_STAGES)
                        continue
                    if mantissa_codes and not mantissa:  # 3-bit: int32 codes, which the variant leaves alone
                        continue
                    keywords = dict(zip(KEYWORDS, variant))
                    if variant == default:  # timed above, as fused_us
                        us = fused_us
                    else:
                        us = timed_us(fused_calls(**keywords))
                    variant = {**keywords, "us": round(us, 1), "gb_per_s": round(nbytes / us / 1e3, 1)}
                    if sweep:
                        variant["best"] = best_launch(functools.partial(fused_calls, **keywords), together > 1)
                    row["variants"].append(variant)
            if args.variants:
                row["splits"] = [{"split_k": split_k, "us": round(timed_us(fused_calls(split_k=split_k)), 1)}
                                 for split_k in SPLITS]  # fmt: skip
                early_meta = not gemv.EARLY_META
                row["early_meta"] = {"early_meta": early_meta,
                                     "us": round(timed_us(fused_calls(early_meta=early_meta)), 1)}  # fmt: skip
            if args.variants and together > 1 and int(bits) in LAUNCHES:
                row["launches"] = []
                for n, k, w in LAUNCHES[int(bits)]:
                    try:
                        us = round(timed_us(fused_calls(block_n=n, block_k=k, num_warps=w)), 1)
                    except gemv.CANNOT_LAUNCH:  # pipelined stages of a large tile, say
                        us = None
                    row["launches"].append({"block_n": n, "block_k": k, "num_warps": w, "us": us})
            if name == "w1":  # with w3, as the one gated launch that decode makes of them
                pairs = [(weights["w1"], weights["w3"]) for weights in experts]
                gated_calls = functools.partial(on_copies, multiply, xin, pairs, out, Workspace())
                row["gated"] = {"us": round(timed_us(gated_calls()), 1), "apart_us": round(2 * fused_us, 1)}
                if args.variants:
                    early_meta = not gemv.GATED_EARLY_META
                    us = timed_us(gated_calls(early_meta=early_meta))
                    row["gated"]["early_meta"] = {"early_meta": early_meta, "us": round(us, 1)}
            if by_row(q.shape, q.spec):  # the scales and zeros by packed row (quant/gemv.py, META_ROWS)
                by_rows = [with_meta_by_row(matrix) for matrix in matrices]
                row["meta_by_row"] = {"us": round(timed_us(on_copies(gemv.gemv, xin, by_rows, out, Workspace())), 1)}
                if name == "w1":
                    pairs = [(with_meta_by_row(weights["w1"]), with_meta_by_row(weights["w3"])) for weights in experts]
                    us = timed_us(on_copies(multiply, xin, pairs, out, Workspace()))
                    row["meta_by_row"]["gated_us"] = round(us, 1)
            if sweep:
                swept = [v["best"] for v in row.get("variants", ())
                         if tuple(v[key] for key in KEYWORDS) == default]  # fmt: skip
                row["best"] = swept[0] if swept else best_launch(fused_calls, together > 1)
            rows.append(row)
            print(f"{bits}-bit {name} {tuple(q.shape)}: dequantize+matmul {unfused:8.1f} us, fused {fused_us:7.1f} us "
                  f"({row['fused_gb_per_s']} GB/s of codes; {fused_eager:.1f} us eager), error {error:.1e}"
                  + (f", best {row['best']}" if "best" in row else ""))  # fmt: skip
            for variant in row.get("variants", ()):
                print(f"    late_sum={variant['late_sum']!s:5} fast_codes={variant['fast_codes']!s:5} "
                      f"stages={variant['stages']} mantissa_codes={variant['mantissa_codes']!s:5}: "
                      f"{variant['us']:7.1f} us ({variant['gb_per_s']} GB/s)"
                      + (f", best {variant['best']}" if "best" in variant else ""))  # fmt: skip
            for split in row.get("splits", ()):
                print(f"    split_k={split['split_k']}: {split['us']} us")
            if "early_meta" in row:
                print(f"    early_meta={row['early_meta']['early_meta']}: {row['early_meta']['us']} us")
            if "gated" in row:
                gated = row["gated"]
                print(f"    with w3, gated: {gated['us']} us, against {gated['apart_us']} us apart"
                      + (f"; early_meta={gated['early_meta']['early_meta']}: {gated['early_meta']['us']} us"
                         if "early_meta" in gated else ""))  # fmt: skip
            if "meta_by_row" in row:
                by_rows = row["meta_by_row"]
                print(
                    f"    meta by packed row: {by_rows['us']} us"
                    + (f"; with w3, gated: {by_rows['gated_us']} us" if "gated_us" in by_rows else "")
                )
            for launch in row.get("launches", ()):
                shape = ", ".join(f"{key}={launch[key]}" for key in ("block_n", "block_k", "num_warps"))
                print(f"    launch {shape}: {launch['us']} us")
        for fused, gated in ((False, False), (True, False), (True, True)):
            workspace = Workspace(TRITON if fused else None)
            was, gemv.GATED = gemv.GATED, gated
            try:
                us = timed_us(on_copies(expert_mlp, x, experts, workspace, reuse=True))
            finally:
                gemv.GATED = was
            mlps.append({"bits": int(bits), "fused": fused, "gated": gated, "expert_mlp_us": round(us, 1)})
            how = ("fused, w1 and w3 gated" if gated else "fused, w1 and w3 apart") if fused else "dequantize+matmul"
            print(f"{bits}-bit expert MLP, {how}: {us:.1f} us")

    return rows, mlps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time every launch shape")
    parser.add_argument("--sweep-bits", default="2,3,4", help="the expert bits whose launch shapes --sweep times")
    parser.add_argument("--variants", action="store_true", help="also time each kernel variant")
    parser.add_argument("--copies", type=int, help="weight copies the calls take in turn (default: twice L2's worth)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gemv_kernel.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    if not torch.cuda.is_available() or gemv.triton is None:
        sys.exit("error: this benchmark needs a CUDA device and Triton")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    gemv.USE_TUNED = False  # the built-in launches: what `moe-offload tune` found for this GPU is not the default
    l2 = torch.cuda.get_device_properties(device).L2_cache_size

    rows, mlps = measure(device, dtype, l2, args)

    report = {
        **environment(device, program=f"python {sys.argv[0]}"),
        "dtype": args.dtype,
        "defaults": {
            "block_n": gemv.BLOCK_N,
            "block_k": gemv.BLOCK_K,
            "num_warps": 4,
            "packed_launch": gemv.PACKED_LAUNCH,  # by bits: (block_n packed rows, block_k, num_warps)
            "late_sum": gemv.LATE_SUM,
            "fast_codes": gemv.FAST_CODES,
            "packed_stages": gemv.PACKED_STAGES,  # _gemv_kernel's: 1
            "mantissa_codes": gemv.MANTISSA_CODES,  # 2 and 4 bits only
            "early_meta": gemv.EARLY_META,
            "gated": gemv.GATED,
            "gated_early_meta": gemv.GATED_EARLY_META,
        },
        "matrices": rows,
        "expert_mlp": mlps,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
