"""A synthetic checkpoint: Mixtral's exact shapes and our quantized formats, with random codes.

No Mixtral weights can be downloaded here, and quantizing 94 GB of fp16 would take hours, so speed is
measured on a folder written straight in `quantize`'s format (offload/convert.py): random expert codes
through `ExpertFormat.random`, random attention codes through `quant.hqq.random_quantized` (no hqq
run), and random full-precision embeddings, norms, routers and lm_head. The numbers are sane (finite,
|w| small, routing spread over the experts) but mean nothing: such a model runs on token ids only.

Like `quantize`, it streams one layer of experts at a time, writes each file under a temporary name,
and resumes after a kill (the writer's journal). Each layer draws from its own seeded generator, so a
resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from offload import api
from offload.convert import Progress, build_manifest, check_free_space, no_progress
from offload.decoder import PREFILL_CHUNK, ModelConfig
from quant.checkpoint import FORMAT_VERSION, RESIDENT, CheckpointWriter, expert_file
from quant.errors import MoEOffloadError, whole_number
from quant.hqq import ATTN_PRESETS, EXPERT_PRESETS, QuantSpec, quantized_nbytes, random_quantized, to_tensors
from quant.hqq import preset as spec_preset
from quant.packing import ExpertFormat

# Model shapes in ModelConfig's terms (offload/decoder.py); "layers" may be overridden per run.
_MIXTRAL = dict(
    model_type="mixtral",
    vocab_size=32000,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    sliding_window=None,
    max_position=32768,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(2,),
    num_experts=8,
    top_k=2,
)
PRESETS: dict[str, dict] = {
    # Mixtral-8x7B-v0.1's config.json, exactly: 46.7 B parameters, 256 experts of 176 M each
    "mixtral-8x7b": _MIXTRAL
    | dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
    # a quarter of its width and of its depth, for speed on a CPU (~0.4 GB at 2-bit)
    "mixtral-small": _MIXTRAL
    | dict(hidden_size=1024, intermediate_size=3584, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=128),
    # for tests: every preset's group sizes still divide its dims
    "tiny": _MIXTRAL
    | dict(
        vocab_size=512,
        max_position=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
}
STORAGE_DTYPE = torch.bfloat16  # full-precision resident weights (and experts at --expert-bits none), as the hub's
_RESIDENT_STREAM = 1 << 16  # generator stream of the resident weights; layers' experts use streams 0, 1, ...
MAX_SEED = (2**63 - 1) // (_RESIDENT_STREAM + 1) - 1  # the largest whose streams' seeds fit an int64


def preset_config(name: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of preset `name`, with `layers` decoder layers when given."""
    if name not in PRESETS:
        raise MoEOffloadError(f"unknown synthetic preset {name!r}; choose one of {', '.join(PRESETS)}")
    if layers is not None and not 1 <= layers < _RESIDENT_STREAM:
        raise MoEOffloadError(f"--layers must be between 1 and {_RESIDENT_STREAM - 1}, got {layers}")
    shapes = PRESETS[name] | ({} if layers is None else {"num_layers": layers})
    return ModelConfig(**shapes)


def synthetic_format(config: ModelConfig, expert_bits: str = "2") -> ExpertFormat:
    """The packed-expert format of a synthetic model (its bytes per expert), computed without writing."""
    spec = spec_preset(EXPERT_PRESETS, expert_bits, "--expert-bits")
    return ExpertFormat.build(config.hidden_size, config.intermediate_size, spec, STORAGE_DTYPE)


def hf_config(config: ModelConfig) -> dict:
    """config.json as the hub's Mixtral files spell it (offload/families/mixtral.py reads it back)."""
    (eos,) = config.eos_token_ids
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window,
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "torch_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
    }


def synthetic_name(manifest: dict) -> str | None:
    """How a benchmark names a synthetic folder ("synthetic mixtral-8x7b, 2-bit experts"); None if real."""
    quantization = manifest.get("quantization") or {}
    if quantization.get("synthetic") is not True:
        return None
    bits = quantization.get("expert_bits")
    experts = "unquantized experts" if bits == "none" else f"{bits}-bit experts"
    layers = (manifest.get("config") or {}).get("num_layers")
    preset = quantization.get("preset")
    default_layers = PRESETS.get(preset, {}).get("num_layers")
    depth = "" if layers == default_layers else f" ({layers} layers)"
    return f"synthetic {preset}{depth}, {experts}"


def _generator(seed: int, stream: int) -> torch.Generator:
    """One independent generator per layer (and one for the resident weights), so a resume draws the same."""
    return torch.Generator().manual_seed(seed * (_RESIDENT_STREAM + 1) + stream)


