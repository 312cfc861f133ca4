"""CUDA graphs for the resident part of a decode step.

A decode step on a small GPU is hundreds of tiny kernels: per layer, norms, four projections, RoPE,
the KV write, attention, the router. Launched one by one from Python they cost more than they
compute (the first H100 profile: 92 ms a token of host time for Mixtral-8x7B). The decoder's static
path (offload/decoder.py) makes that work the same kernels on the same addresses at every step, so
each piece can be captured once and replayed with one launch, and everything it allocates lives in
the graphs' pool, not in the allocator's traffic.

What cannot be a graph stays on the host between the graphs: reading the routing (the cache decides
which experts to load) and the cache's copies and waits. The experts are graphs too, one per slot
row and place in the request: the row's address is fixed, whatever expert it holds now, and the
gate weight is read on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch

SHORTEST_KEYS = 256  # the fewest keys a static step attends over: short contexts share one set of graphs


def key_range(length: int, max_seq_len: int) -> int:
    """The keys a static step reads for a context of `length`: the next power of two, at least
    SHORTEST_KEYS and at most `max_seq_len`. Each range is its own set of graphs, so a context that
    grows from 300 to 4096 tokens captures five sets, and attention never reads more than twice the
    keys it needs."""
    keys = SHORTEST_KEYS
    while keys < length:
        keys *= 2
    return min(keys, max_seq_len)


class DecodeGraphs:
    """Runs each piece of a decode step by key: the first time eagerly, then from its CUDA graph.

    The first run is real work and the warm-up a capture needs (Triton's compile, cuBLAS's handle, the
    workspace's buffers all come into being outside the graph). `capture=False` keeps running eagerly:
    the same static path, which is how the CPU tests check it. All graphs share one memory pool: they
    are replayed one at a time on one stream, and each writes its results into buffers made outside it.
    """

    def __init__(self, capture: bool = True) -> None:
        self.capture = capture
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.failed: str | None = None  # why capturing stopped, if it did
        # the stream captures run on: torch's own default is one for the process, made on the device current at its
        # first capture, and a capture on another device's stream would record none of this model's kernels
        self.stream: torch.cuda.Stream | None = None

    def run(self, key: Hashable, fn: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        fn()
        if self.capture:
            self._capture(key, fn)

    def capture_only(self, key: Hashable, fn: Callable[[], None]) -> None:
        """Capture `fn` under `key` without running it, unless it is captured already or capturing is off.
        Its kernels must have run once before (compiled, their buffers made), as some other key's."""
        if self.capture and key not in self.graphs:
            self._capture(key, fn)

    def _capture(self, key: Hashable, fn: Callable[[], None]) -> None:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        if self.stream is None:
            self.stream = torch.cuda.Stream()  # on the current device: the model's (OffloadedModel._on_device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                fn()
        except RuntimeError as error:  # an operator that cannot be captured: carry on eagerly, and say so
            # the failed capture's exit raises before it restores the stream: the work after it, and every
            # event the cache records, belongs on the stream decode ran on. The cause is the first error
            torch.cuda.set_stream(stream)
            cause = error.__context__ if isinstance(error.__context__, RuntimeError) else error
            self.capture, self.failed = False, f"{key}: {cause}".splitlines()[0]
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {self.failed}", stacklevel=3)
            return
        self.pool = graph.pool()
        self.graphs[key] = graph

    def reset(self) -> None:
        """Drop every graph (their pool goes with them)."""
        self.graphs.clear()
        self.pool = None
