"""Record a real-routing trace of the trained tiny model, without the runtime, via transformers.

    python benchmarks/record_tiny_trace.py [--windows 7] [--out benchmarks/traces/tiny-mixtral-code_stdlib.jsonl]

Teacher-forced windows of 256 tokens from CPython's own standard library (the kind of text the
model was trained on; these files may be in its training split). Each window is one sequence and
each of its tokens one decode token: per layer, the router's top-2 (renormalized, as Mixtral
does) and, as `guess`, the prefetcher's guess from layer l-1's output: top-2 of
router_l(post_attention_layernorm_l(h_out,l-1)), the later of DESIGN.md's two guesses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MixtralForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from cache.trace import TraceWriter  # noqa: E402
from quant.files import check_writable  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tiny-mixtral-code"
STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
FILES = [
    "textwrap.py",
    "heapq.py",
    "shlex.py",
    "fnmatch.py",
    "json/decoder.py",
    "string.py",
    "bisect.py",
    "colorsys.py",
    "graphlib.py",
    "glob.py",
    "calendar.py",
    "statistics.py",
]
WINDOW = 256


@torch.no_grad()
def record(out: Path, windows: int) -> int:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = MixtralForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    top_k = model.config.num_experts_per_tok
    layers = model.model.layers
    written = 0
    with TraceWriter(out, dataset="cpython-stdlib") as writer:
        for sequence, name in enumerate(FILES[:windows]):
            ids = tokenizer((STDLIB / name).read_text(encoding="utf-8"), return_tensors="pt").input_ids
            start = max(0, (ids.shape[1] - WINDOW) // 2)  # the middle of the file: code, not the header
            window = ids[:, start : start + WINDOW]  # [1, T]
            output = model(window, output_router_logits=True, output_hidden_states=True)
            # router_logits: one [T, E] per layer; hidden_states[l] is layer l's input, [1, T, D]
            chosen = []
            for logits in output.router_logits:
                probs = torch.softmax(logits.float(), dim=-1)
                weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k]
                chosen.append((experts, weights / weights.sum(dim=-1, keepdim=True)))
            guesses = [None]
            for layer in range(1, len(layers)):
                block = layers[layer]
                normed = block.post_attention_layernorm(output.hidden_states[layer][0])  # [T, D]
                guesses.append(torch.topk(block.mlp.gate.weight @ normed.T, top_k, dim=0).indices.T)  # [T, k]
            for token_idx in range(window.shape[1]):
                for layer, (experts, weights) in enumerate(chosen):
                    guess = None if guesses[layer] is None else guesses[layer][token_idx].tolist()
                    writer.record(
                        sequence,
                        token_idx,
                        layer,
                        experts[token_idx].tolist(),
                        [round(w, 6) for w in weights[token_idx].tolist()],
                        guess,
                    )
                    written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=7, help=f"how many files (windows), at most {len(FILES)}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl")
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    rows = record(args.out, args.windows)
    print(f"wrote {rows} rows to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    run_script(main)
