"""What quantization costs: validation loss of the trained tiny model at each expert preset.

Teacher-forced windows of real Python source through moe-offload's runtime (experts quantized with
our presets, attention unquantized or 4-bit), beside transformers' unquantized model.

    python benchmarks/quality_tiny.py [--model ../shared/models/tiny-mixtral-code]

Prints a table and writes benchmarks/results/quality_tiny.json.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from benchmarks import run_script  # noqa: E402
from benchmarks.prefetch_points import SOURCES  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant.files import check_writable  # noqa: E402


def mean_loss(logits_of, windows: list[torch.Tensor]) -> float:
    return sum(F.cross_entropy(logits_of(w)[:-1], w[1:]).item() for w in windows) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "tiny-mixtral-code"))
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_tiny.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    from transformers import MixtralForCausalLM

    torch.set_num_threads(1)
    base = offload.load(args.model, device="cpu")
    stdlib = Path(textwrap.__file__).parent
    windows = [torch.tensor(base.tokenizer((stdlib / n).read_text())["input_ids"][: args.length]) for n in SOURCES]
    reference = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [{"experts": "transformers, unquantized", "attention": "none",
                 "loss": mean_loss(lambda w: reference(w[None]).logits[0], windows)}]  # fmt: skip
    for expert_bits, attn_bits in [("none", "none"), ("4", "none"), ("3", "none"), ("2", "none"), ("2", "4")]:
        model = offload.load(args.model, device="cpu", expert_bits=expert_bits, attn_bits=attn_bits)
        rows.append({"experts": expert_bits, "attention": attn_bits, "loss": mean_loss(model.logits, windows)})
    full = rows[0]["loss"]
    print(f"{'experts':>26} {'attention':>9} {'loss':>7} {'vs fp32':>8}")
    for row in rows:
        row["loss"] = round(row["loss"], 4)
        row["delta"] = round(row["loss"] - full, 4)
        print(f"{row['experts']:>26} {row['attention']:>9} {row['loss']:>7.4f} {row['delta']:>+8.4f}")
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": "tiny-mixtral-code (trained, 6 layers, 8 experts, top 2)",
        "text": f"{len(windows)} windows of {args.length} tokens of: {', '.join(SOURCES)}",
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
