"""A decode step's attention at Mixtral's heads: each query head on its own (enable_gqa) against its key head's group.

    python benchmarks/decode_attention.py [--device cpu|cuda] [--dtype float32 bfloat16] [--keys 256 1024 4096]
                                          [--calls 50] [--out PATH]

One query (32 heads of 128) attends over `keys` positions of 8 key heads, two ways, for the two calls decode
makes: the eager step's (no mask: its key range is the mask) and the static step's that CUDA graphs replay (a
fixed key range under a mask: "static" in the table). "heads": the query as [1, H, 1, S] with enable_gqa (the
eager step until this script's commit) or as [H, 1, S] under the mask (the static step until then). "grouped":
offload.decoder.one_query_attention, the query heads of a key head taken as its H/K queries. For each it prints
the milliseconds a call, the most bytes the call held at once beyond its inputs (CUDA: max_memory_allocated;
CPU: the profiler's allocations), and the largest difference from the same attention in float64.
Writes benchmarks/results/decode_attention_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import ms_per_call, run_script  # noqa: E402
from benchmarks.prefill_memory import live_peak  # noqa: E402
from offload.bench import environment, synchronize, write_json  # noqa: E402
from offload.decoder import one_query_attention  # noqa: E402
from quant.files import check_writable  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Mixtral-8x7B's
MiB = 1 << 20


def per_head(q, keys, values, mask):
    """Each query head on its own, its key head found by enable_gqa: the eager step's call 4-D without a mask,
    the static step's 3-D under one, as decode made them before one_query_attention."""
    if mask is None:
        return F.scaled_dot_product_attention(q[None, :, None], keys[None], values[None], enable_gqa=True)[0, :, 0]
    return F.scaled_dot_product_attention(q[:, None], keys, values, attn_mask=mask[None], enable_gqa=True)[:, 0]


WAYS = {"heads": per_head, "grouped": one_query_attention}


def reference(q, keys, values, mask):
    """The same attention in float64, written out: [H, S]."""
    group = HEADS // KV_HEADS
    k, v = keys.double().repeat_interleave(group, 0), values.double().repeat_interleave(group, 0)  # [H, N, S]
    scores = torch.einsum("hs,hns->hn", q.double(), k) / HEAD_DIM**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hn,hns->hs", scores.softmax(-1), v)


def peak_bytes(call, device: torch.device) -> int:
    if device.type != "cuda":
        return live_peak(call)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(device: torch.device, dtype: torch.dtype, keys: int, masked: bool, calls: int) -> list[dict]:
    generator = torch.Generator().manual_seed(keys)
    q = torch.randn(HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    cache = torch.randn(2, KV_HEADS, keys, HEAD_DIM, generator=generator).to(device, dtype)
    # the static step reads a power-of-two key range with the token three quarters in; the eager one, its keys
    mask = (torch.arange(keys, device=device) <= keys * 3 // 4) if masked else None
    expected = reference(q, cache[0], cache[1], mask)
    rows = []
    for way, attend in WAYS.items():
        call = lambda attend=attend: attend(q, cache[0], cache[1], mask)  # noqa: E731
        error = (call().double() - expected).abs().max().item()
        rows.append({
            "call": "static" if masked else "eager", "keys": keys, "dtype": str(dtype).removeprefix("torch."),
            "way": way, "ms_per_call": round(ms_per_call(call, calls, device), 4),
            "peak_bytes": peak_bytes(call, device), "max_abs_error": error,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=None, help="default: bfloat16 on CUDA, float32 and bfloat16 here")
    parser.add_argument("--keys", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/decode_attention_<device>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = args.out or str(REPO / "benchmarks" / "results" / f"decode_attention_{device.type}.json")
    check_writable(out, "--out")
    dtypes = args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    rows = [
        row
        for dtype in dtypes
        for masked in (False, True)
        for keys in args.keys
        for row in measure(device, getattr(torch, dtype), keys, masked, args.calls)
    ]
    table = Table(box=box.SIMPLE_HEAD, title=f"one query's attention, {HEADS} heads over {KV_HEADS} key heads")
    for column in ("call", "dtype", "keys", "way", "ms a call", "peak MiB", "max |error|"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["call"], row["dtype"], str(row["keys"]), row["way"], f"{row['ms_per_call']:.3f}",
                      f"{row['peak_bytes'] / MiB:.2f}", f"{row['max_abs_error']:.2e}")  # fmt: skip
    Console().print(table)
    write_json(out, {**environment(device, "python benchmarks/decode_attention.py"), "rows": rows}, "--out")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(main)
