"""The family registry, the Mixtral config, sanitize over both expert layouts, and the router."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from offload.checkpoint import open_hf
from offload.families import FAMILIES, family_for, mixtral
from offload.families.mixtral import MixtralConfig, route, sanitize
from quant.errors import MoEOffloadError
from tests.tiny import make_tiny_mixtral

# The hub's mistralai/Mixtral-8x7B-v0.1 config.json (transformers 4 era): rope theta at the top level.
HUB_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}


def test_family_for_mixtral_is_the_mixtral_adapter():
    assert family_for(HUB_CONFIG) is mixtral
    assert FAMILIES == {"mixtral": mixtral}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LLAMA_CONFIG, "model_type 'llama' is not a Mixture-of-Experts model; moe-offload runs: mixtral"),
        (
            {"model_type": "qwen2_moe", "num_experts": 60},
            "model_type 'qwen2_moe' is not supported; moe-offload runs: mixtral",
        ),
        (
            {"model_type": "deepseek_v2", "n_routed_experts": 64},
            "model_type 'deepseek_v2' is not supported; moe-offload runs: mixtral",
        ),
        # a Mixtral relabelled: its expert keys do not make llama a Mixture-of-Experts model
        ({**HUB_CONFIG, "model_type": "llama"}, "model_type 'llama' is not supported; moe-offload runs: mixtral"),
        ({"hidden_size": 64}, "config.json has no model_type; moe-offload runs: mixtral"),
    ],
)
def test_family_for_refuses_with_exact_text(config, message):
    with pytest.raises(MoEOffloadError) as error:
        family_for(config)
    assert str(error.value) == message


def test_hub_config_normalizes_to_mixtral_8x7b():
    config = mixtral.model_config(HUB_CONFIG)
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (4096, 14336, 32)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 128)  # head_dim absent
    assert (config.num_experts, config.top_k, config.vocab_size) == (8, 2, 32000)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position) == (1e6, 1e-5, 32768)
    assert (config.sliding_window, config.tie_word_embeddings) == (None, False)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_rope_theta_is_read_from_either_place(trained_model_dir):
    trained = json.loads((trained_model_dir / "config.json").read_text())
    assert "rope_theta" not in trained and trained["rope_parameters"]["rope_theta"] == 1e6
    assert MixtralConfig.from_dict(trained).rope_theta == 1e6
    assert MixtralConfig.from_dict({**HUB_CONFIG, "rope_theta": 5e5}).rope_theta == 5e5
    assert MixtralConfig.from_dict({"rope_parameters": {"rope_theta": 250.0, "rope_type": "default"}}).rope_theta == 250
    normalized = mixtral.model_config(trained)
    assert (normalized.head_dim, normalized.tie_word_embeddings, normalized.num_layers) == (32, True, 6)


def test_config_drops_unknown_keys_and_keeps_an_explicit_head_dim():
    config = MixtralConfig.from_dict({**HUB_CONFIG, "head_dim": 96, "some_future_key": 1, "eos_token_id": [2, 7]})
    assert config.head_dim == 96 and not hasattr(config, "some_future_key")
    assert mixtral.model_config({**HUB_CONFIG, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
    assert mixtral.model_config({**HUB_CONFIG, "num_key_value_heads": None}).num_kv_heads == 32


def hf_config(config: dict):
    """transformers' own reading of config.json: the oracle for keys, aliases and RoPE."""
    from transformers import MixtralConfig as HFMixtralConfig

    return HFMixtralConfig.from_dict(copy.deepcopy(config))  # it writes into the rope dicts it is given


