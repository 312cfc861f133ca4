"""The runtime against transformers' own MixtralForCausalLM, through load(), at every cache size.

Unquantized float32 checkpoints written by save_pretrained in the hub's layout: our logits for a
prefill and 16 decode steps match within 1e-4 whatever the slots (1 .. experts) and with prefetch on
or off, and greedy generation gives transformers' tokens.
"""

import pytest
import torch

import offload
from offload import api
from quant import cpu_gemv
from quant.linear import weight_nbytes
from tests.tiny import hf_model, make_tiny_mixtral

SHAPES = {
    "gqa-8x2": dict(seed=0),
    "odd-4x2": dict(hidden=72, intermediate=40, heads=6, kv_heads=2, experts=4, layers=3, seed=1),
    "mqa-6x2-window": dict(hidden=48, intermediate=56, heads=4, kv_heads=1, experts=6, sliding_window=6, seed=2),
    "tied-5x2": dict(hidden=32, intermediate=48, heads=2, kv_heads=2, experts=5, tie=True, seed=3),
}
PROMPT, DECODE = 7, 16


class Recorder:
    """Collects what the runtime asked the cache for, as `moe-offload trace` would write it."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, **row) -> None:
        self.rows.append(row)


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    shape = SHAPES[request.param]
    path = make_tiny_mixtral(tmp_path_factory.mktemp(request.param), **shape)
    generator = torch.Generator().manual_seed(shape["seed"])
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=generator)
    with torch.no_grad():
        expected = hf_model(path)(tokens[None]).logits[0]  # [P + 16, V]: a prefix's logits don't see the future
    return path, shape, tokens, expected


def run_teacher_forced(model, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill PROMPT tokens, then feed the rest one at a time; logits at every position."""
    model.reset()
    logits = [model.forward(tokens[:PROMPT], 0)]
    for pos in range(PROMPT, PROMPT + DECODE):
        logits.append(model.forward(tokens[pos : pos + 1], pos))
    return torch.cat(logits)


@pytest.mark.parametrize("prefetch", ["none", "both"])
def test_logits_match_transformers_at_every_slot_count(case, prefetch):
    path, shape, tokens, expected = case
    experts = shape.get("experts", 8)
    for slots in [None, *range(1, experts + 1)] if prefetch == "none" else range(1, experts + 1):  # in place: none
        model = offload.load(str(path), device="cpu", slots=slots, prefetch=prefetch)
        recorder = Recorder()
        model.record_trace(recorder)
        got = run_teacher_forced(model, tokens)
        error = (got - expected).abs().max().item()
        assert error < 1e-4, f"slots={slots} prefetch={prefetch}: max |logit diff| {error:.2e}"
        total = model.stats.total
        layers = model.config.num_layers
        top_k = model.config.top_k
        assert total.hits + total.misses == total.requests
        decode_requests = layers * DECODE * top_k
        assert total.requests >= decode_requests  # the prefill adds one request per layer
        assert len(recorder.rows) == layers * (1 + DECODE)  # one prefill request and 16 decode ones per layer
        if slots == experts and prefetch == "none":
            # a slot for every expert: each is loaded once, on its first use, and never evicted
            for layer, stats in enumerate(model.stats.cache.per_layer):
                used = {e for row in recorder.rows if row["layer"] == layer for e in row["experts"]}
                assert stats.misses == len(used), f"layer {layer}"
            assert total.h2d_bytes == total.misses * model.cache.expert_bytes
        if slots is None:
            assert (total.misses, total.h2d_bytes) == (0, 0)


def test_exclusive_mode_matches_transformers(case):
    path, shape, tokens, expected = case
    model = offload.load(str(path), device="cpu", slots=2, cache_mode="exclusive")
    assert model.plan.mode == "exclusive"
    got = run_teacher_forced(model, tokens)
    assert (got - expected).abs().max().item() < 1e-4
    total = model.stats.total
    assert total.d2h_bytes == total.h2d_bytes > 0


