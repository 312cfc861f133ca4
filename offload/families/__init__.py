"""Model families: one small adapter per config.json `model_type` (DESIGN.md, "Model families").

An adapter is a module with `model_type`, `model_config(config: dict) -> ModelConfig`,
`sanitize(name, tensor) -> Iterator[(our_name, tensor)]` and `route(logits, top_k) -> (ids, weights)`.
The decoder, the MoE block and the cache are shared; a new family adds one file and one line here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor

from offload.decoder import ModelConfig
from offload.families import mixtral
from quant.errors import MoEOffloadError


class Family(Protocol):
    model_type: str

    def model_config(self, config: dict) -> ModelConfig: ...

    def sanitize(self, name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]: ...

    def route(self, logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]: ...


FAMILIES: dict[str, Family] = {mixtral.model_type: mixtral}

# config.json keys that only a Mixture-of-Experts model has (Mixtral, Qwen-MoE/OLMoE, DeepSeek, DBRX, ...)
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def family_for(config: dict) -> Family:
    """The adapter for this config.json, or a MoEOffloadError that says what runs instead."""
    supported = ", ".join(sorted(FAMILIES))
    model_type = config.get("model_type")
    if not model_type:
        raise MoEOffloadError(f"config.json has no model_type; moe-offload runs: {supported}")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if any(config.get(key) for key in _EXPERT_KEYS):
        # the keys say Mixture-of-Experts, but not that model_type is one (a Mixtral relabelled 'llama')
        raise MoEOffloadError(f"model_type {model_type!r} is not supported; moe-offload runs: {supported}")
    raise MoEOffloadError(f"model_type {model_type!r} is not a Mixture-of-Experts model; moe-offload runs: {supported}")