def test_num_experts_is_transformers_alias_for_num_local_experts():
    config = {k: v for k, v in HUB_CONFIG.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert hf_config(config).num_local_experts == 4
    assert mixtral.model_config(config).num_experts == 4  # was the default 8: KeyError on experts.4 at load
    assert mixtral.model_config({**config, "num_local_experts": 4}).num_experts == 4
    with pytest.raises(MoEOffloadError) as error:  # errors name the key the file has
        mixtral.model_config({**config, "num_experts_per_tok": 5})
    assert str(error.value) == "num_experts_per_tok 5 must be between 1 and num_experts (4)"
    with pytest.raises(MoEOffloadError) as error:  # transformers lets the alias win; say it instead
        MixtralConfig.from_dict({**HUB_CONFIG, "num_experts": 4})
    assert str(error.value) == (
        "num_experts 4 and num_local_experts 8 disagree (num_experts is transformers' alias for num_local_experts); "
        "keep one of them in config.json"
    )


@pytest.mark.parametrize(
    ("rope", "theta"),
    [
        ({"rope_scaling": {"rope_type": "default"}}, 1e6),  # the top-level rope_theta
        ({"rope_scaling": {"type": "default", "rope_theta": 3.0}}, 3.0),
        ({"rope_scaling": {"rope_type": "default"}, "rope_parameters": {"rope_theta": 7.0}}, 1e6),  # scaling wins
        ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 5e5}, 5e5),
        ({"rope_parameters": {"type": "default", "rope_theta": 9.0}}, 9.0),
        ({"rope_scaling": None, "rope_parameters": None}, 1e6),
        ({"rope_scaling": False, "rope_parameters": {}}, 1e6),  # transformers skips a falsy rope_scaling
    ],
)
def test_plain_rope_is_read_where_transformers_reads_it(rope, theta):
    config = {**HUB_CONFIG, **rope}
    hf_rope = hf_config(config).rope_parameters
    assert (hf_rope["rope_type"], hf_rope["rope_theta"]) == ("default", theta)
    assert MixtralConfig.from_dict(config).rope_theta == theta


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}},
            "rope type 'yarn' (rope_parameters.rope_type) is not supported; moe-offload runs plain RoPE: remove "
            "rope_scaling / set rope_parameters.rope_type to 'default' in config.json",
        ),
        (  # was named 'default': the type was read from rope_parameters only
            {"rope_scaling": {"type": "linear", "factor": 2}},
            "rope type 'linear' (rope_scaling.type) is not supported; moe-offload runs plain RoPE: remove "
            "rope_scaling / set rope_parameters.rope_type to 'default' in config.json",
        ),
        (  # rope_type is read before type
            {"rope_scaling": {"type": "default", "rope_type": "dynamic", "factor": 2}},
            "rope type 'dynamic' (rope_scaling.rope_type) is not supported; moe-offload runs plain RoPE: remove "
            "rope_scaling / set rope_parameters.rope_type to 'default' in config.json",
        ),
        # these were AttributeError: 'str' object has no attribute 'get'
        ({"rope_scaling": "default"}, "rope_scaling 'default' must be an object or null"),
        ({"rope_scaling": [1]}, "rope_scaling [1] must be an object or null"),
        ({"rope_parameters": "default"}, "rope_parameters 'default' must be an object or null"),
        ({"rope_parameters": []}, "rope_parameters [] must be an object or null"),
    ],
)
def test_rope_scaling_and_odd_rope_values_are_refused(rope, message):
    with pytest.raises(MoEOffloadError) as error:
        MixtralConfig.from_dict({**HUB_CONFIG, **rope})
    assert str(error.value) == message


def _transformers_checks_rotary_dims() -> bool:
    """Whether the installed transformers refuses an odd rotary dimension (5.24 does; 5.17, the GPU image's, does
    not: it builds the config, and the model fails later)."""
    import inspect

    from transformers import modeling_rope_utils

    return "RoPE requires an even rotary dimension" in inspect.getsource(modeling_rope_utils)


@pytest.mark.skipif(not _transformers_checks_rotary_dims(), reason="this transformers has no check of rotary dims")
def test_transformers_refuses_an_odd_head_dim_as_we_do():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="RoPE requires an even rotary dimension"):
        hf_config({**HUB_CONFIG, "head_dim": 15})


def test_an_odd_head_dim_is_refused():
    with pytest.raises(MoEOffloadError) as error:
        mixtral.model_config({**HUB_CONFIG, "head_dim": 15})
    assert str(error.value) == "head_dim 15 must be even: rotary embeddings turn its dimensions in pairs"
    with pytest.raises(MoEOffloadError) as error:  # no head_dim in the file: the message says where 15 came from
        mixtral.model_config({**HUB_CONFIG, "hidden_size": 480})
    assert str(error.value) == (
        "head_dim (hidden_size / num_attention_heads) 15 must be even: rotary embeddings turn its dimensions in pairs"
    )