def test_greedy_generation_matches_transformers_generate(case):
    path, shape, tokens, expected = case
    prompt = tokens[:PROMPT]
    reference = (
        hf_model(path)
        .generate(
            prompt[None], attention_mask=torch.ones(1, PROMPT, dtype=torch.long), do_sample=False, max_new_tokens=20
        )[0, PROMPT:]
        .tolist()
    )
    if 2 in reference:  # transformers keeps the eos it stopped on; we report it as the stop reason
        reference = reference[: reference.index(2)]
    for slots in (None, 1, 3):
        model = offload.load(str(path), device="cpu", slots=slots)
        result = model.generate(prompt.tolist(), max_new_tokens=20, temperature=0)
        assert result.token_ids == reference, f"slots={slots}"


@pytest.mark.parametrize("repeat_kv", [None, "masked", "always"])
def test_a_prefill_in_chunks_matches_transformers(case, repeat_kv):
    # spans of 2 queries (the last of the prompt's 7 alone), experts 2 tokens at a time, and a second
    # prefill of the 16 other tokens after the first 7, as a chat turn: every span after the first is
    # masked, and the window case's mask drops keys. repeat_kv: the key heads repeated as CUDA does
    # (offload.decoder.repeat_kv_policy)
    path, shape, tokens, expected = case
    for slots in (None, 2):
        model = offload.load(str(path), device="cpu", slots=slots, prefetch="none", prefill_chunk=2)
        assert (model.decoder.prefill_chunk, model.moe.prefill_chunk) == (2, 2)
        model.decoder.repeat_kv = repeat_kv
        recorder = Recorder()
        model.record_trace(recorder)
        model.reset()
        got = torch.cat([model.forward(tokens[:PROMPT], 0), model.forward(tokens[PROMPT:], PROMPT)])
        assert (got - expected).abs().max().item() < 1e-4, f"slots={slots}"
        # a layer asks the cache for its experts once per prefill, whatever the chunks
        assert len(recorder.rows) == 2 * model.config.num_layers


@pytest.mark.parametrize("hidden", [64, 48])
def test_a_bfloat16_checkpoint_keeps_its_tables_narrow_on_the_cpu(tmp_path, hidden, monkeypatch):
    """On the CPU in float32, a bfloat16 checkpoint's embedding and lm_head stay bfloat16, widened as they are
    read: the logits still match transformers' float32 model of the same files. hidden 64: the lm_head through
    the C kernel at the prefill and each decode step; 48 (not a multiple of 64): widened a tile at a time."""
    path = make_tiny_mixtral(tmp_path / "m", hidden=hidden, heads=4, kv_heads=2, seed=4, dtype=torch.bfloat16)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf_model(path)(tokens[None]).logits[0]
    calls = []
    wide = cpu_gemv.multiply_wide
    monkeypatch.setattr(cpu_gemv, "multiply_wide", lambda *args: calls.append(args[0].shape) or wide(*args))
    for slots in (None, 2):
        model = offload.load(str(path), device="cpu", slots=slots)
        weights = model.decoder.weights
        assert weights["embed"].dtype == weights["lm_head"].dtype == torch.bfloat16
        assert weights["norm"].dtype == weights["layers.0.router"].dtype == torch.float32
        assert (run_teacher_forced(model, tokens) - expected).abs().max().item() < 1e-4
    served = [(PROMPT, 64)] + [(1, 64)] * DECODE  # the prompt's 7 tokens too (MAX_TOKENS 8), then each step
    assert calls == (2 * served if hidden == 64 and cpu_gemv.available() else [])


@pytest.mark.parametrize("attn_bits", ["none", "4"])
def test_the_plan_counts_resident_weights_as_load_holds_them(tmp_path, attn_bits, monkeypatch):
    """A bfloat16 checkpoint on the CPU in float32: norms and routers widened, the tables kept narrow, attention
    as stored where it is quantized. The planner's resident bytes are what load() holds; they were the files'
    bytes, which undercount every widened weight."""
    path = make_tiny_mixtral(tmp_path / "m", hidden=64, heads=4, kv_heads=2, seed=4, dtype=torch.bfloat16)
    asked = []
    plan_memory = api.plan_memory
    monkeypatch.setattr(api, "plan_memory", lambda **kwargs: asked.append(kwargs) or plan_memory(**kwargs))
    model = offload.load(str(path), device="cpu", slots=2, attn_bits=attn_bits)
    held = sum(weight_nbytes(w) for w in model.decoder.weights.values())
    assert [kwargs["resident_bytes"] for kwargs in asked] == [held]
