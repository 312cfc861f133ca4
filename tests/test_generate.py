"""Generation against transformers' own generate, sampling on logits with known answers, streaming text."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM

from offload.generate import (
    GenerationResult,
    SamplingConfig,
    TextStreamer,
    continuation_text,
    generate,
    generate_text,
    sample,
    sampling_probs,
)
from offload.tokenizer import load_tokenizer, read_generation_config, stop_ids
from quant.errors import MoEOffloadError

PROMPT = [1, 17, 93, 5, 64, 101, 33]


class TransformersAdapter:
    """LanguageModel over a transformers causal LM, with its own DynamicCache as the KV cache."""

    def __init__(self, model: MixtralForCausalLM, max_seq_len: int) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = model.device
        self.calls: list[tuple[int, int]] = []  # (tokens fed, start_pos) per forward
        self.last_only: list[bool] = []  # per forward: asked for the last position's logits alone
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.seen = 0

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        # T = tokens fed, V = vocabulary
        assert input_ids.dim() == 1 and input_ids.dtype == torch.long
        assert input_ids.device == self.device, "generate must feed ids on the model's device"
        assert start_pos == self.seen, f"fed position {start_pos}, but the cache holds {self.seen}"
        tokens = input_ids.shape[0]
        assert start_pos + tokens <= self.max_seq_len, "fed past the context end"
        positions = torch.arange(start_pos, start_pos + tokens, device=self.device)[None]  # [1, T]
        out = self.model(input_ids[None], past_key_values=self.cache, use_cache=True, position_ids=positions)
        self.seen += tokens
        self.calls.append((tokens, start_pos))
        self.last_only.append(last_only)
        logits = out.logits[0].float()  # [T, V]
        return logits[-1:] if last_only else logits


@pytest.fixture(scope="module")
def hf_model() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # wide weights: well separated logits, so argmax ties cannot decide
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return MixtralForCausalLM(config).eval()


def hf_generate(model: MixtralForCausalLM, prompt: list[int], new_tokens: int, eos: int | None, **sampling):
    input_ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
        top_k=0,  # transformers' default is top-k 50; we have no top-k
        **sampling,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate(hf_model):
    expected = hf_generate(hf_model, PROMPT, 20, eos=None, do_sample=False)
    assert len(expected) == 20 and len(set(expected)) > 3  # a real sequence, not one token repeated
    adapter = TransformersAdapter(hf_model, max_seq_len=256)
    streamed: list[int] = []
    result = generate(adapter, PROMPT, SamplingConfig(max_new_tokens=20, temperature=0), set(), streamed.append)
    assert result.token_ids == expected
    assert streamed == expected
    assert result.stop_reason == "length" and result.stop_token_id is None
    assert (result.prefill_tokens, result.decode_tokens) == (7, 19)
    # One prefill of the whole prompt, then one token per step at consecutive positions;
    # the 20th token is sampled but never fed.
    assert adapter.calls == [(7, 0)] + [(1, 7 + i) for i in range(19)]
    assert adapter.last_only == [True] + [False] * 19  # the prefill asks for its last position's logits alone


def test_eos_stops_where_transformers_stops(hf_model):
    full = hf_generate(hf_model, PROMPT, 20, eos=None, do_sample=False)
    # The first id that has not been generated before: transformers stops at its first occurrence.
    stop_at = next(i for i in range(3, 20) if full[i] not in full[:i])
    eos = full[stop_at]
    expected = hf_generate(hf_model, PROMPT, 20, eos=eos, do_sample=False)
    assert expected == full[: stop_at + 1]  # transformers keeps the eos as the last generated id

    adapter = TransformersAdapter(hf_model, max_seq_len=256)
    streamed: list[int] = []
    config = SamplingConfig(max_new_tokens=20, temperature=0)
    result = generate(adapter, PROMPT, config, {eos, 127 if eos != 127 else 126}, streamed.append)
    assert result.token_ids + [result.stop_token_id] == expected
    assert result.stop_reason == "eos" and result.stop_token_id == eos
    assert streamed == result.token_ids  # the stop id is never streamed
    assert result.decode_tokens == stop_at  # the eos was sampled by decode step stop_at
    assert len(adapter.calls) == 1 + stop_at


def test_first_token_eos_gives_empty_result(hf_model):
    first = hf_generate(hf_model, PROMPT, 1, eos=None, do_sample=False)[0]
    adapter = TransformersAdapter(hf_model, max_seq_len=256)
    result = generate(adapter, PROMPT, SamplingConfig(temperature=0), {first})
    assert (result.token_ids, result.stop_token_id, result.stop_reason) == ([], first, "eos")
    assert result.decode_tokens == 0 and adapter.calls == [(7, 0)]


def test_seeded_sampling_equals_transformers_generate(hf_model):
    # Same steps (temperature, then top-p on the logits, softmax, multinomial) and the same seed on a
    # CPU generator: the draws are the same as transformers' under torch.manual_seed.
    torch.manual_seed(1234)
    expected = hf_generate(hf_model, PROMPT, 20, eos=None, do_sample=True, temperature=1.3, top_p=0.8)
    config = SamplingConfig(max_new_tokens=20, temperature=1.3, top_p=0.8, seed=1234)
    ours = generate(TransformersAdapter(hf_model, 256), PROMPT, config, set())
    assert ours.token_ids == expected
    greedy = hf_generate(hf_model, PROMPT, 20, eos=None, do_sample=False)
    assert ours.token_ids != greedy  # the sampler really sampled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generation_on_cuda(hf_model):
    model = copy.deepcopy(hf_model).to("cuda")
    adapter = TransformersAdapter(model, max_seq_len=256)
    config = SamplingConfig(max_new_tokens=20, temperature=0)
    greedy = generate(adapter, PROMPT, config, set(), synchronize=torch.cuda.synchronize)
    assert greedy.token_ids == hf_generate(model, PROMPT, 20, eos=None, do_sample=False)
    assert greedy.prefill_s > 0 and greedy.decode_s > 0
    # A seeded generator on the device: the same seed draws the same tokens, another seed others.
    sampled = [
        generate(adapter, PROMPT, SamplingConfig(max_new_tokens=20, temperature=1.5, top_p=0.95, seed=s), set())
        for s in (3, 3, 4)
    ]
    assert sampled[0].token_ids == sampled[1].token_ids != sampled[2].token_ids


def test_context_end_stops_generation(hf_model):
    adapter = TransformersAdapter(hf_model, max_seq_len=12)
    result = generate(adapter, PROMPT, SamplingConfig(max_new_tokens=20, temperature=0), set())
    # prompt (7) + generated (5) fill the context of 12; the 12th position is never fed
    assert result.token_ids == hf_generate(hf_model, PROMPT, 5, eos=None, do_sample=False)
    assert result.stop_reason == "length" and adapter.seen == 11


def test_prompt_too_long_and_empty(hf_model):
    adapter = TransformersAdapter(hf_model, max_seq_len=7)
    with pytest.raises(MoEOffloadError) as err:
        generate(adapter, PROMPT, SamplingConfig(), set())
    assert str(err.value) == (
        "the prompt is 7 tokens but the context holds 7, which leaves no room for a new token; "
        "shorten it to at most 6 tokens"
    )
    assert adapter.calls == []  # refused before any forward
    # One token shorter fits exactly one new token.
    assert len(generate(adapter, PROMPT[:6], SamplingConfig(temperature=0), set()).token_ids) == 1
    with pytest.raises(MoEOffloadError, match=r"^the prompt is empty; give at least one token of text$"):
        generate(adapter, [], SamplingConfig(), set())


def test_generate_resets_the_cache_between_calls(hf_model):
    adapter = TransformersAdapter(hf_model, max_seq_len=256)
    config = SamplingConfig(max_new_tokens=6, temperature=0)
    first = generate(adapter, PROMPT, config, set())
    second = generate(adapter, PROMPT, config, set())  # the adapter asserts start_pos == cached length
    assert first.token_ids == second.token_ids


# ---- sample() on logits whose answer is known ----


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4, 0.0])
    assert sample(logits, SamplingConfig(temperature=0)) == 1
    assert sample(-logits, SamplingConfig(temperature=0)) == 2


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # top_p 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> {1, 3}
    kept = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # top_p 0.85: needs the 0.15 too -> {1, 3, 2}
    kept = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.85))
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    # top_p 0.4: the likeliest token always stays
    kept = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.4))
    torch.testing.assert_close(kept, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # top_p 1: nothing cut; temperature 2 flattens: probs ** (1/2), renormalized
    flat = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(sampling_probs(logits, SamplingConfig(temperature=2.0, top_p=1.0)), flat)
    # and sample() draws only from the nucleus
    generator = torch.Generator().manual_seed(0)
    config = SamplingConfig(temperature=1.0, top_p=0.75)
    draws = [sample(logits, config, generator) for _ in range(400)]
    assert set(draws) == {1, 3}
    assert 0.5 < draws.count(1) / 400 < 0.75  # 0.625 expected


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_a_vanishing_temperature_samples_the_likeliest_token(temperature):
    """logits / 1e-40 overflows float32 (every score inf, the softmax NaN), and 5e-324 rounds to 0 in it."""
    logits = torch.tensor([0.5, 3.0, -2.0, 2.999])
    probs = sampling_probs(logits, SamplingConfig(temperature=temperature, top_p=1.0))
    assert torch.equal(probs, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert sample(logits, SamplingConfig(temperature=temperature, top_p=0.9), torch.Generator().manual_seed(0)) == 1


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(1000)  # flat: every draw is uniform over 1000 ids
    config = SamplingConfig(temperature=1.0, top_p=1.0)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample(logits, config, generator) for _ in range(16)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # a bad value names the CLI's option (the CLI's values land here), a wrong type the keyword
        ({"temperature": -0.5}, "--temperature must be a number >= 0 (0 = greedy), got -0.5"),
        ({"temperature": math.nan}, "--temperature must be a number >= 0 (0 = greedy), got nan"),
        ({"top_p": 0.0}, "--top-p must be in (0, 1] (1 = no nucleus cut), got 0.0"),
        ({"top_p": 1.5}, "--top-p must be in (0, 1] (1 = no nucleus cut), got 1.5"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
        ({"seed": -1}, "--seed must be a whole number from 0 to 2**63 - 1, got -1"),
        ({"seed": 2**63}, f"--seed must be a whole number from 0 to 2**63 - 1, got {2**63}"),
        ({"seed": 1.5}, "seed must be a whole number or None, got 1.5"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be a whole number, got 2.0"),
        ({"max_new_tokens": True}, "max_new_tokens must be a whole number, got True"),
        ({"temperature": True}, "temperature must be a number, got True"),  # was taken as 1.0
        ({"top_p": "0.5"}, "top_p must be a number, got '0.5'"),
    ],
)
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(MoEOffloadError) as err:
        SamplingConfig(**kwargs)
    assert str(err.value) == message


def test_numpy_numbers_are_taken():
    """As load's options take them: they were refused as not whole numbers."""
    import numpy as np

    config = SamplingConfig(
        max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_p=np.float64(1), seed=np.int64(7)
    )
    assert config == SamplingConfig(max_new_tokens=3, temperature=0.5, top_p=1.0, seed=7)
    assert type(config.max_new_tokens) is int and type(config.temperature) is float


