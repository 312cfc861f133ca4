"""Trace-only prefetch predictors: guess layer l's experts once layer l-1 of the same token is known.

The simulator asks `guess(layer, current, recorded)` before each decode request at layers >= 1 and
sends the answer through `SlotTable.prefetch`, which counts what the guess was worth (recall,
prefetches issued / used / wasted). `current` holds only what is known at that moment: this token's
requests at layers below `layer`. After the request, `observe(layer, request)` tells the
predictor what really happened. Prefill chunks are neither guessed nor observed.

- prev-token: the previous token's experts at this layer (none for a sequence's first token).
- cooccur: learned online; counts how often expert a at layer l-1 and expert b at layer l serve the
  same token, and guesses the b with the highest gate-weighted share given this token's layer l-1
  experts. Its counts carry over from one sequence to the next, as a long-running server's would.
  The previous token's experts at this layer add a prior of 0.1 / rank (0.1, 0.05, ...): it settles
  ties and close calls (shares less than the prior apart), and is the whole guess at a layer with no
  counts yet.
- recorded: replays the `guess` field the runtime recorded for that request (a traced run).
"""

from __future__ import annotations

from collections.abc import Sequence

from cache.trace import Request, Trace
from quant.errors import MoEOffloadError


class Predictor:
    """The interface. `guess` returns expert ids in priority order, or None for no guess."""

    name = "base"

    def reset(self) -> None:
        """A new sequence starts."""

    def guess(self, layer: int, current: Sequence[Request], recorded: tuple[int, ...] | None) -> list[int] | None:
        raise NotImplementedError

    def observe(self, layer: int, request: Request) -> None:
        """The request at `layer` of the current token was served."""


class PrevToken(Predictor):
    """Guess that this token repeats the previous token's experts at this layer."""

    name = "prev-token"

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, ...]] = {}  # layer -> the previous token's experts there

    def reset(self) -> None:
        self.last.clear()

    def guess(self, layer: int, current: Sequence[Request], recorded: tuple[int, ...] | None) -> list[int] | None:
        previous = self.last.get(layer)
        return list(previous) if previous else None

    def observe(self, layer: int, request: Request) -> None:
        self.last[layer] = request.experts


class CoOccurrence(Predictor):
    """Cross-layer co-occurrence, learned online: P(b at layer l | a at layer l-1, same token)."""

    name = "cooccur"

    def __init__(self, prior: float = 0.1) -> None:
        self.prior = prior  # added to the previous token's experts' shares: prior / rank, from rank 1
        self.pairs: dict[tuple[int, int, int], float] = {}  # (layer, a at layer-1, b at layer) -> count
        self.seen: dict[tuple[int, int], float] = {}  # (layer, a at layer-1) -> count
        self.successors: dict[tuple[int, int], list[int]] = {}  # (layer, a) -> every b seen after a
        self.below: Request | None = None  # this token's request at the layer just observed
        self.previous_token = PrevToken()

    def reset(self) -> None:
        self.previous_token.reset()  # the learned counts stay
        self.below = None

    def guess(self, layer: int, current: Sequence[Request], recorded: tuple[int, ...] | None) -> list[int] | None:
        below = current[layer - 1]
        scores: dict[int, float] = {}
        for a, weight in zip(below.experts, below.weights):
            seen = self.seen.get((layer, a))
            if not seen:
                continue
            for b in self.successors.get((layer, a), ()):
                scores[b] = scores.get(b, 0.0) + weight * self.pairs[(layer, a, b)] / seen
        fallback = self.previous_token.guess(layer, current, recorded) or []
        for rank, b in enumerate(fallback):
            scores[b] = scores.get(b, 0.0) + self.prior / (rank + 1)
        if not scores:
            return None
        k = len(below.experts)
        return sorted(scores, key=lambda b: (-scores[b], b))[:k]

    def observe(self, layer: int, request: Request) -> None:
        self.previous_token.observe(layer, request)
        if layer == 0 or self.below is None:
            self.below = request
            return
        for a in self.below.experts:
            self.seen[(layer, a)] = self.seen.get((layer, a), 0.0) + 1.0
            for b in request.experts:
                key = (layer, a, b)
                if key not in self.pairs:
                    self.successors.setdefault((layer, a), []).append(b)
                self.pairs[key] = self.pairs.get(key, 0.0) + 1.0
        self.below = request


class Recorded(Predictor):
    """Replay the guesses the runtime's prefetcher made when the trace was recorded."""

    name = "recorded"

    def guess(self, layer: int, current: Sequence[Request], recorded: tuple[int, ...] | None) -> list[int] | None:
        return list(recorded) if recorded else None


PREDICTORS: dict[str, type[Predictor]] = {p.name: p for p in (PrevToken, CoOccurrence, Recorded)}
PREFETCH_CHOICES = ["none", *PREDICTORS]


def check_predictor(name: str) -> None:
    """`simulate`'s --prefetch, checked before the trace is read (and by `make_predictor`, for Python)."""
    if name not in PREFETCH_CHOICES:
        raise MoEOffloadError(f"--prefetch {name!r} is unknown: choose one of {', '.join(PREFETCH_CHOICES)}")


def make_predictor(name: str, trace: Trace) -> Predictor | None:
    """The predictor called `name` for replaying `trace`; None for "none"."""
    check_predictor(name)
    if name == "none":
        return None
    cls = PREDICTORS[name]
    if cls is Recorded and not trace.has_guesses and trace.guess_field:
        raise MoEOffloadError(
            f"trace {trace.path}'s guesses are all null: it was recorded without prefetching; record it again with "
            "prefetching on (`moe-offload trace --prefetch late`, the default, or early or both; on the CPU add "
            "--slots), or pick --prefetch prev-token or cooccur"
        )
    if cls is Recorded and not trace.has_guesses:
        raise MoEOffloadError(
            f"trace {trace.path} has no recorded guesses (no 'guess' field): record it with "
            "`moe-offload trace`, or pick --prefetch prev-token or cooccur"
        )
    return cls()