def test_sanitize_maps_the_hubs_names():
    w = torch.zeros(1)
    pairs = {
        "model.embed_tokens.weight": "embed",
        "model.norm.weight": "norm",
        "lm_head.weight": "lm_head",
        "model.layers.3.input_layernorm.weight": "layers.3.input_norm",
        "model.layers.3.post_attention_layernorm.weight": "layers.3.post_norm",
        "model.layers.3.self_attn.q_proj.weight": "layers.3.q_proj",
        "model.layers.3.self_attn.o_proj.weight": "layers.3.o_proj",
        "model.layers.3.block_sparse_moe.gate.weight": "layers.3.router",
        "model.layers.3.mlp.gate.weight": "layers.3.router",
        "model.layers.31.block_sparse_moe.experts.7.w2.weight": "layers.31.experts.7.w2",
    }
    for name, ours in pairs.items():
        assert [n for n, _ in sanitize(name, w)] == [ours]
    assert list(sanitize("model.layers.0.self_attn.rotary_emb.inv_freq", w)) == []
    with pytest.raises(MoEOffloadError) as error:
        list(sanitize("model.layers.0.mlp.shared_expert.up_proj.weight", w))
    assert str(error.value) == (
        "tensor 'model.layers.0.mlp.shared_expert.up_proj.weight' is not part of a Mixtral checkpoint; "
        "is model_type 'mixtral' in config.json right?"
    )


def test_sanitize_splits_fused_experts_gate_first():
    experts, inter, hidden = 3, 4, 5
    gate_up = torch.arange(experts * 2 * inter * hidden, dtype=torch.float32).view(experts, 2 * inter, hidden)
    down = torch.randn(experts, hidden, inter)
    ours = dict(sanitize("model.layers.2.mlp.experts.gate_up_proj", gate_up))
    ours |= dict(sanitize("model.layers.2.mlp.experts.down_proj", down))
    assert len(ours) == 3 * experts
    for e in range(experts):
        assert torch.equal(ours[f"layers.2.experts.{e}.w1"], gate_up[e, :inter])
        assert torch.equal(ours[f"layers.2.experts.{e}.w3"], gate_up[e, inter:])
        assert torch.equal(ours[f"layers.2.experts.{e}.w2"], down[e])


def test_both_layouts_give_identical_tensors(tmp_path):
    kwargs = dict(layers=2, experts=4, hidden=48, intermediate=40, seed=3)
    hub = open_hf(str(make_tiny_mixtral(tmp_path / "hub", **kwargs)))
    fused = open_hf(str(make_tiny_mixtral(tmp_path / "fused", fused=True, shards=3, **kwargs)))
    assert any(".block_sparse_moe.experts.0.w1." in n for n in hub.names())
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in fused.names())
    from_hub, from_fused = dict(hub.tensors()), dict(fused.tensors())
    assert sorted(from_hub) == sorted(from_fused)
    assert len(from_hub) == 3 + 2 * (7 + 3 * 4)  # embed, norm, lm_head; per layer 7 + 3 per expert
    for name, tensor in from_hub.items():
        assert torch.equal(tensor, from_fused[name]), name
    assert from_hub["layers.1.experts.3.w1"].shape == (40, 48)
    assert from_hub["layers.1.experts.3.w2"].shape == (48, 40)


def test_route_matches_transformers_router():
    from transformers import MixtralConfig as HFMixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    for experts, top_k in [(8, 2), (4, 2), (6, 3)]:
        router = MixtralTopKRouter(
            HFMixtralConfig(hidden_size=16, num_local_experts=experts, num_experts_per_tok=top_k)
        )
        torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(experts))
        x = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
        logits, hf_weights, hf_ids = router(x)
        ids, weights = route(logits, top_k)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
        assert torch.all(weights[:, :-1] >= weights[:, 1:])  # highest weight first
        torch.testing.assert_close(weights.sum(-1), torch.ones(11))


def test_route_softmaxes_half_precision_logits_in_float32():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.bfloat16)
    ids, weights = route(logits, 2)
    probs = torch.softmax(logits.float(), -1)[0, :2]
    assert ids.tolist() == [[0, 1]] and weights.dtype == torch.float32
    torch.testing.assert_close(weights[0], probs / probs.sum())
