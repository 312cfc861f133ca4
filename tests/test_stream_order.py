"""The expert cache's CUDA ordering, checked on the CPU: every two accesses to one row that could race are ordered.

On a GPU the cache copies on two streams of its own while decode computes on a third, and orders them only with
events (cache/expert_cache.py). A missing wait shows there as a wrong expert now and then, and nowhere on the CPU,
where copies are synchronous. Here the real ExpertCache runs with stand-in streams and events that log each copy's
read and write of a slot row or an arena row, each compute read, each wait and each host synchronisation; a
happens-before relation built from stream order, waits and host syncs must then order every pair of accesses to a
row from two streams of which one writes. Load's own writes into slot rows (exclusive mode) count as the compute
stream's, as on a GPU.
"""

import contextlib
import itertools
import random

import pytest
import torch

from cache.expert_cache import ExpertCache


class Event:
    """A recorded point in a stream: after its `index`-th op (-1: before any)."""

    def __init__(self, stream: "Stream", index: int, log: "Log") -> None:
        self.stream, self.index, self.log = stream, index, log

    def query(self) -> bool:
        return self.log.rng.random() < 0.5  # a load may or may not have landed when compute needs it

    def synchronize(self) -> None:
        self.log.host_syncs.append((len(self.log.ops), self))


class Stream:
    def __init__(self, name: str, log: "Log") -> None:
        self.name, self.log = name, log
        self.ops: list[int] = []  # global op ids, in this stream's order
        self.waits: list[tuple[int, Event]] = []  # (position from which on ops wait, event)

    def record_event(self) -> Event:
        if self.log.pending:  # the copy just issued on this stream (ExpertCache._copy records right after it)
            dst, src = self.log.pending.pop()
            self.log.op(self, src, "read")
            self.log.op(self, dst, "write")
        return Event(self, len(self.ops) - 1, self.log)

    def wait_event(self, event: Event) -> None:
        self.waits.append((len(self.ops), event))

    def wait_stream(self, other: "Stream") -> None:
        self.wait_event(Event(other, len(other.ops) - 1, self.log))


class Log:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ops: list[tuple[Stream, tuple, str]] = []  # (stream, row, "read" | "write") by global id
        self.host_syncs: list[tuple[int, Event]] = []  # (ops issued before it, event)
        self.pending: list[tuple[tuple, tuple]] = []
        self.compute = Stream("compute", self)

    def op(self, stream: Stream, row: tuple, access: str) -> None:
        stream.ops.append(len(self.ops))
        self.ops.append((stream, row, access))

    def races(self) -> list[tuple]:
        """Pairs of accesses to one row, from two streams, one a write, that nothing orders."""
        streams = {stream for stream, _, _ in self.ops}
        position = {op: k for stream in streams for k, op in enumerate(stream.ops)}
        # a vector clock per op: for each stream, the last of its ops that happens before this one (-1: none)
        clocks: list[dict[Stream, int]] = []
        for op, (stream, _, _) in enumerate(self.ops):
            clock = dict.fromkeys(streams, -1)
            k = position[op]
            points = [e for at, e in stream.waits if at <= k] + [e for at, e in self.host_syncs if at <= op]
            points += [Event(stream, k - 1, self)] if k > 0 else []
            for event in filter(lambda e: e.index >= 0, points):
                for other, last in clocks[event.stream.ops[event.index]].items():
                    clock[other] = max(clock[other], last)
                clock[event.stream] = max(clock[event.stream], event.index)
            clocks.append(clock)
        by_row: dict[tuple, list[int]] = {}
        for op, (_, row, _) in enumerate(self.ops):
            by_row.setdefault(row, []).append(op)
        return [
            (row, self.ops[a][0].name, self.ops[a][2], self.ops[b][0].name, self.ops[b][2])
            for row, ops in by_row.items()
            for a, b in itertools.combinations(ops, 2)  # a issued before b
            if self.ops[a][0] is not self.ops[b][0] and "write" in (self.ops[a][2], self.ops[b][2])
            and position[a] > clocks[b][self.ops[a][0]]
        ]  # fmt: skip


