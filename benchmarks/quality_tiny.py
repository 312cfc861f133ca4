"""What quantization costs: validation loss of the trained tiny model at each expert preset.

Teacher-forced windows of real Python source through moe-offload's runtime (experts quantized with
our presets, attention unquantized or 4-bit), beside transformers' unquantized model. Then the same
windows one token a step, the decode path, where the CPU multiplies through its fused kernel: with
tokens kept float32 and rounded to int8 (quant/cpu_gemv.py's INT8_TOKENS, where the CPU has VNNI),
with what rounding costs: the loss, the KL divergence from the float32 tokens' next-token
distribution, and how often the two agree on the likeliest token.

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
from quant import cpu_gemv  # noqa: E402
from quant.files import check_writable  # noqa: E402


def mean_loss(logits_of, windows: list[torch.Tensor]) -> float:
    return sum(F.cross_entropy(logits_of(w)[:-1], w[1:]).item() for w in windows) / len(windows)


def decoded_logits(model, window: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of `window`, teacher-forced one token a step: the decode path."""
    model.reset()
    return torch.cat([model.forward(window[t : t + 1], t) for t in range(len(window))])


def decode_rows(model_path: str, windows: list[torch.Tensor], full: float) -> list[dict]:
    """The decode path at each preset, tokens float32 then int8: loss, and the int8 rows' distance from float32's."""
    rows, before = [], cpu_gemv.INT8_TOKENS
    for expert_bits, attn_bits in [("4", "none"), ("2", "none"), ("2", "4")]:
        model = offload.load(model_path, device="cpu", expert_bits=expert_bits, attn_bits=attn_bits)
        logits = {}
        for tokens in ("float32", "int8"):
            cpu_gemv.INT8_TOKENS = tokens == "int8"
            logits[tokens] = [decoded_logits(model, w) for w in windows]
            loss = sum(F.cross_entropy(lg[:-1], w[1:]).item() for lg, w in zip(logits[tokens], windows))
            row = {"path": "decode", "experts": expert_bits, "attention": attn_bits, "tokens": tokens,
                   "loss": loss / len(windows)}  # fmt: skip
            if tokens == "int8":
                old, new = torch.cat(logits["float32"]), torch.cat(logits["int8"])
                kl = F.kl_div(new.log_softmax(-1), old.log_softmax(-1), log_target=True, reduction="batchmean")
                row["kl_from_float32_tokens"] = kl.item()
                row["top1_agreement"] = (old.argmax(-1) == new.argmax(-1)).float().mean().item()
            rows.append(row)
    cpu_gemv.INT8_TOKENS = before
    for row in rows:
        row["delta"] = row["loss"] - full
    return rows


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
    results_tokens = "int8 where the CPU's kernel serves (to 64 an expert)" if cpu_gemv.int8_tokens() else "float32"
    decode = []
    if cpu_gemv.available() and cpu_gemv.vnni(cpu_gemv.library()):
        decode = decode_rows(args.model, windows, full)
    else:
        print("\nno decode rows: they need the CPU's fused kernel with int8 tokens (a C compiler, VNNI)")
    print(f"\ndecode, one token a step\n{'experts':>7} {'attention':>9} {'tokens':>7} {'loss':>7} {'vs fp32':>8}"
          f" {'KL':>9} {'top-1 same':>10}")  # fmt: skip
    for row in decode:
        for key in ("loss", "delta"):
            row[key] = round(row[key], 4)
        kl, same = row.get("kl_from_float32_tokens"), row.get("top1_agreement")
        print(f"{row['experts']:>7} {row['attention']:>9} {row['tokens']:>7} {row['loss']:>7.4f} {row['delta']:>+8.4f}"
              + (f" {kl:>9.2e} {same:>10.4f}" if kl is not None else ""))  # fmt: skip
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": "tiny-mixtral-code (trained, 6 layers, 8 experts, top 2)",
        "text": f"{len(windows)} windows of {args.length} tokens of: {', '.join(SOURCES)}",
        "results": rows,
        "results_tokens": results_tokens,
        "decode": decode,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
