"""The MoE block: route, fetch through the expert cache, combine. One object serves every layer."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from cache.expert_cache import ExpertCache
from cache.table import request_order
from offload import router
from offload.decoder import PREFILL_CHUNK, check_prefill_chunk
from quant.hqq import Workspace
from quant.linear import linear, silu_gate
from quant.packing import ExpertFormat

Route = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def expert_mlp(x: torch.Tensor, weights: dict, workspace: Workspace | None = None, reuse: bool = False) -> torch.Tensor:
    """Mixtral's expert: w2(silu(w1 x) * w3 x), each weight plain or quantized (see quant/linear.py).

    `reuse` (a decode step, whose shapes never change) writes the three products into `workspace`
    buffers too, so the expert allocates nothing; the result is valid until the next reusing call.
    """
    if not reuse:  # in place where it can: two [T, I] products live at once, not four
        return linear(silu_gate(x, weights["w1"], weights["w3"], workspace), weights["w2"], workspace)
    # T = tokens, I = intermediate, D = hidden
    tokens = x.shape[0]
    intermediate, hidden = weights["w1"].shape[0], weights["w2"].shape[0]

    def buffer(name: str, features: int) -> torch.Tensor:
        return workspace.buffer("mlp." + name, (tokens, features), x.dtype, x.device)

    # [T, I]: in one kernel launch where the workspace's kernel has a gated one (quant/gemv.py, GATED)
    gate = silu_gate(
        x, weights["w1"], weights["w3"], workspace, buffer("gate", intermediate), buffer("up", intermediate)
    )
    return linear(gate, weights["w2"], workspace, buffer("down", hidden))  # [T, D]


class MoEBlock:
    """The sparse MLP of every layer. The decoder calls it with the post-attention normed hidden state."""

    def __init__(
        self,
        *,
        routers: Sequence[torch.Tensor],
        route: Route,
        top_k: int,
        cache: ExpertCache,
        expert_format: ExpertFormat,
        prefetcher=None,
        recorder=None,
        workspace: Workspace | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        fused_route: bool = False,
    ) -> None:
        check_prefill_chunk(prefill_chunk)
        self.routers = routers
        self.prefill_chunk = prefill_chunk  # a prefill's tokens an expert takes at once (offload/decoder.py)
        self.route = route
        # a decode step's routing in one kernel (offload/router.py), where load() found it works and computes `route`
        self.fused_route = fused_route
        self.top_k = top_k
        self.cache = cache
        self.expert_format = expert_format
        self.version = 0  # counts prefetcher and routing changes: the decoder's graphs captured the old ones
        self.prefetcher = prefetcher
        self.recorder = recorder  # called once per cache request, for routing traces
        self.routing = None  # in place of the router (see the property)
        # the experts' dequantization and decode buffers, made on first use; it also picks the kernel
        self.workspace = workspace or Workspace()
        # unpacked views by buffer address: slot and arena rows live as long as the model, and unpacking a
        # 2-bit expert costs ~70 us of Python, ~4.6 ms a token for Mixtral if redone at every use
        self._views: dict[int, dict] = {}

    def __call__(self, layer: int, x: torch.Tensor, h_mid: torch.Tensor | None = None) -> torch.Tensor:
        # T = tokens, D = hidden, E = experts, A = active experts per token
        tokens = x.shape[0]
        if self.routing is None:
            logits = F.linear(x, self.routers[layer])  # [T, E]
            ids, weights = self.route(logits, self.top_k)  # [T, A], highest weight first
        else:
            ids, weights = self.routing(layer, x)
        assert ids.shape == (tokens, self.top_k), ids.shape
        experts, expert_weights = request_order(ids, weights)
        if self.recorder is not None:
            self.recorder(layer, experts, expert_weights, self.cache.guess(layer), tokens > 1)
        served = self.cache.fetch(layer, experts, expert_weights)  # this layer's loads start first
        if self.prefetcher is not None and h_mid is not None:
            self.prefetcher.after_attention(layer, h_mid)  # the coming layers' guesses queue behind them

        if tokens == 1:  # decode: the token's gate weights are on the host already; no index work per expert
            return self._experts(x, served, experts, expert_weights)
        out = torch.zeros_like(x)  # [T, D]
        weights = weights.to(x.dtype)
        for expert, packed in served:
            # the tokens routed to this expert; nonzero synchronizes (its size is data), in prefill only
            rows, rank = (ids == expert).nonzero(as_tuple=True)
            mlp = self._unpack(packed)
            for rows_part, rank_part in zip(rows.split(self.prefill_chunk), rank.split(self.prefill_chunk)):
                y = expert_mlp(x[rows_part], mlp, self.workspace)  # [rows, D]
                out.index_add_(0, rows_part, y.mul_(weights[rows_part, rank_part, None]))
        return out

    @property
    def prefetcher(self):
        return self._prefetcher

    @prefetcher.setter
    def prefetcher(self, prefetcher) -> None:
        self._prefetcher = prefetcher
        self.version += 1

    @property
    def routing(self):
        """Routing in place of the router: `bench --route-trace` replays real routing through a synthetic
        model, whose own routers would choose at random. A callable (layer, x) -> (ids, weights) [T, k]
        serves the eager path; the static path also needs `decode(layer)`, the token's experts and
        weights as host lists, and `device_weights(layer)`, the same weights [k] on the device, graph-safe
        (offload/bench.py's ReplayedRouting)."""
        return self._routing

    @routing.setter
    def routing(self, routing) -> None:
        self._routing = routing
        self.version += 1  # the graphs read the old routing's weights

    def _experts(self, x: torch.Tensor, served, experts: list[int], weights: list[float]) -> torch.Tensor:
        """One token's experts as the cache serves them, summed by gate weight into a workspace buffer [1, D]."""
        weight_of = dict(zip(experts, weights))
        out = self._out(x).zero_()  # [1, D]
        for expert, packed in served:
            y = expert_mlp(x, self._unpack(packed), self.workspace, reuse=True)  # [1, D]
            out.add_(y, alpha=weight_of[expert])
        return out  # the decoder adds it to the residual stream before the next layer

    # -- the static decode path's halves (offload/decoder.py): device work in graphs, host work between

    def route_into(self, layer: int, x: torch.Tensor, h_mid: torch.Tensor) -> None:
        """Device half of one token's routing, graph-safe: the router's top-k ids and weights, and the
        prefetcher's early guess for the next layer, into one float32 buffer that one copy brings over.
        Replayed routing overwrites the weights with its own, which the expert pieces read; the router
        still runs, as it would. It also clears the output the experts add into."""
        k = self.top_k
        routed = self._routed(x.device)  # [3k]: ids, weights, early guess
        ids, weights = routed[:k], routed[k : 2 * k]
        if self.fused_route and router.supports(x, self.routers[layer]):
            router.fused_route(x, self.routers[layer], ids, weights if self.routing is None else None)
        else:
            chosen, gates = self.route(F.linear(x, self.routers[layer]), k)  # [1, k] each
            ids.copy_(chosen[0])
            if self.routing is None:
                weights.copy_(gates[0])
        if self.routing is not None:
            weights.copy_(self.routing.device_weights(layer))
        if self._guesses("early", layer):
            self.prefetcher.device_guess(layer + 1, h_mid, out=routed[2 * k :])
        self._out(x).zero_()

    def decode_experts(self, layer: int, x: torch.Tensor, run: Callable[[Hashable, Callable[[], None]], None]):
        """Host half: read what route_into wrote (one device-to-host copy, which waits for the graph),
        start this layer's loads, then the early prefetch behind them, then serve the experts. Each runs
        through `run` (DecodeGraphs.run), keyed by its slot row and its place in the request: captured
        once, an expert graph replays on whatever expert the row holds, with the gate weight read from
        the routing buffer. Returns the block's output [1, D], a buffer at a fixed address."""
        k = self.top_k
        routed = self._routed(x.device)
        values = routed.tolist()  # may synchronize: the cache decides on the host
        experts, weights = [int(v) for v in values[:k]], values[k : 2 * k]
        if self.routing is not None:  # replayed routing stands in for the router's; the copy above still ran
            experts, weights = self.routing.decode(layer)  # the weights route_into wrote, as host lists
        if self.recorder is not None:
            self.recorder(layer, experts, weights, self.cache.guess(layer), False)
        served = self.cache.fetch(layer, experts, weights)  # this layer's loads start first
        if self._guesses("early", layer):  # the next layer's guess queues behind them on the copy stream
            self.cache.prefetch(layer + 1, [int(v) for v in values[2 * k :]])
        elif self.prefetcher is not None and not self.prefetcher.guesses_on_device:
            self.prefetcher.after_attention(layer, x)  # a prefetcher that guesses on the host (bench's oracle)
        for expert, packed in served:
            run(*self._expert_piece(x, packed, experts.index(expert)))
        return self._out(x)

    def capture_experts(self, capture: Callable[[Hashable, Callable[[], None]], None], x: torch.Tensor) -> None:
        """Capture the expert graph of every slot row and place now (after one eager step has compiled the
        kernels), so that no capture, with its device synchronisation, falls inside later decode steps."""
        for packed in self.cache.slot_rows:
            for place in range(self.top_k):
                capture(*self._expert_piece(x, packed, place))

    def _expert_piece(self, x: torch.Tensor, packed: torch.Tensor, place: int) -> tuple[Hashable, Callable[[], None]]:
        """The graph key and work of the expert in slot row `packed`, `place`-th in its request: out +=
        weight[place] * expert(x), the weight read on the device. Graph-safe."""

        def work() -> None:
            y = expert_mlp(x, self._unpack(packed), self.workspace, reuse=True)  # [1, D]
            self._out(x).addcmul_(y, self._routed(x.device)[self.top_k + place])

        return ("expert", packed.data_ptr(), place), work

    def guesses_late(self, layer: int) -> bool:
        """Whether the static path runs guess_into at layer `layer`'s output: a prefetcher guessing there, on the
        device, and a layer after this one."""
        return self._guesses("late", layer)

    def guess_into(self, layer: int, h: torch.Tensor, moe_out: torch.Tensor) -> None:
        """Device half of the late guess, graph-safe: the coming layers' routers (the next layer's, or as many as
        the prefetcher looks ahead) on layer `layer`'s output, h + moe_out, this block's output not yet added (the
        next layer's input norm adds it)."""
        p = self.prefetcher
        guesses = self._routed(h.device, "late")[: len(p.targets(layer)) * self.top_k]
        p.device_guesses(layer, h, out=guesses, add=moe_out)

    def start_guess(self, layer: int, h: torch.Tensor) -> None:
        """Host half of the late guess, after guess_into's graph: start loading it (one more device-to-host copy)."""
        if self._guesses("late", layer):
            p = self.prefetcher
            # synchronizes: the guess is read on the host, after this layer's kernels (the copies it starts
            # must be queued by the host)
            p.start(layer, self._routed(h.device, "late")[: len(p.targets(layer)) * self.top_k].tolist())

    def _guesses(self, when: str, layer: int) -> bool:
        """Whether the prefetcher guesses layer+1 on the device at this point (`early` or `late`)."""
        p = self.prefetcher
        return p is not None and p.guesses_on_device and getattr(p, when) and layer + 1 < len(self.routers)

    def _routed(self, device: torch.device, tag: str = "routed") -> torch.Tensor:
        size = self.top_k * self.prefetcher.ahead if tag == "late" else 3 * self.top_k
        return self.workspace.buffer("moe." + tag, (size,), torch.float32, device)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.workspace.buffer("moe.out", tuple(x.shape), x.dtype, x.device)  # [1, D]

    def _unpack(self, packed: torch.Tensor) -> dict:
        """The expert's weights as views into `packed`: they read whatever expert the row holds now."""
        views = self._views.get(packed.data_ptr())
        if views is None:
            views = self._views[packed.data_ptr()] = self.expert_format.unpack(packed)
        return views

    def layer_done(self, layer: int, h: torch.Tensor) -> None:
        """Layer `layer`'s output is known: the late (or correcting) guess for the next layer."""
        if self.prefetcher is not None:
            self.prefetcher.after_layer(layer, h)