def _resident(config: ModelConfig, attn: QuantSpec | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Embeddings, norms, routers and lm_head in bfloat16; attention quantized by `attn` (random codes).

    Scales: embeddings and weights std ~0.01-0.02 as trained ones; norms near 1; router logits std ~1.5
    on a normed input, so each token picks different experts and routing spreads over all of them.
    """
    D, V, E = config.hidden_size, config.vocab_size, config.num_experts

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * std + mean).to(STORAGE_DTYPE)

    tensors = {"embed": normal((V, D), 0.02), "norm": normal((D,), 0.02, 1.0)}
    for layer in range(config.num_layers):
        prefix = f"layers.{layer}."
        tensors[prefix + "input_norm"] = normal((D,), 0.02, 1.0)
        tensors[prefix + "post_norm"] = normal((D,), 0.02, 1.0)
        tensors[prefix + "router"] = normal((E, D), 1.5 / D**0.5)
        for name, shape in config.attention_shapes().items():
            if attn is None:
                tensors[prefix + name] = normal(shape, 0.01)
            else:
                tensors.update(to_tensors(random_quantized(shape, attn, generator), prefix + name))
    tensors["lm_head"] = normal((V, D), 1.0 / D**0.5)
    return tensors


def prefill_reserve(
    preset: str, context: int, *, chunk: int = PREFILL_CHUNK, expert_bits: str = "2", attn_bits: str = "4"
) -> int:
    """What the plan keeps free on CUDA for a synthetic model (offload.api.prefill_reserve), in bfloat16
    as bench runs it, computed without writing: one layer's attention is drawn, since every layer's has
    the same shapes and so dequantizes into the same workspace buffers."""
    config = preset_config(preset)
    attn = spec_preset(ATTN_PRESETS, attn_bits, "--attn-bits")
    generator = _generator(0, _RESIDENT_STREAM)
    attention = {} if attn is None else {
        name: random_quantized(shape, attn, generator) for name, shape in config.attention_shapes().items()
    }  # fmt: skip
    expert_format = synthetic_format(config, expert_bits)
    return api.prefill_reserve(config, attention, expert_format, context, chunk, STORAGE_DTYPE, torch.device("cuda"))


def resident_bytes(preset: str, attn_bits: str = "4", layers: int | None = None) -> int:
    """The bytes of a synthetic model's resident weights, as synthesize writes them (tests/test_synth.py holds
    the two equal): attention quantized by `attn_bits`, everything else in STORAGE_DTYPE."""
    config = preset_config(preset, layers)
    attn = spec_preset(ATTN_PRESETS, attn_bits, "--attn-bits")
    attention = tuple(f".{name}" for name in config.attention_shapes())
    return sum(
        quantized_nbytes(shape, attn) if attn is not None and name.endswith(attention)
        else math.prod(shape) * STORAGE_DTYPE.itemsize
        for name, shape in config.resident_shapes().items()
    )  # fmt: skip


def folder_bytes(preset: str, expert_bits: str = "2", attn_bits: str = "4", layers: int | None = None) -> int:
    """What synthesize writes, near enough to check the disk before it starts: experts and resident weights."""
    config = preset_config(preset, layers)
    experts = config.num_layers * config.num_experts * synthetic_format(config, expert_bits).nbytes
    return experts + resident_bytes(preset, attn_bits, layers)


def synthesize(
    out: str | Path,
    preset: str,
    *,
    expert_bits: str = "2",
    attn_bits: str = "4",
    layers: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Write a synthetic quantized folder of preset `preset` at `out`; returns `out`.

    Loads with `offload.load(out)` like any quantized folder; its manifest's quantization says
    "synthetic": true. Deterministic for a seed. progress as quantize_model reports it.
    """
    number = whole_number(seed)
    if number is None or not 0 <= number <= MAX_SEED:
        raise MoEOffloadError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    seed = number
    config = preset_config(preset, layers)
    expert_format = synthetic_format(config, expert_bits)
    attn = spec_preset(ATTN_PRESETS, attn_bits, "--attn-bits")
    job = {
        "source": f"synthetic:{preset}",
        "layers": config.num_layers,
        "seed": seed,
        "expert_bits": expert_bits,
        "attn_bits": attn_bits,
        "format_version": FORMAT_VERSION,
    }
    check_free_space(Path(out), folder_bytes(preset, expert_bits, attn_bits, layers), "synth")
    writer = CheckpointWriter(Path(out), job=job, force=force)

    steps = config.num_layers + 1  # each layer's experts, then the resident weights
    progress("layers", 0, steps)
    for layer in range(config.num_layers):
        name = expert_file(layer)
        if not writer.done(name):
            generator = _generator(seed, layer)
            # one buffer per expert: safetensors would copy views that share one layer-wide buffer
            writer.write(name, {str(e): expert_format.random(generator) for e in range(config.num_experts)})
        progress("layers", layer + 1, steps)

    if not writer.done(RESIDENT):
        writer.write(RESIDENT, _resident(config, attn, _generator(seed, _RESIDENT_STREAM)))
    progress("resident", steps, steps)

    side_files = {
        "config.json": hf_config(config),
        "generation_config.json": {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0]},
    }
    for side, content in side_files.items():
        if not writer.done(side):
            writer.write_bytes(side, (json.dumps(content, indent=2) + "\n").encode())

    quantized = {}
    if attn is not None:
        quantized = {
            f"layers.{layer}.{name}": {"shape": list(shape)}
            for layer in range(config.num_layers)
            for name, shape in config.attention_shapes().items()
        }
    quantization = {
        "expert_bits": expert_bits,
        "attn_bits": attn_bits,
        "attn_quant": "hqq",
        "synthetic": True,  # random codes: for speed and memory figures only, never for text
        "preset": preset,
        "seed": seed,
    }
    source = {"model": f"synthetic:{preset}", "revision": None}
    writer.finish(build_manifest(source, config, expert_format, attn, quantized, quantization))
    return Path(out)
