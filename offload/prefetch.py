"""The speculative prefetcher: a coming layer's router applied to the current hidden state.

Where the guess is made is a trade (DESIGN.md): after layer l's attention it leaves the whole of
layer l's experts to hide the copy, but is right less often (recall 0.63 on the trained tiny model);
at layer l's output it is right more often (0.83) but leaves only layer l+1's attention. `both`
guesses early and corrects at the output: the corrected guess loads what the early one missed.

`ahead` reaches further at the output: layer l's output guesses layers l+1 .. l+ahead, each
corrected at every later output until its own layer runs. A load of a 2-bit Mixtral expert takes
about 1.7 layers of H100 compute (66.7 MB at 53 GB/s against 0.75 ms a layer), so a guess one layer
ahead cannot hide it. Two layers ahead the first guess is right less often (recall 0.71 against 0.82
one layer ahead, on the same text: benchmarks/lookahead_recall.py), and the correction one layer
ahead loads what it missed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cache.expert_cache import ExpertCache
from offload import router
from offload.moe import Route
from offload.norm import normed

WHEN = ("early", "late", "both")


class Prefetcher:
    """Guesses the coming layers' experts during decode and starts loading them."""

    guesses_on_device = True  # the MoE block runs device_guess in its (graph-captured) kernels, not the host

    def __init__(
        self,
        *,
        routers: Sequence[torch.Tensor],
        post_norms: Sequence[torch.Tensor],
        eps: float,
        route: Route,
        top_k: int,
        cache: ExpertCache,
        when: str,
        ahead: int = 1,
        fused_norm: bool = False,
        fused_route: bool = False,
    ) -> None:
        if when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {when!r}")
        if ahead < 1 or (ahead > 1 and when == "early"):
            raise ValueError(f"ahead must be 1, or more with a guess at the output (late or both), got {ahead}")
        self.routers, self.post_norms, self.eps = routers, post_norms, eps
        self.fused_norm = fused_norm  # the norm in one kernel, as the decoder's (offload/norm.py)
        self.fused_route = fused_route  # the norm and the routing in one kernel, as the MoE block's (offload/router.py)
        self.route, self.top_k, self.cache = route, top_k, cache
        self.early = when in ("early", "both")
        self.late = when in ("late", "both")
        self.ahead = ahead

    @property
    def reach(self) -> int:
        """How many layers ahead it loads (bench's `prefetch.ahead`)."""
        return self.ahead

    def targets(self, layer: int) -> range:
        """The layers guessed at layer `layer`'s output, nearest first: the copy stream serves them in order."""
        return range(layer + 1, min(layer + 1 + self.ahead, len(self.routers)))

    def device_guess(
        self, layer: int, h: torch.Tensor, out: torch.Tensor | None = None, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layer `layer`'s router on h's last row (plus add's, where given, rounded as the residual stream's add
        rounds it) normed as its MoE input is (its post-attention norm): the ids it would choose, as float32 [k],
        into `out` where given. Graph-safe."""
        x, router_, norm = h[-1:], self.routers[layer], self.post_norms[layer]  # [1, D], [E, D], [D]
        add = None if add is None else add[-1:]
        if out is None:
            out = torch.empty(self.top_k, dtype=torch.float32, device=h.device)
        if self.fused_route and router.supports(x, router_, norm, add):
            router.fused_route(x, router_, out, norm=norm, eps=self.eps, add=add)
        else:
            x = x if add is None else x + add
            ids, _ = self.route(F.linear(normed(x, norm, self.eps, fused=self.fused_norm), router_), self.top_k)
            out.copy_(ids[0])
        return out

    def device_guesses(
        self, layer: int, h: torch.Tensor, out: torch.Tensor | None = None, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The guesses of every target of layer `layer`'s output (h, plus `add` where given), flat float32
        [targets * k], into `out` where given. Graph-safe."""
        k, targets = self.top_k, self.targets(layer)
        if out is None:
            out = torch.empty(len(targets) * k, dtype=torch.float32, device=h.device)
        for i, target in enumerate(targets):
            self.device_guess(target, h, out[i * k : (i + 1) * k], add)
        return out

    def guess(self, layer: int, h: torch.Tensor) -> list[int]:
        # may synchronize the device: the cache decides on the host
        return [int(e) for e in self.device_guess(layer, h).tolist()]

    def after_attention(self, layer: int, h_mid: torch.Tensor) -> None:
        if self.early and h_mid.shape[0] == 1 and layer + 1 < len(self.routers):
            self.cache.prefetch(layer + 1, self.guess(layer + 1, h_mid))

    def after_layer(self, layer: int, h_out: torch.Tensor) -> None:
        if self.late and h_out.shape[0] == 1 and layer + 1 < len(self.routers):
            # one device-to-host copy for every target: each would otherwise wait for the device on its own
            self.start(layer, self.device_guesses(layer, h_out).tolist())

    def start(self, layer: int, guesses: Sequence[float]) -> None:
        """Start the loads of layer `layer`'s output guesses, read back flat as device_guesses wrote them."""
        k = self.top_k
        for i, target in enumerate(self.targets(layer)):
            self.cache.prefetch(target, [int(e) for e in guesses[i * k : (i + 1) * k]])
