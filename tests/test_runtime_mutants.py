"""Exact runtime behaviour the other runtime tests leave open: the MoE block's prefill weights and trace
phases, the prefetcher's guesses and checks, generation's counts and messages, the decoder's limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import offload
from offload import embedding
from offload.checkpoint import open_hf
from offload.decoder import Decoder, ModelConfig
from offload.families.mixtral import route
from offload.generate import (
    GenerationResult,
    SamplingConfig,
    Timing,
    generate,
    generate_text,
    sample,
    sampling_probs,
)
from offload.graphs import DecodeGraphs
from offload.norm import rms_norm
from offload.prefetch import Prefetcher
from offload.tokenizer import load_tokenizer
from quant.errors import MoEOffloadError
from tests.test_offload_oracle import Recorder
from tests.tiny import hf_model, make_tiny_mixtral

SHAPE = dict(hidden=32, intermediate=48, heads=4, kv_heads=2, experts=4, layers=3, max_pos=512, seed=11)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("runtime-mutants") / "model", **SHAPE)


@pytest.fixture(scope="module")
def oracle(tiny):
    """transformers' logits for one fixed 9-token sequence [9, V]."""
    tokens = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return tokens, hf_model(tiny)(tokens[None]).logits[0]


# -- the MoE block -----------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [None, 2])
def test_a_prefill_weighs_each_expert_by_its_own_gate_weight(tiny, oracle, slots):
    """In a prefill, each token's second expert is scaled by its own gate weight, not the first's; with
    last_only, the logits are the last position's."""
    tokens, expected = oracle
    model = offload.load(str(tiny), device="cpu", slots=slots)
    got = model.forward(tokens, 0)
    assert (got - expected).abs().max().item() < 1e-4
    last = model.forward(tokens, 0, last_only=True)  # as a prefill in generate asks: the last position alone
    assert last.shape == (1, 128) and (last - expected[-1:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunk", [1, 4])
def test_a_prefill_in_spans_of_prefill_chunk_matches_transformers(tiny, oracle, chunk):
    """A prompt longer than prefill_chunk runs a layer's attention a span at a time, each span's queries
    masked at their own positions, and each expert a chunk of its tokens at a time."""
    tokens, expected = oracle
    model = offload.load(str(tiny), device="cpu", slots=2, prefill_chunk=chunk)
    model.reset()
    got = torch.cat([model.forward(tokens[:7], 0), model.forward(tokens[7:], 7)])
    assert (got - expected).abs().max().item() < 1e-4


def test_a_two_token_prefill_is_traced_as_prefill(tiny):
    """Every forward of more than one token is a prefill in the trace, a 2-token one too."""
    model = offload.load(str(tiny), device="cpu", slots=2)
    recorder = Recorder()
    model.record_trace(recorder)
    model.reset()
    model.forward(torch.tensor([5, 6]), 0)
    model.forward(torch.tensor([7]), 2)
    assert [row["phase"] for row in recorder.rows] == ["prefill"] * 3 + ["decode"] * 3


# -- the prefetcher ----------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["early", "late"])
def test_a_prefill_prefetches_nothing_a_decode_step_does(tiny, when):
    """Guesses are made for single-token decode steps only: a prefill's routing is all of its tokens'."""
    model = offload.load(str(tiny), device="cpu", slots=2, prefetch=when)
    model.reset()
    model.forward(torch.tensor([5, 6, 7]), 0)
    assert model.stats.total.prefetches_issued == 0
    model.forward(torch.tensor([8]), 3)
    assert model.stats.total.prefetches_issued > 0


# -- the static decode path --------------------------------------------------------------------------


def test_the_static_step_at_position_256_sees_its_own_key(tiny):
    """A step at position 256 attends over 257 keys: the key range is that of the context with the new token
    (512), not of the context before it (256), or the token's own key falls outside it."""
    tokens = torch.randint(3, 128, (258,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(tiny)(tokens[None]).logits[0, 256:]
    model = offload.load(str(tiny), device="cpu", slots=2, max_seq_len=512)
    model.decoder.graphs = DecodeGraphs(capture=False)
    model.reset()
    model.forward(tokens[:256], 0)
    got = torch.cat([model.forward(tokens[pos : pos + 1], pos) for pos in (256, 257)])
    assert (got - expected).abs().max().item() < 1e-4


# -- generation --------------------------------------------------------------------------------------


class Scripted:
    """A LanguageModel whose greedy choice at position p is script[p]; it records each forward."""

    def __init__(self, script: list[int], max_seq_len: int = 64, vocab: int = 16) -> None:
        self.script, self.max_seq_len, self.vocab = script, max_seq_len, vocab
        self.calls: list[tuple[int, int]] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def forward(self, input_ids, start_pos, *, last_only=False):
        self.calls.append((input_ids.shape[0], start_pos))
        end = start_pos + input_ids.shape[0]
        logits = torch.nn.functional.one_hot(torch.tensor(self.script[start_pos + 1 : end + 1]), self.vocab).float()
        return logits[-1:] if last_only else logits


GREEDY = SamplingConfig(max_new_tokens=8, temperature=0)


def test_a_prompt_wholly_cached_is_refused_with_its_counts():
    """`cached` must leave a token to prefill; the error says how many were cached of how many."""
    with pytest.raises(ValueError) as error:
        generate(Scripted(list(range(16))), [1, 2, 3], GREEDY, set(), cached=3)
    assert str(error.value) == "cached must leave at least one prompt token to prefill: 3 of 3"


def test_a_cached_prompt_keeps_the_cache_and_counts_only_the_rest():
    """A conversation going on: no reset, the prefill starts at `cached`, and counts only what it ran."""
    model = Scripted(list(range(16)))
    result = generate(model, [0, 1, 2, 3, 4], SamplingConfig(max_new_tokens=3, temperature=0), set(), cached=3)
    assert model.resets == 0 and model.calls == [(2, 3), (1, 5), (1, 6)]
    assert (result.token_ids, result.prefill_tokens, result.decode_tokens) == ([5, 6, 7], 2, 2)


def test_should_stop_ends_with_reason_stopped_between_steps():
    """should_stop() is asked before each decode step: True ends generation there, reason "stopped"."""
    asked = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) == 3

    model = Scripted(list(range(16)))
    result = generate(model, [0, 1], GREEDY, set(), should_stop=should_stop)
    assert (result.token_ids, result.stop_reason, result.stop_token_id) == ([2, 3, 4], "stopped", None)
    assert result.decode_tokens == 2 and len(model.calls) == 3


def test_a_stop_id_counts_as_a_decode_step():
    """The step that sampled the stop id is a decode forward: decode_tokens counts it."""
    model = Scripted(list(range(16)))
    result = generate(model, [0, 1], GREEDY, {5})
    assert (result.token_ids, result.stop_token_id, result.decode_tokens) == ([2, 3, 4], 5, 3)


def test_timings_add_up_and_round_to_microseconds():
    """Timing.add sums each field into its own; to_dict rounds seconds to 6 places and rates to 3."""
    total = Timing()
    total.add(GenerationResult([1], None, 4, 2, 0.25, 0.5, "length"))
    total.add(Timing(3, 1, 0.125, 0.0625))
    assert (total.prefill_tokens, total.decode_tokens, total.prefill_s, total.decode_s) == (7, 3, 0.375, 0.5625)
    assert Timing(3, 7, 0.1234567, 0.7654321).to_dict() == {
        "prefill_tokens": 3, "decode_tokens": 7, "prefill_s": 0.123457, "decode_s": 0.765432,
        "prefill_tokens_per_s": 24.3, "decode_tokens_per_s": 9.145,
    }  # fmt: skip


# -- the embedding table in host memory --------------------------------------------------------------


def test_rows_that_differ_from_the_table_keep_it_on_the_gpu(monkeypatch):
    """reads_host_memory compares what the kernel read with the table, and says so when they differ."""
    monkeypatch.setattr(embedding, "gather_rows", lambda table, ids: torch.zeros(len(ids), table.shape[1]))
    assert (
        embedding.reads_host_memory.__wrapped__("cpu", torch.float32) == "the rows read in place differ from the table"
    )


# -- the decoder -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_position", "expected"), [(8192, 4096), (512, 512)])
def test_the_default_context_is_the_models_up_to_4096(tiny, max_position, expected):
    """Without max_seq_len the decoder's context is max_position_embeddings, at most 4096."""
    checkpoint = open_hf(tiny)
    config = dataclasses.replace(checkpoint.model_config, max_position=max_position)
    assert Decoder(config, checkpoint.resident(), None).max_seq_len == expected


def test_tokens_that_fill_the_context_exactly_run(tiny):
    """A forward that ends at the context's last position fits; one position more is refused."""
    model = offload.load(str(tiny), device="cpu", max_seq_len=8)
    model.reset()
    assert model.forward(torch.arange(3, 10), 0).shape == (7, 128)
    assert model.forward(torch.tensor([10]), 7).shape == (1, 128)
    with pytest.raises(MoEOffloadError) as error:
        model.forward(torch.tensor([11]), 8)
    assert str(error.value) == (
        "1 tokens at position 8 need a context of 9, but it holds 8; shorten the prompt or raise max_seq_len"
    )


# -- the prefetcher on its own -----------------------------------------------------------------------


class Prefetches:
    """The cache's prefetch() as the prefetcher calls it, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def prefetch(self, layer: int, experts: list[int]) -> None:
        self.calls.append((layer, experts))


def make_prefetcher(when: str = "late", ahead: int = 1, layers: int = 4) -> Prefetcher:
    """Random routers and post-norms of 4 layers, 6 experts, top-2, hidden 8: each layer's differ."""
    generator = torch.Generator().manual_seed(1)
    routers = [torch.randn(6, 8, generator=generator) for _ in range(layers)]
    norms = [torch.randn(8, generator=generator) for _ in range(layers)]
    cache = Prefetches()
    return Prefetcher(routers=routers, post_norms=norms, eps=1e-5, route=route, top_k=2, cache=cache, when=when,
                      ahead=ahead)  # fmt: skip


def test_a_guess_is_the_layers_router_on_its_own_post_norm():
    """guess(layer, h) is what layer `layer`'s MoE block would route h to: its post-attention norm, its router."""
    p = make_prefetcher()
    h = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    for layer in range(4):
        x = rms_norm(h, p.post_norms[layer], p.eps)
        assert p.guess(layer, h) == route(F.linear(x, p.routers[layer]), 2)[0][0].tolist()


def test_start_loads_each_targets_own_guess_nearest_first():
    """start() reads the flat guesses k at a time, one target layer after the other, up to the last layer."""
    p = make_prefetcher(ahead=2)
    assert (p.reach, list(p.targets(0)), list(p.targets(2)), list(p.targets(3))) == (2, [1, 2], [3], [])
    p.start(0, [5.0, 1.0, 3.0, 0.0])
    p.start(2, [4.0, 2.0])
    assert p.cache.calls == [(1, [5, 1]), (2, [3, 0]), (3, [4, 2])]


def test_after_layer_guesses_every_target_of_the_layers_output():
    """The late guess at layer l's output prefetches layers l+1 .. l+ahead, each with its own router."""
    p = make_prefetcher(ahead=2)
    h = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    p.after_layer(1, h)
    p.after_layer(3, h)  # the last layer's output: nothing to guess
    assert p.cache.calls == [(2, p.guess(2, h)), (3, p.guess(3, h))]


@pytest.mark.parametrize(
    ("when", "ahead", "message"),
    [
        ("always", 1, "when must be one of ('early', 'late', 'both'), got 'always'"),
        ("late", 0, "ahead must be 1, or more with a guess at the output (late or both), got 0"),
        ("early", 2, "ahead must be 1, or more with a guess at the output (late or both), got 2"),
    ],
)
def test_the_prefetchers_refusals(when, ahead, message):
    """The prefetcher refuses a place it cannot guess at, and a reach its place cannot have."""
    with pytest.raises(ValueError) as error:
        make_prefetcher(when, ahead)
    assert str(error.value) == message


def test_a_tiny_top_p_keeps_the_likeliest_token_alone():
    """With top_p so small that 1 - top_p rounds to 1 in float32, every cumulative mass is under it: the
    likeliest token must still stay, or the softmax of all -inf is NaN and sampling fails."""
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    config = SamplingConfig(temperature=1.0, top_p=1e-9)
    assert torch.equal(sampling_probs(logits, config), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert sample(logits, config, torch.Generator().manual_seed(0)) == 1


def test_a_token_whose_mass_is_exactly_1_minus_top_p_is_cut_as_transformers_cuts_it():
    """The cut is `mass <= 1 - top_p`, as transformers' TopPLogitsWarper: 0.125 at top_p 0.875 goes."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.tensor([0.125, 0.375, 0.5]).log()  # exact in float32: the masses are 0.125, 0.5, 1
    kept = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.875))
    assert torch.equal(kept, TopPLogitsWarper(0.875)(None, logits[None]).softmax(-1)[0])
    torch.testing.assert_close(kept, torch.tensor([0.0, 3 / 7, 4 / 7]))


def test_both_guesses_early_after_attention_too():
    """`both` makes the early guess (layer l+1 from layer l's attention output) as well as the late one."""
    p = make_prefetcher("both")
    h = torch.randn(1, 8, generator=torch.Generator().manual_seed(4))
    p.after_attention(0, h)
    p.after_attention(3, h)  # the last layer: nothing after it
    p.after_attention(0, h.expand(2, 8))  # a prefill: no guess
    assert p.cache.calls == [(1, p.guess(1, h))]


@pytest.fixture(scope="module")
def tokenizer(trained_model_dir):
    return load_tokenizer(trained_model_dir)


def test_a_reply_on_its_own_skips_special_tokens(tokenizer):
    """A chat reply's text (continue_prompt=False) leaves out special tokens the model wrote, as streamed."""
    ok = tokenizer.convert_tokens_to_ids("\u2581ok")
    bos = tokenizer.bos_token_id
    model = Scripted([bos, ok, bos, ok], vocab=len(tokenizer))
    pieces: list[str] = []
    config = SamplingConfig(max_new_tokens=3, temperature=0)
    result = generate_text(model, tokenizer, [bos], config, set(), pieces.append, continue_prompt=False)
    assert result.token_ids == [ok, bos, ok]
    assert result.text == "".join(pieces) == "ok ok"


def test_a_single_eos_id_in_config_json_is_a_one_id_tuple(tiny):
    """config.json's `eos_token_id: 2` (Mixtral's own) becomes (2,), not no stop id at all."""
    config = open_hf(tiny).model_config.to_dict()
    assert ModelConfig.from_dict({**config, "eos_token_ids": 2}).eos_token_ids == (2,)
    assert ModelConfig.from_dict({**config, "eos_token_ids": [2, 7]}).eos_token_ids == (2, 7)


def test_a_prompt_shorter_than_the_chunk_is_bounded_as_one_chunk_of_its_own_length(tiny):
    """prefill_bytes counts a chunk of at most the prompt's tokens: a 10-token prefill costs the same under a
    chunk of 1024 as under one of 10."""
    config = open_hf(tiny).model_config
    assert config.prefill_bytes(10, 1024, torch.float32) == config.prefill_bytes(10, 10, torch.float32)
    assert config.prefill_bytes(10, 4, torch.float32) < config.prefill_bytes(10, 10, torch.float32)
