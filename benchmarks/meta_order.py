"""Scales and zeros by output against grid order, in one loaded model on the CPU, taking turns.

    python benchmarks/meta_order.py MODEL [--expert-bits 2] [--route-trace TRACE] [--tokens 64]
                                          [--prompt-tokens 16] [--rounds 3] [--out OUT]

On the CPU, load holds each expert's 8-bit scales and zeros by output (quant/packing.py), where files keep them
in grid order. This loads MODEL on the CPU in direct mode, where experts are computed in the arena, then repacks
every expert there in place, into grid order and back, and times a decode after each: one process and one memory,
the two orders in turn, so that a machine whose speed moves from hour to hour compares them in one window. Each
figure is a run's; the table lists them all. Writes benchmarks/results/meta_order.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from benchmarks import run_script  # noqa: E402
from offload.bench import ReplayedRouting, decode_run, environment, write_json  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.packing import ExpertFormat  # noqa: E402

ORDERS = ("grid", "output")


def relayout(model, to: ExpertFormat) -> None:
    """Every expert in the arena repacked in place into `to`'s layout, and the MoE block reading them so."""
    moe = model.moe
    for row in moe.cache.arena:
        row.copy_(to.pack(**moe.expert_format.unpack(row)))
    moe.expert_format = to
    moe._views.clear()  # views of the old layout, by row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--expert-bits", default="none", help="an HF folder's experts quantized in memory (2)")
    parser.add_argument("--route-trace", help="a routing trace to replay (.jsonl), in place of the routers")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta_order.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the load, not after it
    context = args.prompt_tokens + args.tokens + 16
    model = offload.load(args.model, device="cpu", verify=False, max_seq_len=context, expert_bits=args.expert_bits)
    by_output = model.moe.expert_format
    if model.plan.mode != "direct" or by_output.meta_order != "output":
        raise MoEOffloadError(
            f"{args.model}: no expert has scales and zeros by output; give 2-bit experts (a quantized "
            "folder, or an HF folder with --expert-bits 2) whose hidden size is a multiple of 2048"
        )
    formats = {"output": by_output, "grid": by_output.in_order("grid")}
    c = model.config
    routing = None
    if args.route_trace is not None:
        routing = ReplayedRouting(args.route_trace, c.num_layers, c.num_experts, c.top_k, model.device)
        model.moe.routing = routing
    decode_run(model, prompt_tokens=4, tokens=4, routing=routing)  # warm: the kernel built, the pages touched
    runs = []
    print(f"{'round':>5} {'order':>6} {'decode tok/s':>13} {'prefill tok/s':>14}")
    for round_ in range(1, args.rounds + 1):
        for order in ORDERS:
            relayout(model, formats[order])
            run = decode_run(model, prompt_tokens=args.prompt_tokens, tokens=args.tokens, routing=routing)
            runs.append({"round": round_, "order": order, "decode_tokens_per_s": round(run.decode_tokens_per_s, 3),
                         "prefill_tokens_per_s": round(run.prefill_tokens_per_s, 3)})  # fmt: skip
            print(f"{round_:>5} {order:>6} {run.decode_tokens_per_s:>13.2f} {run.prefill_tokens_per_s:>14.2f}")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": args.model,
        "routing": "model" if routing is None else f"replayed: {args.route_trace}",
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "runs": runs,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
