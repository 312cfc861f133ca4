"""What a prefill holds in memory: the workspace it fills, its activations, and what the planner keeps for them.

The chunked prefill's logits against transformers are in test_offload_oracle.py.
"""

import pytest
import torch

import offload
from benchmarks.prefill_memory import live_peak
from offload import api, synth
from offload.synth import synthesize
from quant.linear import workspace_bytes

# bfloat16 on the CPU stands for CUDA, whose prefill dequantizes the experts: the CPU's own kernel, which serves
# bfloat16 too, keeps float32 buffers that are the CPU's, not the GPU's, so these runs go without it
DEQUANTIZING = {"device": "cpu", "dtype": "bfloat16", "fused_gemv": False}


@pytest.fixture(scope="module")
def small_one_layer(tmp_path_factory):
    """mixtral-small's width (hidden 1024, intermediate 3584) in one layer, 2-bit experts, 4-bit attention."""
    return synthesize(tmp_path_factory.mktemp("prefill") / "small", "mixtral-small", layers=1)


def buffer_bytes(workspace) -> int:
    return sum(buffer.nbytes for buffer in workspace._buffers.values())


def test_workspace_bytes_counts_what_a_prefill_dequantizes(small_one_layer):
    model = offload.load(str(small_one_layer), **DEQUANTIZING)
    model.reset()
    model.forward(torch.arange(64), 0, last_only=True)
    attention = [w for w in model.decoder.weights.values() if isinstance(w, api.Quantized)]
    experts = model.prepared.expert_format.meta_weights().values()
    assert buffer_bytes(model.decoder.workspace) == workspace_bytes(attention, torch.bfloat16, "cpu") > 0
    assert buffer_bytes(model.moe.workspace) == workspace_bytes(experts, torch.bfloat16, "cpu") > 0


def test_the_experts_workspace_holds_a_tile_not_a_weight():
    """2-bit Mixtral-8x7B (w1, w3 [14336, 4096], w2 [4096, 14336], g16, 8-bit meta in groups of 128): a
    tile's dequantized weights and its codes, one buffer for all three, and the tile's rows of the meta."""
    experts = synth.synthetic_format(synth.preset_config("mixtral-8x7b"), "2").meta_weights().values()
    groups = 14336 * 4096 // 16

    def meta(tile_rows: int) -> int:
        """Per scale and per zero: a tile's grid rows of it, and its own meta's scale and zero, whole."""
        return 2 * (tile_rows + 2 * groups // 128)

    # CUDA, bfloat16: a tile is one bit slot, w1's 3584 rows or w2's 1024 (14.7M weights, 917,504 grid rows);
    # was 191 MB whole, and 58,949,632 B with the meta whole
    tile = 3584 * 4096
    assert workspace_bytes(experts, torch.bfloat16, "cuda") == tile * (2 + 1) + meta(tile // 16) * 2 == 47_939_584
    # CPU, float32: 2M weights a tile, which stays in cache; was 40,304,640 B with the meta whole
    tile = 2**21
    assert workspace_bytes(experts, torch.float32, "cpu") == tile * (4 + 1) + meta(tile // 16) * 4 == 11_993_088


def test_prefill_activations_stay_under_their_bound_and_shrink_with_the_chunk(small_one_layer):
    tokens, peaks = 512, {}
    for chunk in (64, 512):
        model = offload.load(str(small_one_layer), **DEQUANTIZING, prefill_chunk=chunk)
        model.forward(torch.arange(16), 0, last_only=True)  # the workspace, which prefill_bytes leaves out
        ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
        model.reset()
        peaks[chunk] = live_peak(lambda model=model, ids=ids: model.forward(ids, 0, last_only=True))
        assert peaks[chunk] <= model.config.prefill_bytes(tokens, chunk, torch.bfloat16), chunk
    # the bound is near: with 8 experts and 2 a token, each expert gets ~128 of the 512 tokens, so every
    # chunk of 64 is full, as the bound has them (the bound must hold if one expert gets them all)
    assert model.config.prefill_bytes(tokens, 64, torch.bfloat16) < 1.5 * peaks[64]
    # 4.2 MiB in chunks of 64 (the stream of 512 tokens is 3 MiB of it) against 8 MiB with the experts'
    # tokens all at once
    assert peaks[64] < 0.75 * peaks[512]


def test_the_plan_keeps_the_prefill_of_the_whole_context(small_one_layer, monkeypatch):
    asked = {}
    real_plan_memory = api.plan_memory

    def plan_memory(**kwargs):
        asked.update(kwargs)
        return real_plan_memory(**kwargs)

    monkeypatch.setattr(api, "plan_memory", plan_memory)
    prepared = api.prepare(str(small_one_layer), device="cpu", dtype="bfloat16", max_seq_len=2048, prefill_chunk=256)
    config, expert_format = prepared.config, prepared.expert_format
    experts = expert_format.meta_weights().values()
    attention = [w for w in prepared.resident.values() if isinstance(w, api.Quantized)]
    expected = (
        config.prefill_bytes(2048, 256, torch.bfloat16)
        + workspace_bytes(attention, torch.bfloat16, "cpu")
        + workspace_bytes([w for w in experts if isinstance(w, api.Quantized)], torch.bfloat16, "cpu")
    )
    assert asked["reserve_bytes"] == expected
    # on CUDA a masked span also repeats the key heads [H, T, S] twice and makes its mask a bias [c, T]
    on_cuda = api.prefill_reserve(config, prepared.resident, expert_format, 2048, 256, torch.bfloat16,
                                  torch.device("cuda"))  # fmt: skip
    repeated = config.prefill_bytes(2048, 256, torch.bfloat16, repeat_kv=True)
    assert on_cuda - expected == repeated - config.prefill_bytes(2048, 256, torch.bfloat16) > 0


def test_a_chunk_below_one_is_refused(small_one_layer):
    with pytest.raises(offload.MoEOffloadError, match=r"^--prefill-chunk must be at least 1, got 0$"):
        offload.load(str(small_one_layer), device="cpu", prefill_chunk=0)


def test_synth_counts_the_reserve_the_runtime_keeps(small_one_layer):
    # planned_slots.py plans synthetic Mixtral-8x7B without writing it: the same reserve as the runtime's
    # for the written model (one layer or eight: the workspace is per shape, the activations per layer)
    prepared = api.prepare(str(small_one_layer), device="cpu", dtype="bfloat16")
    on_cuda = api.prefill_reserve(prepared.config, prepared.resident, prepared.expert_format, 4096, 1024,
                                  torch.bfloat16, torch.device("cuda"))  # fmt: skip
    assert synth.prefill_reserve("mixtral-small", 4096) == on_cuda
