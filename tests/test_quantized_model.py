"""Quantized models: our forward equals transformers carrying our dequantized weights; the quantized
folder equals in-memory quantization; on the trained tiny model the loss stays near hqq's own."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import offload
from offload.convert import quantize_model
from quant.hqq import Quantized, dequantize
from tests.tiny import hf_model, make_tiny_mixtral


def dequantized(weight) -> torch.Tensor:
    return dequantize(weight, torch.float32) if isinstance(weight, Quantized) else weight.float()


def carry_our_weights(reference, model, dequantize_attention=dequantized) -> None:
    """Put our (dequantized) experts and attention into a transformers MixtralForCausalLM."""
    config = model.config
    with torch.no_grad():
        for layer_index, layer in enumerate(reference.model.layers):
            for expert in range(config.num_experts):
                packed = model.cache.arena[layer_index * config.num_experts + expert]  # direct mode: the arena
                w = {k: dequantized(v) for k, v in model.moe.expert_format.unpack(packed).items()}
                layer.mlp.experts.gate_up_proj[expert] = torch.cat([w["w1"], w["w3"]])
                layer.mlp.experts.down_proj[expert] = w["w2"]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                weight = model.decoder.weights[f"layers.{layer_index}.{proj}"]
                getattr(layer.self_attn, proj).weight.copy_(dequantize_attention(weight))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("q"), hidden=64, intermediate=128, layers=2, experts=4, seed=7)


@pytest.mark.parametrize("expert_bits", ["2", "3", "4"])
def test_quantized_forward_equals_transformers_with_our_dequantized_weights(tiny, expert_bits):
    tokens = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(0))
    model = offload.load(str(tiny), device="cpu", expert_bits=expert_bits, attn_bits="4")
    assert isinstance(model.decoder.weights["layers.0.q_proj"], Quantized)
    reference = hf_model(tiny)
    with torch.no_grad():
        unquantized = reference(tokens[None]).logits[0]
        carry_our_weights(reference, model)
        expected = reference(tokens[None]).logits[0]
    got = model.logits(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - unquantized).abs().max().item() > 1e-2  # the quantization really happened


def test_quantized_folder_equals_in_memory_quantization(tiny, tmp_path):
    folder = quantize_model(str(tiny), tmp_path / "q2", expert_bits="2", attn_bits="4")
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(1))
    from_folder = offload.load(str(folder), device="cpu", slots=2).logits(tokens)
    in_memory = offload.load(str(tiny), device="cpu", expert_bits="2", attn_bits="4").logits(tokens)
    assert torch.equal(from_folder, in_memory)


def test_unquantized_experts_stored_in_one_dtype_run_in_another(tiny, tmp_path):
    """--expert-bits none keeps the experts as stored; loaded in another dtype (float32 on the CPU, float16 on
    a T4) they are converted as they go in the arena, as an HF folder's are: the matrix products failed on the
    dtypes' mismatch before."""
    folder = quantize_model(str(tiny), tmp_path / "none", expert_bits="none", attn_bits="none")  # float32 experts
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(2))
    for slots in (None, 2):
        from_folder = offload.load(str(folder), device="cpu", dtype="bfloat16", slots=slots)
        assert from_folder.cache.expert_bytes == 3 * 64 * 128 * 2  # three bfloat16 matrices
        in_memory = offload.load(str(tiny), device="cpu", dtype="bfloat16", slots=slots)
        assert torch.equal(from_folder.logits(tokens), in_memory.logits(tokens))


# -- the trained tiny model: quantization loss means something there ----------------------------------


def validation_windows(tokenizer, windows: int = 2, length: int = 256) -> list[torch.Tensor]:
    """Teacher-forced windows of real Python source, from modules of the standard library."""
    import textwrap

    text = Path(textwrap.__file__).read_text()
    ids = tokenizer(text)["input_ids"]
    return [torch.tensor(ids[i * length : (i + 1) * length]) for i in range(windows)]


def mean_loss(logits_of, windows) -> float:
    losses = [F.cross_entropy(logits_of(w)[:-1], w[1:]).item() for w in windows]
    return sum(losses) / len(losses)


def hqq_round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """hqq's own HQQLinear on the weight, dequantized: the paper's 2-bit scheme, or 4-bit group 64."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    if bits == 2:
        config = BaseQuantizeConfig(nbits=2, group_size=16, quant_scale=True, quant_zero=True)
        config["scale_quant_params"]["group_size"] = 128
        config["zero_quant_params"] = {"nbits": 8, "channel_wise": True, "group_size": 128, "optimize": False}
    else:
        config = BaseQuantizeConfig(nbits=4, group_size=64)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    return HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu").dequantize()


@pytest.mark.parametrize("bits", [4, 2])
def test_trained_model_loss_stays_near_hqqs_own_round_trip(trained_model_dir, bits):
    model = offload.load(str(trained_model_dir), device="cpu", expert_bits=str(bits))
    windows = validation_windows(model.tokenizer)
    reference = hf_model(trained_model_dir)
    with torch.no_grad():
        full = mean_loss(lambda w: reference(w[None]).logits[0], windows)
        for layer in reference.model.layers:
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                experts.gate_up_proj[e] = hqq_round_trip(experts.gate_up_proj[e], bits)
                experts.down_proj[e] = hqq_round_trip(experts.down_proj[e], bits)
        hqq = mean_loss(lambda w: reference(w[None]).logits[0], windows)
    ours = mean_loss(model.logits, windows)
    assert math.isfinite(ours)
    assert abs(ours - hqq) < 0.03, f"{bits}-bit: ours {ours:.4f}, hqq {hqq:.4f}, unquantized {full:.4f}"
    assert ours - full < (0.05 if bits == 4 else 0.4), f"{bits}-bit costs {ours - full:.4f} nats"


def test_bnb_nf4_attention_matches_transformers_with_our_dequantized_weights(tiny, tmp_path):
    folder = quantize_model(str(tiny), tmp_path / "nf4", expert_bits="4", attn_bits="4", attn_quant="bnb")
    model = offload.load(str(folder), device="cpu")
    from quant.bnb import NF4Quantized, dequantize_nf4

    weight = model.decoder.weights["layers.0.q_proj"]
    assert isinstance(weight, NF4Quantized)
    tokens = torch.randint(3, 128, (16,), generator=torch.Generator().manual_seed(2))
    reference = hf_model(tiny)
    with torch.no_grad():
        carry_our_weights(reference, model, dequantize_attention=dequantize_nf4)
        expected = reference(tokens[None]).logits[0]
    assert (model.logits(tokens) - expected).abs().max().item() < 1e-4
    assert model.info()["attention"] == "bitsandbytes NF4, block 64"
    # the attention dequantized in tiles through the decoder's workspace, all of which the plan counts
    from quant.linear import workspace_bytes

    attention = [w for w in model.decoder.weights.values() if isinstance(w, NF4Quantized)]
    made = sum(buffer.nbytes for buffer in model.decoder.workspace._buffers.values())
    assert made == workspace_bytes(attention, torch.float32, "cpu") > 0


def test_bnb_is_four_bit_only(tiny):
    with pytest.raises(offload.MoEOffloadError, match="--attn-quant bnb is 4-bit NF4 only; use --attn-bits 4, not 8"):
        offload.load(str(tiny), device="cpu", attn_bits="8", attn_quant="bnb")
