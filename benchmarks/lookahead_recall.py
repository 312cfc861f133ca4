"""How far ahead a gate guess can see: recall of layer l+lead's router applied to layer l's output.

The prefetcher guesses layer l+1 from layer l's hidden state. Loading further ahead keeps the link busy
through layers that miss nothing (bench's oracle does, with `--oracle-depth`), but a real guess for
layer l+lead must come from the state `lead` layers before it. On the trained tiny model (real Python
source, teacher-forced through transformers' own Mixtral), for each lead: the share of each token's
top-k experts at layer l+lead that layer l+lead's router picks from layer l's output, normed by layer
l+lead's own post-attention norm (the guess `offload/prefetch.py` makes at lead 1).

    python benchmarks/lookahead_recall.py [--model ../shared/models/tiny-mixtral-code] [--windows 4]

Prints a table and writes benchmarks/results/lookahead_recall_tiny.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from benchmarks.prefetch_points import SOURCES, windows  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.tokenizer import load_tokenizer  # noqa: E402
from quant.files import check_writable  # noqa: E402


def recall_by_lead(model, texts: list[list[int]]) -> dict[int, tuple[float, int]]:
    """lead -> (recall, guesses counted) over every token and every layer pair (l, l + lead)."""
    # T = tokens, D = hidden, E = experts, L = layers
    layers = model.model.layers
    k = model.config.num_experts_per_tok
    right: dict[int, int] = {}
    total: dict[int, int] = {}
    for ids in texts:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True, output_router_logits=True)
        # hidden_states[i] is layer i's input (i < L); router_logits[j] is layer j's router on its own state
        chosen = [logits.topk(k, dim=-1).indices for logits in out.router_logits]  # L x [T, k]
        for target in range(1, len(layers)):
            block = layers[target]
            for lead in range(1, target + 1):
                state = out.hidden_states[target - lead + 1][0]  # [T, D]: the output of layer target - lead
                with torch.no_grad():
                    logits = block.mlp.gate(block.post_attention_layernorm(state))  # [T, E]
                logits = logits[0] if isinstance(logits, tuple) else logits
                guess = logits.topk(k, dim=-1).indices  # [T, k]
                hits = (guess[:, :, None] == chosen[target][:, None, :]).any(-1).sum().item()
                right[lead] = right.get(lead, 0) + hits
                total[lead] = total.get(lead, 0) + chosen[target].numel()
    return {lead: (right[lead] / total[lead], total[lead]) for lead in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "tiny-mixtral-code"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lookahead_recall_tiny.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = windows(load_tokenizer(args.model), args.windows, args.length)
    rows = [
        {"lead": lead, "recall": round(recall, 4), "guessed_experts": count}
        for lead, (recall, count) in recall_by_lead(model, texts).items()
    ]
    chance = model.config.num_experts_per_tok / model.config.num_local_experts
    print(f"{'lead':>5} {'recall':>7} {'experts':>8}   (chance: {chance:.3f})")
    for row in rows:
        print(f"{row['lead']:>5} {row['recall']:>7.3f} {row['guessed_experts']:>8}")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": "tiny-mixtral-code (trained, 6 layers, 8 experts, top 2), float32, through transformers",
        "text": f"{len(texts)} windows of {args.length} tokens of: {', '.join(SOURCES[: len(texts)])}",
        "guess": "layer l+lead's router on layer l's output, normed by layer l+lead's post-attention norm",
        "chance": chance,
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
