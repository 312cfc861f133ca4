"""Generation: prefill, decode one token at a time, sample, stop, and stream text.

Four small functions in the manner of gpt-fast: `prefill` runs the prompt and samples the first new
token, `decode_one_token` feeds one token and samples the next, `decode_n_tokens` loops it until a
stop id or a budget, and `generate` ties them together with the timing. The model is anything that
implements `LanguageModel`. Text lives at the edges: `TextStreamer` turns ids into printable pieces,
and `generate_text` wires it to `generate`.

Stop semantics: a sampled stop id ends generation and is NOT part of `GenerationResult.token_ids`
(it is reported in `stop_token_id`). transformers' `generate` appends it to its output instead, so
ours + [stop_token_id] equals its generated ids. The last sampled token is never fed to the model,
as in transformers, so N new tokens cost one prefill and N - 1 decode forwards.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from quant.errors import MoEOffloadError, whole_number


class LanguageModel(Protocol):
    """What generation drives: one sequence, a KV cache it owns, logits for the positions it is fed.

    An optional `device` attribute says where input ids go (the CPU when absent).
    """

    max_seq_len: int  # the context size: prompt plus generated tokens never exceed it

    def reset(self) -> None:
        """Empty the KV cache."""

    def forward(self, input_ids: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """input_ids LongTensor [T] at positions start_pos..start_pos+T-1 -> float32 logits [T, V], or
        the last position's alone [1, V] with `last_only` (a prefill samples from no other)."""


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256  # an upper bound; the context end may stop generation earlier
    temperature: float = 0.7  # 0 means greedy (argmax); higher flattens the distribution
    top_p: float = 0.9  # nucleus: sample only from the smallest set of tokens whose mass reaches top_p
    seed: int | None = None  # None draws a fresh seed; an int makes sampling repeatable

    def __post_init__(self) -> None:
        # numpy's numbers are taken as Python's (a count or a seed must be whole; True is no number here)
        for name, kind, cast in (("max_new_tokens", numbers.Integral, int), ("seed", numbers.Integral, int),
                                 ("temperature", numbers.Real, float), ("top_p", numbers.Real, float)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, kind) and not isinstance(value, bool | int | float):
                object.__setattr__(self, name, cast(value))
        # a wrong type names the keyword (only Python can pass one); a bad value names the CLI's option, as
        # the CLI's values land here too and one check serves both
        if whole_number(self.max_new_tokens) is None:
            raise MoEOffloadError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise MoEOffloadError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):  # True was taken as 1.0
                raise MoEOffloadError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MoEOffloadError(f"--temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoEOffloadError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.seed is not None and whole_number(self.seed) is None:
            raise MoEOffloadError(f"seed must be a whole number or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise MoEOffloadError(f"--seed must be a whole number from 0 to 2**63 - 1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): float32 probabilities [V].

    The same steps as transformers' TemperatureLogitsWarper then TopPLogitsWarper: a token is cut when
    the mass of the tokens less likely than it, itself included, is <= 1 - top_p; the likeliest token
    always stays.
    """
    assert logits.dim() == 1, f"expected logits [V], got {tuple(logits.shape)}"
    assert not config.greedy, "greedy sampling has no distribution"
    # shifted so the likeliest scores 0: a temperature of 1e-40 would make the others -inf, not all of them inf
    # and the softmax NaN; a temperature under float32's smallest normal number would round to 0 in the division
    scores = (logits.float() - logits.max().float()) / max(config.temperature, torch.finfo(torch.float32).tiny)  # [V]
    if config.top_p < 1.0:
        sorted_scores, sorted_ids = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        cut_sorted = cumulative <= 1 - config.top_p
        cut_sorted[-1] = False
        cut = cut_sorted.scatter(0, sorted_ids, cut_sorted)
        scores = scores.masked_fill(cut, -math.inf)
    return scores.softmax(dim=-1)


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: argmax at temperature 0, else temperature + top-p sampling.

    Deterministic given a seeded generator on the logits' device (None uses torch's global RNG).
    """
    assert logits.dim() == 1, f"expected logits [V], got {tuple(logits.shape)}"
    if config.greedy:
        return int(torch.argmax(logits))  # syncs the device: the host needs the id to stop and stream
    probs = sampling_probs(logits, config)
    return int(torch.multinomial(probs, 1, generator=generator))  # syncs the device, as above


@dataclass
class Timing:
    """Token counts and seconds of prefill and decode, and their rates: one generation's, or a run's sum."""

    prefill_tokens: int = 0  # prompt tokens run in prefill forwards
    decode_tokens: int = 0  # single-token decode forwards
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def add(self, other: Timing | GenerationResult) -> None:
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s

    def to_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


StopReason = Literal["eos", "length", "stopped"]


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only: no prompt, no stop id
    text: str | None  # generate() leaves it None; callers that hold the tokenizer fill it in
    prefill_tokens: int  # prompt tokens run in the prefill forward
    decode_tokens: int  # single-token decode forwards (the first new token comes from the prefill)
    prefill_s: float  # prompt forward + first sample: the time to the first token
    decode_s: float  # every decode step after it, on_token callbacks included
    stop_reason: StopReason  # a stop id, max_new_tokens or the context end, or the caller's should_stop
    stop_token_id: int | None = None  # the stop id that ended generation (not in token_ids)

    @property
    def timing(self) -> Timing:
        return Timing(self.prefill_tokens, self.decode_tokens, self.prefill_s, self.decode_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.timing.prefill_tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.timing.decode_tokens_per_s


def prefill(
    model: LanguageModel,
    prompt: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    start_pos: int = 0,
) -> int:
    """Run the prompt [T] from start_pos and sample the first new token.

    Only the last position's logits are made: all T of Mixtral's would be T x 32000 floats, 0.5 GB for a
    4096-token prompt, beside the bfloat16 product they are cast from."""
    logits = model.forward(prompt, start_pos, last_only=True)  # [1, V]
    assert logits.shape[0] == 1, f"forward gave {logits.shape[0]} rows of logits for the last position"
    return sample(logits[-1], config, generator)


def decode_one_token(
    model: LanguageModel,
    token: torch.Tensor,
    pos: int,
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> int:
    """Feed one token [1] at `pos` and sample the next."""
    logits = model.forward(token, pos)  # [1, V]
    return sample(logits[-1], config, generator)


def decode_n_tokens(
    model: LanguageModel,
    token_buffer: torch.Tensor,
    current: int,
    start_pos: int,
    num_steps: int,
    config: SamplingConfig,
    generator: torch.Generator | None,
    stop_ids: set[int],
    on_token: Callable[[int], None] | None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[int], int | None, StopReason]:
    """Feed `current` at start_pos and go on for at most num_steps forwards, or until `should_stop()`, asked
    before each one, says so.

    Returns the new ids (stop id excluded), the stop id that ended it (or None), and why it ended.
    `token_buffer` is a preallocated LongTensor [1] on the model's device, refilled in place.
    """
    new_ids: list[int] = []
    for step in range(num_steps):
        if should_stop is not None and should_stop():
            return new_ids, None, "stopped"
        token_buffer.fill_(current)
        current = decode_one_token(model, token_buffer, start_pos + step, config, generator)
        if current in stop_ids:
            return new_ids, current, "eos"
        new_ids.append(current)
        if on_token is not None:
            on_token(current)
    return new_ids, None, "length"


def check_prompt(prompt_len: int, max_seq_len: int, name: str = "the prompt") -> None:
    """A one-line error unless a prompt of prompt_len tokens leaves the context room for a new token."""
    if prompt_len == 0:
        raise MoEOffloadError(f"{name} is empty; give at least one token of text")
    if prompt_len >= max_seq_len:
        raise MoEOffloadError(
            f"{name} is {prompt_len} tokens but the context holds {max_seq_len}, "
            f"which leaves no room for a new token; shorten it to at most {max_seq_len - 1} tokens"
        )


def generate(
    model: LanguageModel,
    prompt_ids: list[int],
    config: SamplingConfig,
    stop_ids: set[int],
    on_token: Callable[[int], None] | None = None,
    synchronize: Callable[[], None] | None = None,
    cached: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Empty the KV cache, prefill the prompt, then decode until a stop id, max_new_tokens or the context end.

    `should_stop()` is asked before each decode step: True ends it there, between steps, where the model's
    state is whole (Ctrl-C in the CLI), with stop_reason "stopped".
    `on_token` sees each generated id as it is sampled (never the stop id). `synchronize` (e.g.
    torch.cuda.synchronize) is called before each clock reading so queued device work is counted.
    `cached` > 0 says the KV cache already holds prompt_ids[:cached] (a conversation going on): the cache
    is kept and only the rest of the prompt is prefilled.
    """
    prompt_len = len(prompt_ids)
    check_prompt(prompt_len, model.max_seq_len)
    if not 0 <= cached < prompt_len:
        raise ValueError(f"cached must leave at least one prompt token to prefill: {cached} of {prompt_len}")
    # Prompt plus generated ids fit the context; the last new id is sampled but never fed.
    budget = min(config.max_new_tokens, model.max_seq_len - prompt_len)
    device = getattr(model, "device", None) or torch.device("cpu")
    generator = None
    if not config.greedy:
        generator = torch.Generator(device=device)
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # [T]
    token_buffer = torch.empty(1, dtype=torch.long, device=device)  # [1], reused by every decode step

    if cached == 0:
        model.reset()
    if synchronize is not None:
        synchronize()  # syncs the device: earlier queued work must not count as prefill
    start = time.perf_counter()
    first = prefill(model, prompt[cached:], config, generator, cached)
    if synchronize is not None:
        synchronize()  # syncs the device: the prefill's work must count as prefill
    prefill_end = time.perf_counter()

    token_ids: list[int] = []
    stop_token_id: int | None = first if first in stop_ids else None
    reason: StopReason = "eos"
    if stop_token_id is None:
        token_ids.append(first)
        if on_token is not None:
            on_token(first)
        more, stop_token_id, reason = decode_n_tokens(
            model, token_buffer, first, prompt_len, budget - 1, config, generator, stop_ids, on_token, should_stop
        )
        token_ids.extend(more)
    if synchronize is not None:
        synchronize()  # syncs the device: every decode step must count as decode
    decode_end = time.perf_counter()

    sampled = len(token_ids) + (stop_token_id is not None)
    return GenerationResult(
        token_ids=token_ids,
        text=None,
        prefill_tokens=prompt_len - cached,
        decode_tokens=sampled - 1,  # every sampled id after the first cost one decode forward
        prefill_s=prefill_end - start,
        decode_s=decode_end - prefill_end,
        stop_reason=reason,
        stop_token_id=stop_token_id,
    )


def continuation_text(tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
    """The text that token_ids add after the prompt, spacing exact: decode(prompt + new) less decode(prompt).

    Decoding the new ids alone is not the same with SentencePiece: it drops the first new token's
    leading space (a 4-space indent after a newline comes out as 3 spaces).
    """
    prompt_text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full_text = tokenizer.decode([*prompt_ids, *token_ids], skip_special_tokens=True)
    return full_text[len(prompt_text) :]


class TextStreamer:
    """Incremental detokenization: text that is final as soon as it is, never a broken character.

    `push(id)` returns the text that id completes. It decodes a window that starts where the
    previous piece started, not the whole sequence, and diffs it against the same window without the
    new ids. Starting one piece back keeps a tokenizer that drops the leading space of a decode
    (SentencePiece) right; starting at a piece boundary keeps the window from opening in the middle
    of a character's byte-fallback tokens, which would decode as '\ufffd's. A trailing '\ufffd' is an
    incomplete UTF-8 sequence: it is held back until later ids complete it. `flush()` returns what is
    still held.

    With `prompt_ids`, the pieces continue the prompt: all of them together equal
    `continuation_text(tokenizer, prompt_ids, ids)` (what `generate` prints). Without, they equal
    tokenizer.decode(ids, skip_special_tokens=...), the new text on its own (what a chat reply shows:
    SentencePiece drops the reply's leading space). Both hold for any ids that spell valid UTF-8; for
    invalid byte sequences the stream keeps each valid byte where a whole decode makes the run '\ufffd's.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids]  # prompt context, then every pushed id
        self._prefix_offset = 0  # the window starts here: where the last emitted piece started
        self._read_offset = len(self._ids)  # the text of the ids before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, hold_back: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])[len(emitted) :]
        if not new_text or (hold_back and new_text.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(hold_back=True)

    def flush(self) -> str:
        return self._emit(hold_back=False)


def generate_text(
    model: LanguageModel,
    tokenizer,
    prompt_ids: list[int],
    config: SamplingConfig,
    stop_ids: set[int],
    on_text: Callable[[str], None] | None = None,
    continue_prompt: bool = True,
    synchronize: Callable[[], None] | None = None,
    cached: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """`generate` with text: streams pieces to `on_text` and fills `result.text`.

    continue_prompt=True gives the exact continuation of the prompt (plain `generate`); False gives
    the new text on its own, as a chat reply is shown.
    """
    context = prompt_ids if continue_prompt else ()
    streamer = TextStreamer(tokenizer, context)

    def on_token(token_id: int) -> None:
        piece = streamer.push(token_id)
        if piece:
            on_text(piece)

    result = generate(
        model, prompt_ids, config, stop_ids, on_token if on_text else None, synchronize, cached, should_stop
    )
    if on_text is not None:
        rest = streamer.flush()
        if rest:
            on_text(rest)
    if continue_prompt:
        result.text = continuation_text(tokenizer, prompt_ids, result.token_ids)
    else:
        result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return result
