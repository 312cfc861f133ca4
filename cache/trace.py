"""Routing traces: read the shared format, and write it (with two extra fields) from the runtime.

One JSON object a line, one line per (sequence, token, layer), as in shared/traces/README.md:

    {"dataset": "humaneval", "problem_id": 0, "layer": 0, "experts": [6, 5],
     "gating_probs": [0.6959, 0.3040], "token_idx": 0}

`problem_id` is the sequence, `experts` the router's choice in router order (highest weight first)
and `gating_probs` their gate weights. Traces that the runtime records add two fields:

- `guess`: the experts the prefetcher guessed for this request before it was made, or null when it
  made no guess (layer 0, or prefetch off);
- `phase`: "decode" (one token) or "prefill" (a whole prompt chunk: one row per layer naming every
  expert the chunk used, so a row may hold more than two experts). A prefill's `token_idx` is that of
  the last decode step before it in the sequence (-1: none): in a conversation, where each turn
  prefills only what is new, the previous reply's last decode step.

Readers treat a missing `guess` as null and a missing `phase` as "decode".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from quant.errors import MoEOffloadError
from quant.files import check_writable, temporary_name

PHASES = ("decode", "prefill")  # at one token_idx, the order a sequence's requests are replayed in


@dataclass(frozen=True)
class Request:
    """One layer's request for one token (or one prefill chunk): served as a unit."""

    experts: tuple[int, ...]  # router order, highest gate weight first
    weights: tuple[float, ...]  # gate weights, same order
    guess: tuple[int, ...] | None = None  # what the runtime's prefetcher guessed for it


@dataclass(frozen=True)
class Token:
    """Every layer's request of one decode token, or of one prefill chunk."""

    sequence: int
    token_idx: int
    phase: str
    layers: tuple[Request, ...]  # index = layer


@dataclass
class Trace:
    """A read trace: complete tokens in replay order, and how many incomplete ones were skipped."""

    path: Path
    tokens: list[Token]
    num_layers: int
    num_experts: int  # highest expert id seen (routed or guessed) + 1
    skipped_tokens: int = 0
    has_guesses: bool = False  # some row carries a non-null `guess`
    guess_field: bool = False  # some row has a `guess` field, null or not: the runtime recorded the trace

    def sequences(self) -> list[list[Token]]:
        """Tokens split by sequence, in replay order; caches empty at the start of each."""
        runs: list[list[Token]] = []
        for token in self.tokens:
            if not runs or runs[-1][0].sequence != token.sequence:
                runs.append([])
            runs[-1].append(token)
        return runs

    def longest_decode(self, top_k: int) -> list[Token]:
        """The decode tokens of the sequence with the most, every row naming at least `top_k` experts: what
        bench replays, and cache/timeline.py."""
        tokens = max(([t for t in run if t.phase == "decode"] for run in self.sequences()), key=len)
        if not tokens:
            raise MoEOffloadError(f"trace {self.path} has no decode tokens to replay")
        if any(len(request.experts) < top_k for token in tokens for request in token.layers):
            raise MoEOffloadError(f"trace {self.path} has a decode row with fewer than {top_k} experts")
        return tokens

    def select(self, sequences: Sequence[int]) -> Trace:
        """The same trace restricted to the given sequence ids (for held-out tuning)."""
        keep = set(sequences)
        tokens = [t for t in self.tokens if t.sequence in keep]
        return Trace(self.path, tokens, self.num_layers, self.num_experts, 0, self.has_guesses, self.guess_field)

    @property
    def sequence_ids(self) -> list[int]:
        return [run[0].sequence for run in self.sequences()]


_REQUIRED = {"problem_id": int, "layer": int, "token_idx": int, "experts": list, "gating_probs": list}
MAX_ID = 4096  # layers and experts a layer a trace may name: more than any model has (DeepSeek-V3: 61, 256)