def test_result_rates():
    result = GenerationResult([5, 6], None, 8, 1, 0.5, 0.25, "length")
    assert (result.prefill_tokens_per_s, result.decode_tokens_per_s) == (16.0, 4.0)
    assert GenerationResult([], None, 8, 0, 0.5, 0.0, "eos", 2).decode_tokens_per_s == 0.0


# ---- TextStreamer on the real Mistral tokenizer ----

STREAM_TEXTS = [
    "héllo 🙂 naïve 🐍 — 日本語 ∑ x² ✓",
    "def f(x):\n    return {'a': 1}  # ünïcödé 🐍🐍\n\n\tdone",
    "🙂🙂🙂 a🙂b  🇫🇷  €100",
]


@pytest.fixture(scope="module")
def mistral_tokenizer(trained_model_dir):
    return load_tokenizer(trained_model_dir)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamed_pieces_concatenate_to_the_decode(mistral_tokenizer, text):
    ids = mistral_tokenizer.encode(text, add_special_tokens=False) + [mistral_tokenizer.eos_token_id]
    byte_tokens = [i for i in ids if mistral_tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_tokens) >= 4  # a 4-byte character spelled as byte-fallback tokens
    streamer = TextStreamer(mistral_tokenizer)
    pieces = [streamer.push(i) for i in ids]
    pieces.append(streamer.flush())
    assert "".join(pieces) == mistral_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > len(ids) // 3  # it streams, not one lump at the end


