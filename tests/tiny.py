"""Tiny Mixtral checkpoints for tests, written the way the hub's real Mixtral files are written.

`make_tiny_mixtral` builds a transformers `MixtralForCausalLM` with seeded random float32 weights and
saves it with `save_pretrained`, which in transformers 5 writes the hub's layout: sharded safetensors
with `model.safetensors.index.json` and per-expert `block_sparse_moe.experts.{e}.w1/w2/w3.weight`.
`fused=True` rewrites the files with all experts of a layer fused (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, `mlp.gate.weight`), the other layout a loader must read.

The weights (offload.demo.write_random_mixtral, which `moe-offload demo` uses too) are drawn wider than
transformers' init, so that routing, attention and the residual stream all matter to the logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offload.demo import write_random_mixtral

EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def make_tiny_mixtral(
    path: Path, *, fused: bool = False, shards: int = 2, dtype: torch.dtype | None = None, **shape
) -> Path:
    """Write a tiny random Mixtral to `path` in about `shards` files (1: a single model.safetensors), in float32
    or, given `dtype`, every tensor rounded to it (as the hub's bfloat16 checkpoints are).

    `shape` goes to offload.demo.write_random_mixtral: hidden, intermediate, layers, heads, kv_heads,
    experts, top_k, vocab, seed, sliding_window, tie, max_pos.
    """
    path = write_random_mixtral(Path(path), shards=shards, **shape)
    config = json.loads((path / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    tie = config["tie_word_embeddings"]
    names = _tensor_names(path)
    expert_names = [n for n in names if EXPERT_NAME.match(n)]
    assert len(expert_names) == layers * experts * 3, "save_pretrained no longer writes the hub's layout"
    assert ("lm_head.weight" in names) != tie
    if fused:
        _rewrite_fused(path, layers, experts, shards)
    if dtype is not None:
        _write_sharded(path, {name: t.to(dtype) for name, t in _read_all(path).items()}, shards)
        config["dtype"] = str(dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def prefill_then_decode(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """From a reset cache: the logits of the first `prefill` tokens' last, then of each later token decoded one at a
    time, [len(tokens) - prefill + 1, vocab]."""
    model.reset()
    rows = [model.forward(tokens[:prefill], 0)[-1:]]
    rows += [model.forward(tokens[p : p + 1], p) for p in range(prefill, len(tokens))]
    return torch.cat(rows)


def hf_model(path: Path):
    """The transformers oracle: MixtralForCausalLM in float32, eval mode."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tensor_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return list(f.keys())


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        file.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def _rewrite_fused(path: Path, layers: int, experts: int, shards: int) -> None:
    """Replace the per-expert tensors with transformers 5's fused ones ([E, 2I, D] gate then up, [E, D, I])."""
    tensors = _read_all(path)
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not EXPERT_NAME.match(name):
            fused[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
    for layer in range(layers):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"

        def stack(w: str, prefix=prefix) -> torch.Tensor:
            return torch.stack([tensors[f"{prefix}.{e}.{w}.weight"] for e in range(experts)])

        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack("w1"), stack("w3")], dim=1)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = stack("w2")
    _write_sharded(path, fused, shards)


def _write_sharded(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write `tensors` in `shards` files with an index (one file: model.safetensors, no index)."""
    metadata = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, path / "model.safetensors", metadata=metadata)
        return
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, path / file, metadata=metadata)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    index["weight_map"] = dict(sorted(weight_map.items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
