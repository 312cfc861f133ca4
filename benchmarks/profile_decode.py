"""Where a decode step's time goes: torch.profiler over a few decode steps, top operators by device time.

    python benchmarks/profile_decode.py MODEL --route-trace TRACE [--gpu-memory 12GiB] [--steps 8]
        [--no-fused-gemv] [--out benchmarks/results/profile_decode.json] [--chrome trace.json]

Loads MODEL as `bench` does (replayed routing, oracle prefetch), warms up, then profiles --steps
decode steps. Prints the top operators by self device time (CUDA) or self CPU time (CPU), and writes
them as JSON with the run's device, commit and command. "Profile first, then fix what it shows."
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from offload.api import kernel_name  # noqa: E402
from offload.bench import OraclePrefetcher, ReplayedRouting, environment, synchronize, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--route-trace", required=True)
    parser.add_argument("--gpu-memory", default=None)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-fused-gemv", action="store_true")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--oracle-depth", type=int, default=None,
                        help="layers the oracle loads ahead (default: all but one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_decode.json"))
    parser.add_argument("--chrome", default=None, help="also write a Chrome trace (chrome://tracing) here")
    args = parser.parse_args()

    model = offload.load(args.model, device=args.device, gpu_memory=args.gpu_memory, slots=args.slots,
                         prefetch="none", fused_gemv=False if args.no_fused_gemv else None,
                         cuda_graphs=False if args.no_cuda_graphs else None)  # fmt: skip
    c, device = model.config, model.device
    routing = ReplayedRouting(args.route_trace, c.num_layers, c.num_experts, c.top_k, device)
    model.moe.routing = routing
    model.moe.prefetcher = OraclePrefetcher(routing, model.cache, c.num_layers, args.oracle_depth)
    token = torch.ones(1, dtype=torch.long, device=device)
    model.reset()
    model.forward(torch.ones(4, dtype=torch.long, device=device), 0)

    def step(position: int) -> None:
        routing.position = position
        torch.argmax(model.forward(token, position, copy=False)[-1], dim=-1, keepdim=True, out=token)

    for position in range(4, 8):  # warm-up: buffers, kernels compiled, graphs captured, allocator pools
        step(position)
    synchronize(device)
    begin = time.perf_counter()  # the same steps' wall time without the profiler's own cost
    for position in range(8, 8 + args.steps):
        step(position)
    synchronize(device)
    wall_ms = (time.perf_counter() - begin) * 1000 / args.steps
    print(f"{wall_ms:.2f} ms per decode step without the profiler")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for position in range(8 + args.steps, 8 + 2 * args.steps):
            step(position)
        synchronize(device)

    on_device = device.type == "cuda"
    sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top))
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_by), reverse=True)[: args.top]
    rows = [
        {
            "op": e.key,
            "calls_per_step": round(e.count / args.steps, 2),
            "self_device_us_per_step": round(e.self_device_time_total / args.steps, 1) if on_device else None,
            "self_cpu_us_per_step": round(e.self_cpu_time_total / args.steps, 1),
        }
        for e in events
    ]
    report = {
        **environment(device, program=f"python {sys.argv[0]}"),
        "model": args.model,
        "routing": f"replayed: {args.route_trace}",
        "kernel": kernel_name(model.prepared.fused_gemv),
        "cuda_graphs": model.prepared.cuda_graphs,
        "oracle_depth": model.moe.prefetcher.depth,
        "steps": args.steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "top": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    if args.chrome:
        prof.export_chrome_trace(args.chrome)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