def read_trace(path: str | Path) -> Trace:
    """Read a trace file. Tokens missing a layer are skipped and counted; bad lines raise, and so does a
    sequence with no token of every layer (another model's routing).

    Replay order: sequences in order of first appearance in the file; within a sequence, by `token_idx`,
    a decode token before the prefill that follows it (a conversation's next turn), and prefills of one
    `token_idx` (turns between which no decode step ran) in the file's order.
    """
    path = Path(path)
    if path.is_dir():
        raise MoEOffloadError(f"trace {path} is a folder: give the path of a .jsonl routing trace")
    if not path.exists():  # a pipe will do (`simulate <(zcat t.jsonl.gz)`): it is read once, in order
        raise MoEOffloadError(f"trace {path} does not exist: give the path of a .jsonl routing trace")
    # (sequence, phase, token_idx, round) -> {layer: Request}; round counts prefills of one token_idx
    groups: dict[tuple[int, str, int, int], dict[int, Request]] = {}
    rounds: dict[tuple[int, int], int] = {}  # (sequence, token_idx) -> its latest prefill's round
    sequence_rank: dict[int, int] = {}
    num_layers = num_experts = 0
    has_guesses = guess_field = False
    try:
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                sequence, token_idx, layer, phase, request, has_field = _parse_line(line, path, line_no)
                sequence_rank.setdefault(sequence, len(sequence_rank))
                round_ = rounds.get((sequence, token_idx), 0) if phase == "prefill" else 0
                if phase == "prefill" and layer in groups.get((sequence, phase, token_idx, round_), {}):
                    round_ = rounds[(sequence, token_idx)] = round_ + 1  # the next turn's prefill
                layers = groups.setdefault((sequence, phase, token_idx, round_), {})
                if layer in layers:
                    raise MoEOffloadError(
                        f"{path} line {line_no}: a second row for problem_id {sequence}, token_idx "
                        f"{token_idx}, layer {layer} ({phase}); remove the duplicate line"
                    )
                layers[layer] = request
                num_layers = max(num_layers, layer + 1)
                # a guessed expert is one the model has, if never routed in a short trace
                num_experts = max(num_experts, max(request.experts + (request.guess or ()), default=-1) + 1)
                has_guesses = has_guesses or request.guess is not None
                guess_field = guess_field or has_field
    except UnicodeDecodeError:
        raise MoEOffloadError(f"trace {path} is not UTF-8 text: give a .jsonl routing trace") from None
    except OSError as error:
        raise MoEOffloadError(f"cannot read trace {path}: {error.strerror or error}") from None
    if not groups:
        raise MoEOffloadError(f"trace {path} holds no rows: record one with `moe-offload trace`")

    tokens: list[Token] = []
    skipped = 0
    most_layers: dict[int, int] = {}  # sequence -> the most layers one of its tokens has
    order = sorted(groups, key=lambda k: (sequence_rank[k[0]], k[2], PHASES.index(k[1]), k[3]))
    for sequence, phase, token_idx, round_ in order:
        layers = groups[(sequence, phase, token_idx, round_)]
        most_layers[sequence] = max(most_layers.get(sequence, 0), len(layers))
        if len(layers) != num_layers:
            skipped += 1
            continue
        tokens.append(Token(sequence, token_idx, phase, tuple(layers[i] for i in range(num_layers))))
    if not tokens:
        raise MoEOffloadError(
            f"trace {path} has no complete token (a row for each of layers 0 to {num_layers - 1}): all {skipped} "
            "are missing a layer"
        )
    for sequence, most in most_layers.items():  # a whole sequence short of layers is another model's, not a gap
        if most != num_layers:
            raise MoEOffloadError(
                f"trace {path}: problem_id {sequence}'s tokens have at most {most} layers, the trace's {num_layers}; "
                "a trace holds one model's routing: give each model's its own file"
            )
    return Trace(path, tokens, num_layers, num_experts, skipped, has_guesses, guess_field)


def _parse_line(line: str, path: Path, line_no: int) -> tuple[int, int, int, str, Request, bool]:
    where = f"{path} line {line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise MoEOffloadError(f"{where}: not valid JSON ({error.msg}); fix or remove the line") from None
    if not isinstance(row, dict):
        raise MoEOffloadError(f"{where}: expected a JSON object per line; fix or remove the line")
    for name, kind in _REQUIRED.items():
        value = row.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MoEOffloadError(
                f"{where}: field {name!r} is missing or not {'an integer' if kind is int else 'a list'}; "
                "fix or remove the line"
            )
    experts, weights = row["experts"], row["gating_probs"]
    if not experts or not all(_is_id(e) for e in experts):
        raise MoEOffloadError(f"{where}: 'experts' must be integers from 0 to {MAX_ID - 1}, got {experts}")
    if len(set(experts)) != len(experts):
        raise MoEOffloadError(f"{where}: 'experts' names an expert twice: {experts}")
    if len(weights) != len(experts) or not all(isinstance(w, (int, float)) for w in weights):
        raise MoEOffloadError(f"{where}: 'gating_probs' must hold one number per expert, got {weights}")
    if not _is_id(row["layer"]):
        raise MoEOffloadError(f"{where}: 'layer' must be from 0 to {MAX_ID - 1}, got {row['layer']}")
    guess = row.get("guess")
    if guess is not None and not (isinstance(guess, list) and all(_is_id(e) for e in guess)):
        raise MoEOffloadError(f"{where}: 'guess' must be a list of expert ids or null, got {guess}")
    phase = row.get("phase", "decode")
    if phase not in PHASES:
        raise MoEOffloadError(f"{where}: 'phase' must be 'prefill' or 'decode', got {phase!r}")
    request = Request(tuple(experts), tuple(float(w) for w in weights), None if guess is None else tuple(guess))
    return row["problem_id"], row["token_idx"], row["layer"], phase, request, "guess" in row


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ID


@dataclass
class TraceWriter:
    """Writes one row per cache request; the file appears under its final name only on close().

    Use as a context manager: leaving the block by an exception deletes the temporary file.
    """

    path: Path
    dataset: str = "moe-offload"
    rows: int = field(default=0, init=False)
    _temp: Path = field(init=False)
    _file: IO[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.path = check_writable(self.path, "the trace")
        self._temp = temporary_name(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._temp.open("w", encoding="utf-8")
        except OSError as error:
            raise MoEOffloadError(f"the trace {self.path}: cannot write it ({error.strerror or error})") from None

    def record(
        self,
        sequence: int,
        token_idx: int,
        layer: int,
        experts: list[int],
        gating_probs: list[float],
        guess: list[int] | None,
        phase: str = "decode",
    ) -> None:
        """One cache request: `experts` in router order, `guess` what the prefetcher guessed for it."""
        if self._file is None:
            raise RuntimeError(f"TraceWriter for {self.path} is already closed")
        if phase not in PHASES:
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        if len(experts) != len(gating_probs):
            raise ValueError(f"{len(experts)} experts but {len(gating_probs)} gate weights")
        row = {
            "dataset": self.dataset,
            "problem_id": int(sequence),
            "layer": int(layer),
            "experts": [int(e) for e in experts],
            "gating_probs": [float(w) for w in gating_probs],
            "token_idx": int(token_idx),
            "guess": None if guess is None else [int(e) for e in guess],
            "phase": phase,
        }
        self._file.write(json.dumps(row) + "\n")
        self.rows += 1

    def close(self) -> Path:
        """Flush, then rename the temporary file to the final name. Returns the final path."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop what was written: nothing appears under the final name."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._temp.unlink(missing_ok=True)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
