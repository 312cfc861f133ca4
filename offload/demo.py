"""`moe-offload demo`: the whole path on a tiny model, offline, in seconds.

A seeded random Mixtral is written in the hub's layout (sharded safetensors, per-expert names), quantized
into our folder, loaded through a cache of a few slots per layer, checked against transformers, and
asked to generate. Random weights make no sense of text, so the demo speaks in token ids; pass a real
model folder to see text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.api import OffloadedModel, load
from offload.convert import Progress, no_progress, quantize_model
from quant.errors import MoEOffloadError


def write_random_mixtral(
    path: Path,
    *,
    hidden: int = 64,
    intermediate: int = 96,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 8,
    top_k: int = 2,
    vocab: int = 128,
    seed: int = 0,
    sliding_window: int | None = None,
    tie: bool = False,
    max_pos: int = 256,
    shards: int = 2,
) -> Path:
    """A seeded random MixtralForCausalLM, saved by transformers in the hub's layout, in float32.

    The weights are drawn wider than transformers' init (std 0.02), so that routing, attention and
    the residual stream all matter to the logits.
    """
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # its shard-writing bar would interleave with ours
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        sliding_window=sliding_window,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MixtralForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)  # norms near 1, but not all equal
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:  # linear layers: unit-variance outputs; the router a little sharper
                scale = 2.0 if name.endswith("gate.weight") else 1.0
                param.copy_(scale * noise / math.sqrt(param.shape[-1]))
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    max_shard_size = total_bytes + 1 if shards <= 1 else math.ceil(total_bytes / shards)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


@dataclass
class DemoRun:
    source: Path  # the random HF checkpoint
    quantized: Path  # our folder
    model: OffloadedModel  # loaded from the quantized folder
    exact_error: float  # max |logit difference| of the unquantized runtime against transformers
    quantized_error: float  # the same for the 4-bit model: what quantization costs
    logit_range: float  # max |logit| of transformers' own: the scale both errors are read against
    same_top: int  # prompt positions where the 4-bit model's most likely next token is transformers' own
    prompt_ids: list[int]
    token_ids: list[int]


DEMO_EXPERTS = 8  # per layer, top 2


def check_options(*, slots: int, tokens: int) -> None:
    """The demo's errors, before any of its work."""
    if not 1 <= slots <= DEMO_EXPERTS:
        raise MoEOffloadError(f"--slots must be between 1 and {DEMO_EXPERTS} (the experts per layer), got {slots}")
    if tokens < 1:
        raise MoEOffloadError(f"--tokens must be at least 1, got {tokens}")


def run_demo(workdir: Path, *, slots: int = 2, tokens: int = 32, progress: Progress = no_progress) -> DemoRun:
    """Write, quantize, load, check and generate; every step on the CPU, in `workdir`."""
    from transformers import MixtralForCausalLM

    check_options(slots=slots, tokens=tokens)
    shape = dict(hidden=128, intermediate=256, layers=4, experts=DEMO_EXPERTS, vocab=512, seed=0)
    source = write_random_mixtral(workdir / "random-mixtral", **shape)
    folder = quantize_model(str(source), workdir / "random-mixtral-4bit", expert_bits="4", attn_bits="4",
                            progress=progress)  # fmt: skip
    prompt_ids = torch.randint(3, shape["vocab"], (12,), generator=torch.Generator().manual_seed(1)).tolist()

    reference = MixtralForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([prompt_ids])).logits[0]
    exact = load(str(source), device="cpu", slots=slots)
    exact_error = (exact.logits(prompt_ids) - expected).abs().max().item()

    model = load(str(folder), device="cpu", slots=slots)
    quantized = model.logits(prompt_ids)
    quantized_error = (quantized - expected).abs().max().item()
    same_top = int((quantized.argmax(-1) == expected.argmax(-1)).sum())
    model.reset_stats()
    result = model.generate(prompt_ids, max_new_tokens=tokens, temperature=0)
    logit_range = expected.abs().max().item()
    return DemoRun(source, folder, model, exact_error, quantized_error, logit_range, same_top, prompt_ids,
                   result.token_ids)  # fmt: skip