def test_streamer_holds_back_an_incomplete_character_until_flush(mistral_tokenizer):
    """A character spelled in byte tokens (4 for U+1D11E; 🙂 is one token of its own) is held back while
    incomplete; flush() gives what is held, replacement characters and all, as the whole decode does."""
    ids = mistral_tokenizer.encode("ok \U0001d11e", add_special_tokens=False)
    assert mistral_tokenizer.convert_ids_to_tokens(ids[-4:]) == ["<0xF0>", "<0x9D>", "<0x84>", "<0x9E>"]
    streamer = TextStreamer(mistral_tokenizer)
    assert "".join(streamer.push(i) for i in ids[:-1]) == "ok "  # the last byte never arrives
    assert streamer.flush() == mistral_tokenizer.decode(ids[:-1])[len("ok ") :] == "\ufffd" * 3
    assert streamer.flush() == ""


def test_streamer_continues_the_prompt_with_exact_spacing(mistral_tokenizer):
    ids = mistral_tokenizer.encode("def f(x):\n    return 'é🐍'\n")
    split = ids.index(mistral_tokenizer.convert_tokens_to_ids("<0x0A>")) + 1
    prompt, new = ids[:split], ids[split:]
    assert mistral_tokenizer.decode(prompt, skip_special_tokens=True) == "def f(x):\n"

    with_prompt = TextStreamer(mistral_tokenizer, prompt)
    pieces = [with_prompt.push(i) for i in new] + [with_prompt.flush()]
    assert "".join(pieces) == continuation_text(mistral_tokenizer, prompt, new) == "    return 'é🐍'\n"
    assert not any("\ufffd" in piece for piece in pieces)
    # On its own, SentencePiece drops the first token's leading space: 3 spaces, as a chat reply shows.
    alone = TextStreamer(mistral_tokenizer)
    pieces = [alone.push(i) for i in new] + [alone.flush()]
    assert "".join(pieces) == mistral_tokenizer.decode(new) == "   return 'é🐍'\n"


def test_generate_text_on_the_trained_model(trained_model_dir, mistral_tokenizer):
    # The trained model's README: greedy output for this prompt begins with a docstring line.
    model = MixtralForCausalLM.from_pretrained(trained_model_dir, dtype=torch.float32).eval()
    adapter = TransformersAdapter(model, max_seq_len=1024)
    prompt = mistral_tokenizer.encode("def fibonacci(n):\n")
    stops = stop_ids(mistral_tokenizer, read_generation_config(trained_model_dir))
    config = SamplingConfig(max_new_tokens=14, temperature=0)
    pieces: list[str] = []
    result = generate_text(adapter, mistral_tokenizer, prompt, config, stops, pieces.append)
    assert result.text.startswith('    """Return a list of the current file.')
    assert "".join(pieces) == result.text
    assert (result.stop_reason, len(result.token_ids), result.prefill_tokens) == ("length", 14, len(prompt))

    reply = generate_text(adapter, mistral_tokenizer, prompt, config, stops, continue_prompt=False)
    assert reply.token_ids == result.token_ids
    assert reply.text == result.text[1:]  # on its own, the leading space of the first token goes
