"""Does a few-byte copy wait behind an expert load? The small copies of a decode step timed (CUDA).

The latency of each, alone and with an expert-sized copy in flight on another stream.

    python benchmarks/copy_engine.py [--expert-mib 64] [--repeats 20] [--out benchmarks/results/copy_engine.json]

The CUDA driver gives each direction its own copy engine, so copies of one direction from different
streams share it. A decode step reads each layer's routing device-to-host (a few bytes) while the cache
loads experts host-to-device and, in exclusive mode, writes victims back device-to-host. If a small copy
queues behind a big one of its direction, every layer can wait up to one expert's copy time (1.25 ms
for a 2-bit Mixtral expert on an H100). Each case is timed on the host, from the small copy's call to
its result, the median of --repeats:

- h2d_small: 8 bytes pinned host-to-device, then a sync (what replayed weights cost before dd75cc6);
- d2h_small: `tolist()` of 6 floats (the routing read of offload/moe.py's decode_experts);
each alone, behind an expert copy of the same direction, and behind one of the other direction.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402


def latency_us(small, big=None, repeats: int = 20) -> float:
    """Host microseconds from the small copy's call (`small`) to its result, with `big` (a callable that
    starts an expert copy on another stream) started just before each, the median of `repeats`."""
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()  # syncs the device: each repeat starts from idle engines
        if big is not None:
            big()
            time.sleep(50e-6)  # the big copy is on the engine before the small one arrives
        begin = time.perf_counter()
        small()
        times.append((time.perf_counter() - begin) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-mib", type=float, default=64.0, help="the background copy's size (2-bit Mixtral: 64)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "copy_engine.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    if not torch.cuda.is_available():
        raise MoEOffloadError("copy_engine.py times CUDA copy engines; this machine has no CUDA device")
    device = torch.device("cuda")
    nbytes = int(args.expert_mib * 2**20)
    host_big = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device_big = torch.empty(nbytes, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)

    def expert_h2d() -> None:
        with torch.cuda.stream(side):
            device_big.copy_(host_big, non_blocking=True)

    def expert_d2h() -> None:
        with torch.cuda.stream(side):
            host_big.copy_(device_big, non_blocking=True)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    expert_h2d()  # the first copy from a buffer just pinned may be slower: time the second
    start.record(side)
    expert_h2d()
    end.record(side)
    end.synchronize()
    expert_ms = start.elapsed_time(end)

    weights_host, weights = torch.ones(2, dtype=torch.float32).pin_memory(), torch.empty(2, device=device)
    routing = torch.ones(6, device=device)

    def small_h2d() -> None:  # 8 bytes of gate weights
        weights.copy_(weights_host, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # syncs the stream: the copy's result is what we wait for

    def small_d2h() -> None:  # the routing read
        routing.tolist()  # may synchronize: that is the cost measured

    cases = {
        "h2d_small": (small_h2d, {"alone": None, "behind_expert_h2d": expert_h2d, "behind_expert_d2h": expert_d2h}),
        "d2h_small": (small_d2h, {"alone": None, "behind_expert_d2h": expert_d2h, "behind_expert_h2d": expert_h2d}),
    }
    results = {
        name: {case: round(latency_us(small, big, args.repeats), 1) for case, big in backgrounds.items()}
        for name, (small, backgrounds) in cases.items()
    }

    print(f"expert copy: {args.expert_mib:g} MiB host-to-device in {expert_ms * 1000:.0f} us")
    print(f"{'small copy':<12} {'alone':>10} {'same dir.':>12} {'other dir.':>12}   (us, median of {args.repeats})")
    for name, row in results.items():
        same, other = (row[k] for k in row if k != "alone")
        print(f"{name:<12} {row['alone']:>10.1f} {same:>12.1f} {other:>12.1f}")
    write_json(args.out, {
        **environment(device, "python benchmarks/copy_engine.py"),
        "expert_bytes": nbytes,
        "expert_h2d_us": round(expert_ms * 1000, 1),
        "latency_us": results,
    }, "--out")  # fmt: skip


if __name__ == "__main__":
    run_script(main)
