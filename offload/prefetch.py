"""The speculative prefetcher: layer l+1's router applied to layer l's hidden state.

Where the guess is made is a trade (DESIGN.md): after layer l's attention it leaves the whole of
layer l's experts to hide the copy, but is right less often (recall 0.63 on the trained tiny model);
at layer l's output it is right more often (0.83) but leaves only layer l+1's attention. `both`
guesses early and corrects at the output: the corrected guess loads what the early one missed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cache.expert_cache import ExpertCache
from offload.decoder import rms_norm
from offload.moe import Route

WHEN = ("early", "late", "both")


class Prefetcher:
    """Guesses each next layer's experts during decode and starts loading them."""

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
    ) -> None:
        if when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {when!r}")
        self.routers, self.post_norms, self.eps = routers, post_norms, eps
        self.route, self.top_k, self.cache = route, top_k, cache
        self.early = when in ("early", "both")
        self.late = when in ("late", "both")

    def device_guess(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s router on its own input norm of `h`: the ids [1, k] it would choose. Graph-safe."""
        x = rms_norm(h[-1:], self.post_norms[layer], self.eps)  # [1, D]
        return self.route(F.linear(x, self.routers[layer]), self.top_k)[0]

    def guess(self, layer: int, h: torch.Tensor) -> list[int]:
        return self.device_guess(layer, h)[0].tolist()  # may synchronize the device: the cache decides on the host

    def after_attention(self, layer: int, h_mid: torch.Tensor) -> None:
        if self.early and h_mid.shape[0] == 1 and layer + 1 < len(self.routers):
            self.cache.prefetch(layer + 1, self.guess(layer + 1, h_mid))

    def after_layer(self, layer: int, h_out: torch.Tensor) -> None:
        if self.late and h_out.shape[0] == 1 and layer + 1 < len(self.routers):
            self.cache.prefetch(layer + 1, self.guess(layer + 1, h_out))
