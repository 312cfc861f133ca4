"""The shared decoder against transformers' MixtralForCausalLM: prefill plus 16 decode steps, float32.

The MoE block here is a dense reference written for the test (router via the family's route(), every
expert in memory), so these tests check the decoder and the adapter alone, not the cache.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from offload import decoder as decoder_module
from offload.checkpoint import open_hf
from offload.decoder import Decoder, repeat_kv_policy
from offload.families.mixtral import route
from quant.errors import MoEOffloadError
from tests.tiny import hf_model, make_tiny_mixtral

PROMPT_TOKENS, DECODE_STEPS = 24, 16


class DenseMoE:
    """Reference MoE: route each token, run its top-k experts from memory, sum by weight."""

    def __init__(self, checkpoint):
        config = checkpoint.model_config
        self.top_k = config.top_k
        self.routers = [checkpoint.get_ours(f"layers.{layer}.router") for layer in range(config.num_layers)]
        self.experts = [
            [checkpoint.expert(layer, e) for e in range(config.num_experts)] for layer in range(config.num_layers)
        ]
        self.seen: list[tuple[str, int, torch.Tensor]] = []  # what the decoder handed over, for hook tests

    def __call__(self, layer, x, h_mid):
        self.seen.append(("moe", layer, h_mid.clone()))
        ids, weights = route(F.linear(x, self.routers[layer]), self.top_k)  # [T, k]
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                w = self.experts[layer][int(ids[t, j])]
                out[t] += weights[t, j] * F.linear(F.silu(F.linear(x[t], w["w1"])) * F.linear(x[t], w["w3"]), w["w2"])
        return out

    def layer_done(self, layer, h):
        self.seen.append(("done", layer, h.clone()))


def make_decoder(path, max_seq_len=64, **config_changes):
    checkpoint = open_hf(path)
    config = checkpoint.model_config
    if config_changes:
        config = type(config)(**{**config.to_dict(), **config_changes})
    return Decoder(config, checkpoint.resident(), DenseMoE(checkpoint), max_seq_len=max_seq_len)


def oracle_logits(path, prompt: torch.Tensor) -> list[torch.Tensor]:
    """transformers' logits for the prompt, then for DECODE_STEPS greedy tokens fed one at a time."""
    model = hf_model(path)
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        logits = [out.logits[0]]
        for _ in range(DECODE_STEPS):
            token = logits[-1][-1].argmax().view(1, 1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0])
    return logits


