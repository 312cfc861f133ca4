"""How much memory a prefill's activations take, measured on the CPU with full Mixtral-8x7B shapes.

python benchmarks/prefill_memory.py [--model DIR] [--tokens 512 1024 2048 4096] [--chunks 1024 256] [--out PATH]

The planner gives every byte of a GPU budget it can to expert slots, so a long prompt's activations
must fit in what it keeps back (offload.api.prefill_reserve). This measures them: a synthetic
Mixtral-8x7B of one layer (full width, 2-bit experts; the transients of a layer are freed before the
next, so one layer shows the peak), in bfloat16 on the CPU, with torch's profiler counting every
allocation. For each prefill chunk and prompt length it prints the peak of live bytes during the
prefill above what was live before it, with the dequantization workspace already made (a short
prompt first), against ModelConfig.prefill_bytes, the bound the planner keeps; and a chat turn that
continues a history (masked spans). It also checks the workspace against quant.linear.workspace_bytes.
The CPU's attention kernels are not CUDA's (CUDA repeats the key heads under a mask, which the bound
adds there), so bench's gpu_peak_bytes is the figure on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.api import load  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.decoder import PREFILL_CHUNK  # noqa: E402
from offload.synth import synthesize  # noqa: E402
from quant.bnb import NF4Quantized  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import Quantized  # noqa: E402
from quant.linear import workspace_bytes  # noqa: E402

MiB = 1 << 20


def live_peak(fn) -> int:
    """The most bytes `fn` held allocated at once: every CPU allocation and free the profiler records, in
    time order, those of an operator's own inner calls included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []  # (time, bytes): a free records a negative size

    def walk(events) -> None:
        for event in events:
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                changes.append((event.start_time_ns, event.extra_fields.alloc_size))
            walk(event.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, delta in sorted(changes, key=lambda change: (change[0], change[1] < 0)):  # at a tie, allocations first
        live += delta
        peak = max(peak, live)
    return peak


def measure(model, tokens: int, history: int = 0) -> dict:
    """One prefill of `tokens` new tokens after `history` already in the KV cache."""
    ids = torch.randint(0, model.config.vocab_size, (history + tokens,), generator=torch.Generator().manual_seed(0))
    model.reset()
    if history:
        model.forward(ids[:history], 0, last_only=True)
    start = time.perf_counter()
    peak = live_peak(lambda: model.forward(ids[history:], history, last_only=True))
    return {"tokens": tokens, "history": history, "peak_bytes": peak, "seconds": round(time.perf_counter() - start, 2)}


def workspace_check(model) -> dict:
    """The dequantization workspace a prefill made, against what the planner counts for it."""
    attention = [w for w in model.decoder.weights.values() if isinstance(w, Quantized | NF4Quantized)]
    experts = [w for w in model.prepared.expert_format.meta_weights().values() if isinstance(w, Quantized)]
    made = sum(b.nbytes for ws in (model.decoder.workspace, model.moe.workspace) for b in ws._buffers.values())
    counted = workspace_bytes(attention, model.dtype, "cpu") + workspace_bytes(experts, model.dtype, "cpu")
    return {"made_bytes": made, "counted_bytes": counted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a quantized folder (default: synthesize a 1-layer Mixtral-8x7B)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[PREFILL_CHUNK, 256])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prefill_memory_cpu.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    runs, longest = [], max(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = str(Path(tmp) / "mixtral-1l")
            synthesize(folder, "mixtral-8x7b", layers=1, expert_bits="2")
        for chunk in args.chunks:
            # the dequantizing path, as CUDA runs a prefill: the CPU's own kernel keeps float32 buffers of its own
            model = load(folder, device="cpu", dtype="bfloat16", max_seq_len=longest, prefill_chunk=chunk,
                         fused_gemv=False)  # fmt: skip
            model.forward(torch.arange(8), 0, last_only=True)  # makes the dequantization workspace
            workspace = workspace_check(model)
            for tokens, history in [(t, 0) for t in args.tokens] + [(longest // 2, longest // 2)]:
                run = measure(model, tokens, history)
                for device, repeat_kv in (("cpu", False), ("cuda", True)):
                    bound = model.config.prefill_bytes(history + tokens, chunk, model.dtype, repeat_kv=repeat_kv)
                    run[f"bound_{device}_bytes"] = bound
                runs.append({"chunk": chunk, **run})

    table = Table(box=box.SIMPLE_HEAD, title="prefill activations (synthetic Mixtral-8x7B, 1 layer, bfloat16, CPU)")
    for column in ("chunk", "prompt", "history", "measured peak", "bound (CPU)", "bound (CUDA)", "seconds"):
        table.add_column(column, justify="right")
    for run in runs:
        sizes = (f"{run[key] / MiB:.1f} MiB" for key in ("peak_bytes", "bound_cpu_bytes", "bound_cuda_bytes"))
        table.add_row(str(run["chunk"]), str(run["tokens"]), str(run["history"]), *sizes, f"{run['seconds']:.1f}")
    Console().print(table)
    made, counted = (f"{workspace[key] / MiB:.1f} MiB" for key in ("made_bytes", "counted_bytes"))
    print(f"dequantization workspace: made {made}, counted by the planner {counted}")
    model_name = "synthetic mixtral-8x7b, 1 layer, 2-bit experts, 4-bit attention" if args.model is None else args.model
    record = {**environment(torch.device("cpu"), "python benchmarks/prefill_memory.py"), "model": model_name,
              "workspace": workspace, "runs": runs}  # fmt: skip
    write_json(args.out, record, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
