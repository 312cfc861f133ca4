"""One expert's MLP on the CPU: dequantizing into fresh tensors, whole into a workspace, in tiles, or not at all.

    python benchmarks/expert_mlp.py [--preset mixtral-small,mixtral-8x7b] [--bits 2] [--rounds 5]

For each synthetic preset's expert shape and 1 and 2 threads it times one token through the expert
four ways: dequantizing each weight into fresh tensors; whole into a reused workspace, then one matrix
product (what quant/linear.py did before its tiles); a tile of output rows at a time
(quant.hqq.dequantize_tiles, what decode runs without a fused kernel); and through the CPU's fused
dequantize+GEMV (quant/cpu_gemv.py, decode's default). They take turns, `--rounds` times; each figure is
the median round. Prints the time and the page faults per call, and writes benchmarks/results/expert_mlp_cpu.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload import moe  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.moe import expert_mlp  # noqa: E402
from offload.synth import preset_config  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import EXPERT_PRESETS, TILE_WEIGHTS, Workspace, dequantize  # noqa: E402
from quant.linear import CPU, linear  # noqa: E402
from quant.packing import ExpertFormat  # noqa: E402


def whole_linear(x, weight, workspace=None, out=None):
    """quant/linear.py before its tiles: the whole weight dequantized into the workspace, then one product."""
    return torch.matmul(x, dequantize(weight, x.dtype, workspace).T, out=out)


WAYS = {  # name: (the linear the expert runs, its workspace: none, one, or one with the fused kernel)
    "fresh tensors": (linear, None),
    "workspace, whole weight": (whole_linear, Workspace),
    "workspace, tiles": (linear, Workspace),
    "fused kernel (C)": (linear, lambda: Workspace(CPU)),
}


def measure(x, weights, way: str, calls: int) -> tuple[float, float]:
    """Seconds and page faults per call of `calls` calls, after a warm-up call."""
    moe.linear, make_workspace = WAYS[way]
    try:
        workspace = make_workspace() if make_workspace else None
        expert_mlp(x, weights, workspace)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        begin = time.perf_counter()
        for _ in range(calls):
            expert_mlp(x, weights, workspace)
        seconds = (time.perf_counter() - begin) / calls
        return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
    finally:
        moe.linear = linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mixtral-small,mixtral-8x7b", help="synthetic presets, comma-separated")
    parser.add_argument("--bits", default="2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "expert_mlp_cpu.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    rows = []
    for preset in args.preset.split(","):
        config = preset_config(preset)
        fmt = ExpertFormat.build(config.hidden_size, config.intermediate_size, EXPERT_PRESETS[args.bits], torch.float32)
        weights = fmt.unpack(fmt.random(torch.Generator().manual_seed(0)))
        x = torch.randn(1, config.hidden_size)
        calls = max(1, 2**24 // (config.hidden_size * config.intermediate_size))  # about 1 s a round
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for way in WAYS:  # first touches
                measure(x, weights, way, 1)
            rounds = {way: [] for way in WAYS}
            for _ in range(args.rounds):
                for way in WAYS:
                    rounds[way].append(measure(x, weights, way, calls))
            for way, runs in rounds.items():
                ms = statistics.median(seconds for seconds, _ in runs) * 1000
                faults = statistics.median(f for _, f in runs)
                rows.append({"preset": preset, "threads": threads, "way": way, "ms": round(ms, 2),
                             "page_faults_per_call": round(faults)})  # fmt: skip
                print(f"{preset:>13} {threads} threads, {way:>23}: {ms:8.2f} ms, {faults:8.0f} page faults per call")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "expert": f"{args.bits}-bit, one token, float32",
        "tile_weights": TILE_WEIGHTS["cpu"],
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
