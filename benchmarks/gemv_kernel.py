"""The fused dequantize+GEMV kernel against dequantize-then-matmul, on Mixtral-8x7B's expert shapes (CUDA).

    python benchmarks/gemv_kernel.py [--sweep] [--dtype bfloat16] [--out benchmarks/results/gemv_kernel.json]

For 2-, 3- and 4-bit experts and one token: microseconds per matrix, the quantized bytes each read
per second, and one whole expert MLP (w1, w3, w2) both ways. --sweep also times every launch shape
(block_n x block_k x warps) and reports the best per matrix, to choose quant/gemv.py's defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offload.bench import environment  # noqa: E402
from offload.moe import expert_mlp  # noqa: E402
from quant import gemv  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace, dequantize, quantized_nbytes  # noqa: E402
from quant.linear import linear  # noqa: E402
from quant.packing import ExpertFormat  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 14336  # Mixtral-8x7B


def timed_us(fn, *args, repeats: int = 50, **kwargs) -> float:
    """Median microseconds of fn(*args, **kwargs) over `repeats` calls, each timed with CUDA events."""
    for _ in range(5):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time every launch shape")
    parser.add_argument("--sweep-bits", default="2,3,4", help="the expert bits whose launch shapes --sweep times")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gemv_kernel.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or gemv.triton is None:
        sys.exit("error: this benchmark needs a CUDA device and Triton")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)

    rows, mlps = [], []
    for bits in ("2", "3", "4"):
        fmt = ExpertFormat.build(HIDDEN, INTERMEDIATE, EXPERT_PRESETS[bits], dtype)
        packed = torch.empty(fmt.nbytes, dtype=torch.uint8, device=device)
        weights = fmt.unpack(fmt.random(torch.Generator(device).manual_seed(0), packed))
        x = torch.randn(1, HIDDEN, device=device, dtype=dtype)
        for name in ("w1", "w2"):  # w3 has w1's shape
            q = weights[name]
            xin = x if name == "w1" else torch.randn(1, INTERMEDIATE, device=device, dtype=dtype)
            nbytes = quantized_nbytes(q.shape, q.spec)
            out = torch.empty(1, q.shape[0], device=device, dtype=dtype)
            workspace = Workspace()
            reference = xin.float() @ dequantize(q, torch.float32).T
            error = (gemv.gemv(xin, q, out).float() - reference).abs().max().item() / reference.abs().max().item()
            unfused = timed_us(linear, xin, q, workspace, out)
            fused = timed_us(gemv.gemv, xin, q, out)
            row = {"bits": int(bits), "matrix": name, "shape": list(q.shape), "quantized_bytes": nbytes,
                   "rows_together": gemv._rows_together(q),
                   "dequantize_matmul_us": round(unfused, 1), "fused_us": round(fused, 1),
                   "fused_gb_per_s": round(nbytes / fused / 1e3, 1), "relative_error": error}  # fmt: skip
            if args.sweep and bits in args.sweep_bits.split(","):
                # the packed-row kernel's block_n counts packed rows, each PER outputs: fewer per program
                packed = gemv._rows_together(q) > 1
                blocks = ((1, 2, 4, 8), (512, 1024, 2048)) if packed else ((8, 16, 32, 64), (128, 256, 512))
                shapes = itertools.product(*blocks, (2, 4, 8))
                best = min(
                    (timed_us(gemv.gemv, xin, q, out, block_n=n, block_k=k, num_warps=w, repeats=20), n, k, w)
                    for n, k, w in shapes
                )
                row["best"] = {"us": round(best[0], 1), "block_n": best[1], "block_k": best[2], "num_warps": best[3]}
            rows.append(row)
            print(f"{bits}-bit {name} {tuple(q.shape)}: dequantize+matmul {unfused:8.1f} us, fused {fused:7.1f} us "
                  f"({row['fused_gb_per_s']} GB/s of codes), error {error:.1e}"
                  + (f", best {row['best']}" if "best" in row else ""))  # fmt: skip
        for fused in (False, True):
            workspace = Workspace(fused=fused)
            us = timed_us(expert_mlp, x, weights, workspace, reuse=True)
            mlps.append({"bits": int(bits), "fused": fused, "expert_mlp_us": round(us, 1)})
            print(f"{bits}-bit expert MLP, {'fused' if fused else 'dequantize+matmul'}: {us:.1f} us")

    report = {
        **environment(device, program=f"python {sys.argv[0]}"),
        "dtype": args.dtype,
        "defaults": {
            "block_n": gemv.BLOCK_N,
            "block_k": gemv.BLOCK_K,
            "num_warps": 4,
            "packed_launch": gemv.PACKED_LAUNCH,  # by bits: (block_n packed rows, block_k, num_warps)
        },
        "matrices": rows,
        "expert_mlp": mlps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
