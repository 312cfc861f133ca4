"""One expert's MLP on the CPU: dequantizing into fresh tensors against a reused workspace.

    python benchmarks/expert_mlp.py [--hidden 1024] [--intermediate 3584] [--bits 2]

Prints the time per call and page faults per call, and writes benchmarks/results/expert_mlp_cpu.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offload.bench import environment, write_json  # noqa: E402
from offload.moe import expert_mlp  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace  # noqa: E402
from quant.packing import ExpertFormat  # noqa: E402


def measure(x, weights, workspace, calls: int) -> tuple[float, float]:
    for _ in range(3):
        expert_mlp(x, weights, workspace)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    begin = time.perf_counter()
    for _ in range(calls):
        expert_mlp(x, weights, workspace)
    seconds = (time.perf_counter() - begin) / calls
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--bits", default="2")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "expert_mlp_cpu.json"))
    args = parser.parse_args()

    fmt = ExpertFormat.build(args.hidden, args.intermediate, EXPERT_PRESETS[args.bits], torch.float32)
    weights = fmt.unpack(fmt.random(torch.Generator().manual_seed(0)))
    x = torch.randn(1, args.hidden)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, workspace in (("fresh tensors", None), ("workspace", Workspace())):
            seconds, faults = measure(x, weights, workspace, args.calls)
            rows.append({"threads": threads, "dequantize into": name, "ms": round(seconds * 1000, 3),
                         "page_faults_per_call": round(faults)})  # fmt: skip
            print(f"{threads} threads, {name:>13}: {seconds * 1000:7.2f} ms, {faults:8.0f} page faults per call")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "expert": f"{args.bits}-bit, hidden {args.hidden}, intermediate {args.intermediate}, one token",
        "results": rows,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