def our_logits(decoder: Decoder, prompt: torch.Tensor, reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ours, fed the same tokens as the oracle (its greedy choices), so one divergence cannot cascade."""
    logits = [decoder.forward(prompt, 0)]
    for step in range(DECODE_STEPS):
        token = reference[step][-1].argmax().view(1)
        logits.append(decoder.forward(token, PROMPT_TOKENS + step))
    return logits


def assert_matches_transformers(path, vocab_size):
    prompt = torch.randint(0, vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(7))
    reference = oracle_logits(path, prompt)
    ours = our_logits(make_decoder(path), prompt, reference)
    assert [o.shape for o in ours] == [r.shape for r in reference]
    assert all(o.dtype == torch.float32 for o in ours)
    worst = max((o - r).abs().max().item() for o, r in zip(ours, reference))
    assert worst < 1e-4, worst
    return reference


SHAPES = {
    "default-gqa": dict(),
    "odd-sizes": dict(hidden=72, intermediate=40, heads=6, kv_heads=2, experts=5, layers=3, vocab=101),
    "mha-4-experts-window": dict(kv_heads=4, experts=4, sliding_window=8),
    "fused-tied-6-experts": dict(experts=6, fused=True, tie=True, kv_heads=1, seed=5),
    "top3-of-7-window-gqa": dict(experts=7, top_k=3, heads=8, kv_heads=2, sliding_window=5, seed=2),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_transformers_on_tiny_random_checkpoints(tmp_path, shape):
    kwargs = SHAPES[shape]
    assert_matches_transformers(make_tiny_mixtral(tmp_path / "m", **kwargs), kwargs.get("vocab", 128))


def test_matches_transformers_on_the_trained_model(trained_model_dir):
    reference = assert_matches_transformers(trained_model_dir, 32000)
    assert reference[0].abs().max() > 5  # real logits, not near-uniform noise


def test_sliding_window_changes_the_logits(tmp_path):
    """The windowed cases above would pass with the window ignored if it never bit; show that it does."""
    path = make_tiny_mixtral(tmp_path / "m", sliding_window=8)
    prompt = torch.arange(20) % 128
    windowed = make_decoder(path).forward(prompt, 0)
    full = make_decoder(path, sliding_window=None).forward(prompt, 0)
    torch.testing.assert_close(windowed[:8], full[:8], rtol=0, atol=1e-5)
    assert (windowed[8:] - full[8:]).abs().max() > 1e-2


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_in_chunks_equals_prefill_at_once(tiny_model_dir, tmp_path, window):
    path = tiny_model_dir if window is None else make_tiny_mixtral(tmp_path / "m", sliding_window=window)
    prompt = (torch.arange(30) * 7) % 128
    at_once = make_decoder(path).forward(prompt, 0)
    decoder = make_decoder(path)
    chunks = [decoder.forward(prompt[:11], 0), decoder.forward(prompt[11:12], 11), decoder.forward(prompt[12:], 12)]
    torch.testing.assert_close(torch.cat(chunks), at_once, rtol=0, atol=2e-5)
    last = make_decoder(path).forward(prompt, 0, last_only=True)
    torch.testing.assert_close(last, at_once[-1:], rtol=0, atol=1e-5)
    # what the planner counts for the KV cache is what the decoder allocates
    assert decoder.k_cache.nbytes + decoder.v_cache.nbytes == decoder.config.kv_cache_bytes(64, torch.float32)


def test_moe_gets_h_mid_and_layer_done_gets_each_layer_output(tiny_model_dir):
    decoder = make_decoder(tiny_model_dir)
    decoder.forward(torch.tensor([5, 6, 7]), 0)
    seen = decoder.moe.seen
    assert [(kind, layer) for kind, layer, _ in seen] == [("moe", 0), ("done", 0), ("moe", 1), ("done", 1)]

    hf = hf_model(tiny_model_dir)
    attention_out = {}
    for layer, block in enumerate(hf.model.layers):
        block.self_attn.register_forward_hook(lambda m, args, out, layer=layer: attention_out.update({layer: out[0]}))
    with torch.no_grad():
        hidden = hf(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states  # inputs of each layer
    for layer in range(2):
        h_mid = hidden[layer][0] + attention_out[layer][0]  # the residual after attention
        torch.testing.assert_close(seen[2 * layer][2], h_mid, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[1][2], hidden[1][0], rtol=0, atol=1e-5)  # layer 0's output


def test_a_moe_without_layer_done_is_fine(tiny_model_dir):
    checkpoint = open_hf(tiny_model_dir)
    reference = DenseMoE(checkpoint)
    decoder = Decoder(checkpoint.model_config, checkpoint.resident(), reference.__call__, max_seq_len=8)
    assert decoder.layer_done is None
    assert decoder.forward(torch.tensor([1, 2]), 0).shape == (2, 128)


def test_context_overflow_is_a_user_error(tiny_model_dir):
    decoder = make_decoder(tiny_model_dir, max_seq_len=16)
    decoder.forward(torch.arange(10), 0)
    with pytest.raises(MoEOffloadError) as error:
        decoder.forward(torch.arange(7), 10)
    assert str(error.value) == (
        "7 tokens at position 10 need a context of 17, but it holds 16; shorten the prompt or raise max_seq_len"
    )
    with pytest.raises(MoEOffloadError, match=r"^no tokens to run; give at least one$"):
        decoder.forward(torch.arange(0), 10)


def test_missing_or_misshapen_tensor_is_a_user_error(tiny_model_dir):
    checkpoint = open_hf(tiny_model_dir)
    weights = checkpoint.resident()
    config = checkpoint.model_config
    with pytest.raises(MoEOffloadError) as error:
        Decoder(config, {k: v for k, v in weights.items() if k != "layers.1.v_proj"}, None)
    assert str(error.value) == "the checkpoint has no tensor 'layers.1.v_proj'; it is incomplete, re-download it"
    with pytest.raises(MoEOffloadError) as error:
        Decoder(config, {**weights, "layers.0.q_proj": weights["layers.0.q_proj"][:32]}, None)
    assert str(error.value) == (
        "tensor 'layers.0.q_proj' has shape (32, 64) but config.json implies (64, 64); "
        "the checkpoint and its config.json do not belong together"
    )


def test_router_and_post_norm_accessors(tiny_model_dir):
    checkpoint = open_hf(tiny_model_dir)
    decoder = make_decoder(tiny_model_dir)
    assert torch.equal(decoder.router(1), checkpoint.get_ours("layers.1.router"))
    assert torch.equal(decoder.post_norm(0), checkpoint.get_ours("layers.0.post_norm"))
    assert decoder.eps == 1e-5 and decoder.k_cache.shape == (2, 2, 64, 16)


def test_which_spans_repeat_the_key_heads(tiny_model_dir, monkeypatch):
    # CUDA's SDPA takes grouped heads in flash (no mask) and math only; the CPU's fused kernel in every case
    config = open_hf(tiny_model_dir).model_config
    assert config.num_heads != config.num_kv_heads
    assert repeat_kv_policy(config, torch.device("cpu"), torch.float32) is None
    for flash, policy in ((True, "masked"), (False, "always")):  # an H100 in bfloat16; a T4, or float32
        monkeypatch.setattr(decoder_module, "_flash_serves", lambda config, device, dtype, flash=flash: flash)
        assert repeat_kv_policy(config, torch.device("cuda"), torch.bfloat16) == policy
    ungrouped = dataclasses.replace(config, num_kv_heads=config.num_heads)
    assert repeat_kv_policy(ungrouped, torch.device("cuda"), torch.bfloat16) is None
