"""Mixtral: config.json -> config, checkpoint names -> ours, router logits -> (ids, weights).

The oracle is transformers' `models/mixtral/modeling_mixtral.py` (5.23): its `MixtralConfig`, its
`MixtralTopKRouter`, and its conversion mapping (`conversion_mapping.py`, "mixtral"), which names the
fused layout this adapter also reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from offload.decoder import ModelConfig, positive_int
from quant.errors import MoEOffloadError

model_type = "mixtral"
# config.json's keys for ModelConfig's fields, where they differ: error messages name what the user's file says
CONFIG_JSON_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                     "num_kv_heads": "num_key_value_heads", "num_experts": "num_local_experts",
                     "top_k": "num_experts_per_tok", "max_position": "max_position_embeddings",
                     "eos_token_ids": "eos_token_id"}  # fmt: skip
# transformers' MixtralConfig.attribute_map: config.json may spell a key by its alias, and transformers reads it so
ATTRIBUTE_MAP = {"num_experts": "num_local_experts"}


@dataclass(frozen=True)
class MixtralConfig:
    """config.json's keys, with transformers' MixtralConfig defaults (a key that is absent means that)."""

    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8  # GQA; None -> one per attention head, as transformers reads it
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6  # hub files: top level; transformers 5 files: rope_parameters.rope_theta
    sliding_window: int | None = None  # None: full causal attention
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False  # True: no lm_head on disk, the output layer is the embedding
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, config: dict) -> MixtralConfig:
        """Keep the keys this dataclass names (or their aliases), drop the rest; read RoPE as transformers does."""
        config = dict(config)
        for alias, key in ATTRIBUTE_MAP.items():
            if alias in config:
                if key in config and config[key] != config[alias]:
                    raise MoEOffloadError(
                        f"{alias} {config[alias]!r} and {key} {config[key]!r} disagree ({alias} is transformers' "
                        f"alias for {key}); keep one of them in config.json"
                    )
                config[key] = config.pop(alias)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        for key in ("rope_scaling", "rope_parameters"):
            # transformers skips a falsy rope_scaling, and refuses a rope_parameters that is no dict
            value = config.get(key)
            if not (value is None or isinstance(value, dict) or (key == "rope_scaling" and not value)):
                raise MoEOffloadError(f"{key} {value!r} must be an object or null")
        key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"  # the older key wins, if set
        rope = config.get(key) or {}
        type_key = "rope_type" if "rope_type" in rope else "type"  # transformers reads rope_type first
        rope_type = rope.get(type_key, "default")
        if rope_type != "default":
            raise MoEOffloadError(
                f"rope type {rope_type!r} ({key}.{type_key}) is not supported; moe-offload runs plain RoPE: "
                "remove rope_scaling / set rope_parameters.rope_type to 'default' in config.json"
            )
        if "rope_theta" in rope:  # else the top-level rope_theta (hub files), else the default
            kwargs["rope_theta"] = rope["rope_theta"]
        if kwargs.get("hidden_act", "silu") != "silu":
            raise MoEOffloadError(f"hidden_act {kwargs['hidden_act']!r} is not supported; Mixtral uses 'silu'")
        return cls(**kwargs)

    def model_config(self, names: dict[str, str] = CONFIG_JSON_NAMES) -> ModelConfig:
        """`names`: how config.json spells ModelConfig's fields, for error messages."""
        heads = self.num_attention_heads
        head_dim = self.head_dim  # transformers' default below; a bad size or head count is refused before head_dim
        if head_dim is None and positive_int(self.hidden_size) and positive_int(heads):
            head_dim = self.hidden_size // heads
        if self.head_dim is None:  # a message about head_dim then names where it came from
            names = {**names, "head_dim": "head_dim (hidden_size / num_attention_heads)"}
        values = dict(
            model_type=model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=heads if self.num_key_value_heads is None else self.num_key_value_heads,
            head_dim=head_dim,
            num_experts=self.num_local_experts,
            top_k=self.num_experts_per_tok,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            sliding_window=self.sliding_window,
            max_position=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_ids=() if self.eos_token_id is None else self.eos_token_id,
        )
        return ModelConfig.from_dict(values, names=names)


def model_config(config: dict) -> ModelConfig:
    """config.json (as a dict) -> the normalized config the shared decoder reads."""
    ours = {key: field for field, key in CONFIG_JSON_NAMES.items()}
    aliased = {ours[key]: alias for alias, key in ATTRIBUTE_MAP.items() if alias in config and key not in config}
    return MixtralConfig.from_dict(config).model_config(names={**CONFIG_JSON_NAMES, **aliased})


# Checkpoint names -> ours. The hub's files say `block_sparse_moe`; transformers 5 says `mlp` in memory
# and in files it writes fused; either prefix may carry either expert layout.
_MOE = r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)"
_RENAMES = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed"),
    (re.compile(r"^model\.norm\.weight$"), "norm"),
    (re.compile(r"^lm_head\.weight$"), "lm_head"),
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$"), "layers.{0}.input_norm"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$"), "layers.{0}.post_norm"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.weight$"), "layers.{0}.{1}"),
    (re.compile(rf"^{_MOE}\.gate\.weight$"), "layers.{0}.router"),
    (re.compile(rf"^{_MOE}\.experts\.(\d+)\.(w[123])\.weight$"), "layers.{0}.experts.{1}.{2}"),
]
_GATE_UP = re.compile(rf"^{_MOE}\.experts\.gate_up_proj$")  # [E, 2I, D]: gate rows, then up rows
_DOWN = re.compile(rf"^{_MOE}\.experts\.down_proj$")  # [E, D, I]
_SKIP = re.compile(r"\.rotary_emb\.inv_freq$")  # recomputed from rope theta; old files stored it


def sanitize(name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
    """One checkpoint tensor -> our (name, tensor) pairs: one for most, one per expert for fused ones.

    Per-expert outputs of a fused tensor are views into it (no copy): w1 gate [I, D], w2 down [D, I],
    w3 up [I, D]. Works on meta tensors too, which is how a checkpoint lists our names without reading.
    """
    if _SKIP.search(name):
        return
    if match := _GATE_UP.match(name):
        layer = match.group(1)
        experts, two_i, _ = tensor.shape
        assert two_i % 2 == 0, f"{name}: gate_up_proj rows {two_i} are not gate and up of equal size"
        for e in range(experts):
            yield f"layers.{layer}.experts.{e}.w1", tensor[e, : two_i // 2]
            yield f"layers.{layer}.experts.{e}.w3", tensor[e, two_i // 2 :]
        return
    if match := _DOWN.match(name):
        for e in range(tensor.shape[0]):
            yield f"layers.{match.group(1)}.experts.{e}.w2", tensor[e]
        return
    for pattern, ours in _RENAMES:
        if match := pattern.match(name):
            yield ours.format(*match.groups()), tensor
            return
    raise MoEOffloadError(
        f"tensor {name!r} is not part of a Mixtral checkpoint; is model_type 'mixtral' in config.json right?"
    )


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router logits -> (expert ids [T, k] int64, weights [T, k] float32), highest weight first.

    transformers' MixtralTopKRouter: softmax in float32 over all experts, top-k, renormalize to sum 1.
    """
    # T = tokens, E = experts, k = experts per token
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k], sorted descending
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights
