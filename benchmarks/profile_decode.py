"""Where a decode step's time goes: torch.profiler over a few decode steps, top operators by device time.

    python benchmarks/profile_decode.py MODEL --route-trace TRACE [--gpu-memory 12GiB] [--steps 8]
        [--prefetch oracle|gate|none] [--no-fused-gemv] [--out benchmarks/results/profile_decode.json]
        [--chrome trace.json]

Loads MODEL as `bench` does (replayed routing, oracle prefetch by default), warms up, then profiles --steps
decode steps. Prints the top operators by self device time (CUDA) or self CPU time (CPU), and writes
them as JSON with the run's device, commit and command. "Profile first, then fix what it shows."

On CUDA it also lays the device's work on one time line (`overlap`): per step, how long the link
(host-to-device copies) and the compute (kernels) were busy, both at once, one alone, and the device
idle (waiting for the host: each layer's routing read stops it until the host has decided and
launched), with the count of idle gaps. The bound assumes the link and the compute fully overlapped.
`--prefetch gate` profiles the runtime's own guess, whose read at each layer's output (a second
device-to-host copy a layer) the oracle does not make: the real path's idle time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from benchmarks import run_script  # noqa: E402
from offload.api import kernel_name  # noqa: E402
from offload.bench import (  # noqa: E402
    PREFETCH,
    ReplayedRouting,
    bench_context,
    check_prefetch_options,
    environment,
    graphs_ran,
    set_prefetch,
    synchronize,
    write_json,
)
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402

# -- the device's time line -----------------------------------------------------------------------------


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering `spans` (start, end)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The length of two disjoint, sorted interval lists' overlap."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


GAP_US = 10.0  # device idle shorter than this is a launch's shadow, not a wait


def overlap(spans: list[tuple[str, float, float]], steps: int) -> dict:
    """Per step, in ms: the device window, link (kind "h2d") and compute ("compute") busy, both at once,
    each alone, and neither (idle); idle gaps of at least GAP_US per step and their mean in us. Kind "d2h"
    (the routing reads) counts as device work but neither link nor compute."""
    link = union([(s, e) for kind, s, e in spans if kind == "h2d"])
    compute = union([(s, e) for kind, s, e in spans if kind == "compute"])
    work = union([(s, e) for _, s, e in spans])
    wall = work[-1][1] - work[0][0]
    both = intersection(link, compute)
    gaps = [b[0] - a[1] for a, b in zip(work, work[1:]) if b[0] - a[1] >= GAP_US]
    per_step = {
        "wall": wall,
        "link_busy": length(link),
        "compute_busy": length(compute),
        "both": both,
        "link_only": length(link) - both,
        "compute_only": length(compute) - both,
        "idle": wall - length(work),
    }
    result = {f"{name}_ms": round(us / steps / 1000, 3) for name, us in per_step.items()}
    result["idle_gaps"] = round(len(gaps) / steps, 2)
    result["idle_gap_mean_us"] = round(sum(gaps) / len(gaps), 1) if gaps else None
    return result


DEVICE_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}  # kineto's activity types


def is_device_work(event) -> bool:
    """Whether a kineto event is device work: not a host event, nor the device's sync records."""
    if hasattr(event, "activity_type"):
        return event.activity_type() in DEVICE_WORK
    # torch before 2.12 (the GPU machine has 2.11) names no activity type: the device's events, less its sync
    # records ("Stream Sync", "Event Sync", ..., and "Stream Wait Event", one a layer) and user annotations
    if getattr(event, "is_user_annotation", lambda: False)():
        return False
    name = event.name()
    return event.device_type() == DeviceType.CUDA and "Sync" not in name and "Wait Event" not in name


def device_spans(prof) -> list[tuple[str, float, float]]:
    """The profiler's device activities as (kind, start us, end us): "h2d" and "d2h" copies, the rest
    (kernels, device copies, memsets) "compute"."""
    spans = []
    for event in prof.profiler.kineto_results.events():
        if not is_device_work(event):
            continue
        name = event.name()
        kind = "h2d" if name.startswith("Memcpy HtoD") else "d2h" if name.startswith("Memcpy DtoH") else "compute"
        spans.append((kind, event.start_ns() / 1000, event.end_ns() / 1000))
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--route-trace", required=True)
    parser.add_argument("--gpu-memory", default=None)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=bench_context(16, 128),
        help="context (default: bench's at its defaults, so the plan gives bench's slots)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the folder's sha256 check")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-fused-gemv", action="store_true")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--prefetch",
        choices=PREFETCH,
        default="oracle",
        help="the trace's coming layers (oracle), the runtime's own guess (gate), or none",
    )
    parser.add_argument(
        "--oracle-depth", type=int, default=None, help="layers the oracle loads ahead (default: all but one)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_decode.json"))
    parser.add_argument("--chrome", default=None, help="also write a Chrome trace (chrome://tracing) here")
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    try:
        check_prefetch_options(args.prefetch, 1, args.oracle_depth)  # before the load: minutes on a real model
    except MoEOffloadError as error:
        parser.error(str(error))

    model = offload.load(args.model, device=args.device, gpu_memory=args.gpu_memory, slots=args.slots,
                         max_seq_len=args.max_seq_len, prefetch="none", verify=not args.no_verify,
                         fused_gemv=False if args.no_fused_gemv else None,
                         cuda_graphs=False if args.no_cuda_graphs else None)  # fmt: skip
    c, device = model.config, model.device
    routing = ReplayedRouting(args.route_trace, c.num_layers, c.num_experts, c.top_k, device)
    model.moe.routing = routing
    set_prefetch(model, args.prefetch, routing, args.oracle_depth)
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
        "kernel": kernel_name(model.prepared),
        "mode": model.plan.mode,
        "slots_per_layer": None if model.plan.slots_per_layer is None else list(model.plan.slots_per_layer),
        "host_embedding": model.prepared.host_embedding,
        "cuda_graphs": graphs_ran(model),  # asked for, and no capture failed
        "cuda_graphs_failed": None if model.decoder.graphs is None else model.decoder.graphs.failed,
        "prefetch": args.prefetch,
        "oracle_depth": model.moe.prefetcher.depth if args.prefetch == "oracle" else None,
        "steps": args.steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "top": rows,
    }
    if device.type == "cuda":
        try:  # the time line is the extra: a torch whose events it cannot read must not lose the table
            line = report["overlap"] = overlap(device_spans(prof), args.steps)
        except Exception as error:  # noqa: BLE001
            report["overlap"] = f"not computed: {type(error).__name__}: {error}"
            print(report["overlap"])
        else:
            times = [f"{k.removesuffix('_ms')} {v}" for k, v in line.items() if k.endswith("_ms")]
            print("per step (ms): " + ", ".join(times))
            print(f"idle gaps per step: {line['idle_gaps']}, mean {line['idle_gap_mean_us']} us")
    write_json(args.out, report, "--out")
    if args.chrome:
        prof.export_chrome_trace(args.chrome)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