class LoggedCache(ExpertCache):
    """The real cache, its copies and load's writes logged by the rows they touch."""

    log: Log

    def _copy(self, dst, src, after, d2h=False):
        self.log.pending.append((self.row_of(dst), self.row_of(src)))
        return super()._copy(dst, src, after, d2h)

    def place(self, layer: int, expert: int) -> torch.Tensor:
        row = super().place(layer, expert)
        if self.mode == "exclusive" and self.row_of(row)[0] == "slot":  # load's write on the current stream
            self.log.op(self.log.compute, self.row_of(row), "write")
        return row

    def row_of(self, tensor: torch.Tensor) -> tuple[str, int]:
        for name, rows in (("slot", self.slot_rows), ("arena", self.arena)):
            offset = tensor.data_ptr() - rows.data_ptr()
            if 0 <= offset < rows.numel():
                return name, offset // self.expert_bytes
        raise AssertionError("a copy outside the slot rows and the arena")


def replay(mode: str, slots: list[int], seed: int, placed: bool = True, steps: int = 40) -> Log:
    """A decode of `steps` tokens over len(slots) layers of 6 experts, top-2, with an early guess of the next layer
    and a late one two layers ahead, now and then a prefill (every expert) and, in inclusive mode, a reset."""
    log, experts, layers = Log(seed), 6, len(slots)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "current_stream", lambda device=None: log.compute)
        patch.setattr(torch.cuda, "stream", contextlib.nullcontext)
        patch.setattr(LoggedCache, "log", log, raising=False)
        cache = LoggedCache(num_layers=layers, num_experts=experts, expert_bytes=64, slots_per_layer=slots, mode=mode)
        cache.on_cuda = True
        cache.h2d_stream = Stream("h2d", log)
        cache.d2h_stream = Stream("d2h", log) if mode == "exclusive" else None
        for layer in range(layers):
            for expert in range(experts):
                cache.write(layer, expert, torch.full((64,), layer * experts + expert, dtype=torch.uint8))
        if placed:
            cache.placed()
        for step in range(steps):
            for layer in range(layers):
                request = log.rng.sample(range(experts), experts if step % 17 == 0 else 2)
                served = cache.fetch(layer, request)
                if layer + 1 < layers:
                    cache.prefetch(layer + 1, log.rng.sample(range(experts), 2))
                for expert, row in served:
                    log.op(log.compute, cache.row_of(row), "read")
                    assert int(row[0]) == layer * experts + expert
                for ahead in range(layer + 1, min(layer + 3, layers)):
                    cache.prefetch(ahead, log.rng.sample(range(experts), 2))
            if mode == "inclusive" and log.rng.random() < 0.05:
                cache.reset()
    return log


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
@pytest.mark.parametrize("slots", [[1, 1, 1], [2, 3, 1], [5, 2, 4]])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_access_that_could_race_is_ordered(mode, slots, seed):
    assert replay(mode, slots, seed).races() == []


@pytest.mark.parametrize(
    ("mode", "break_it"),
    [
        ("inclusive", "row_free"),  # a load into a slot would not wait for the compute still reading it
        ("exclusive", "row_free"),
        ("inclusive", "slot_ready"),  # compute would read a slot before its load landed
        ("exclusive", "last_h2d"),  # a write-back would overwrite the arena's spare while a load still reads it
        ("exclusive", "placed"),  # a write-back could read a slot row before load's write of it
    ],
)
def test_the_checker_finds_a_missing_wait(mode, break_it, monkeypatch):
    """The check above can fail: each wait the cache makes, left out, gives races."""
    if break_it == "row_free":
        monkeypatch.setattr(ExpertCache, "_load", _load_ignoring("row_free"))
    elif break_it == "last_h2d":
        monkeypatch.setattr(ExpertCache, "_load", _load_ignoring("last_h2d"))
    elif break_it == "slot_ready":
        monkeypatch.setattr(ExpertCache, "_wait_ready", lambda self, layer, slot: None)
    assert replay(mode, [2, 3, 1], seed=0, placed=break_it != "placed").races() != []


def _load_ignoring(name: str):
    """ExpertCache._load with the events it waits for under `name` forgotten first."""
    load = ExpertCache._load

    def forgetting(self, layer, step):
        if name == "row_free":
            self.row_free = [None] * len(self.row_free)
        else:
            self.last_h2d = None
        return load(self, layer, step)

    return forgetting
