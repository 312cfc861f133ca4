"""A decode step's routing in one kernel: the router's product, softmax, top-k and the renormalized weights.

Eagerly, one token's routing (offload/families/mixtral.py's route on F.linear's logits) is about nine kernels: the
router's product (a cuBLAS GEMM of 8 rows), the logits to float32, the softmax, the top-k's two (a gather and a
sort), the weights' sum and quotient, then the copies of ids and weights into the buffer the host reads. The
prefetcher's guess of a coming layer is as many again, after its own norm, and `ahead` guesses are concatenated: at
9d0bc23's H100 profile (benchmarks/results/h100_9d0bc23/profile_decode_h100_graphs.json) each of these small kernels
took 1 to 4 us of device time, about 20 us a routing. `fused_route` is one Triton kernel a token: it reads the
token's row (rms-normed first, with `norm`, as the prefetcher's guess is), multiplies it by the router, and writes
the k ids (as float32, exact to 2^24) and, where asked, their weights into the buffers the host reads.

The arithmetic is transformers' MixtralTopKRouter's: the logits rounded to x's dtype as F.linear's output is, the
softmax in float32, top-k highest first, and the k weights divided by their sum; the norm is offload/norm.py's.
Only the sums' order differs, which moves float32's last bits (and a tie, which torch.topk breaks its own way).
The MoE block and the prefetcher route through it where `works` (MoEBlock.fused_route: CUDA with Triton, where a
first try agrees); tests run it on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from offload.families import mixtral
from offload.norm import cuda_with_triton, rms_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the MoE block routes in torch then
    triton = None

MAX_EXPERTS = 256  # the router's rows are one program's tile: Mixtral's 8, and room for finer-grained models
# elements of the router a program reads at a time: all of Mixtral's 8 x 4096 at once, so that one load's latency is
# waited for, not one a step of a loop (the router is evicted from L2 between layers by the experts' reads)
TILE = 32768
PER_THREAD = 64  # the tile's elements a thread holds: 16 warps for Mixtral's router


def computes(route) -> bool:
    """Whether fused_route computes this family's `route`: Mixtral's softmax, top-k and renormalized weights."""
    return route is mixtral.route


@functools.cache
def works(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where the MoE block routes through the kernel on `device` in `dtype`: CUDA, with Triton, and a first
    try on Mixtral's router that runs and agrees with transformers' steps; else why not, in words (the block then
    routes in torch's steps, as on the CPU). Tried once per device and dtype."""
    return cuda_with_triton(device) or first_try(device, dtype)


def first_try(device: torch.device, dtype: torch.dtype) -> str | None:
    """works' try, on any device the kernel runs on (the CPU's interpreter in tests), in the two forms decode
    launches: a layer's routing (the same ids, and weights within a few roundings) and a guess (of the residual
    stream plus the MoE output, normed; ids alone)."""
    generator = torch.Generator(device).manual_seed(0)
    x, added, router, norm = (torch.randn(shape, generator=generator, device=device).to(dtype)
                              for shape in ((2, 4096), (2, 4096), (8, 4096), (4096,)))  # fmt: skip
    router /= 4096**0.5  # logits of std 1, as a trained router's: no near ties
    ids, weights, guessed = (torch.empty(2, 2, device=device) for _ in range(3))
    try:
        fused_route(x, router, ids, weights)
        fused_route(x, router, guessed, norm=norm, eps=1e-5, add=added)
    except Exception as error:  # noqa: BLE001 -- any failure means one thing: torch's steps
        return f"{type(error).__name__}: {error}"
    expected_ids, expected_weights = mixtral.route(F.linear(x, router), 2)
    expected_guess, _ = mixtral.route(F.linear(rms_norm(x + added, norm, 1e-5), router), 2)
    same_ids = torch.equal(ids, expected_ids.float()) and torch.equal(guessed, expected_guess.float())
    if not same_ids or (weights - expected_weights).abs().max() > 1e-5:
        return "the kernel's routing differs from transformers' steps"
    return None


def supports(x: Tensor, router: Tensor, norm: Tensor | None = None, add: Tensor | None = None) -> bool:
    """Whether fused_route takes x [T, D] with router [E, D] (and norm [D], add [T, D]): contiguous, of one dtype,
    E at most MAX_EXPERTS."""
    return (
        triton is not None and x.dim() == 2 and x.is_contiguous() and router.dim() == 2
        and router.shape[1] == x.shape[1] and router.shape[0] <= MAX_EXPERTS and router.dtype == x.dtype
        and router.is_contiguous()
        and (norm is None or (norm.shape == (x.shape[1],) and norm.dtype == x.dtype and norm.is_contiguous()))
        and (add is None or (add.shape == x.shape and add.dtype == x.dtype and add.is_contiguous()))
    )  # fmt: skip


def fused_route(
    x: Tensor, router: Tensor, ids: Tensor, weights: Tensor | None = None, *, norm: Tensor | None = None,
    eps: float = 0.0, add: Tensor | None = None,
) -> None:  # fmt: skip
    """Mixtral's routing of each row of x [T, D] by router [E, D], in one kernel, into float32 buffers of T * k
    elements (k from their size, highest weight first): the expert ids into `ids`, and their renormalized weights
    into `weights` where given. With `add` [T, D], each row is x + add first, rounded to x's dtype as the residual
    stream's add_ rounds it (x itself is not written); with `norm` [D], it is then rms_norm(., norm, eps).
    Graph-safe."""
    assert supports(x, router, norm, add), (tuple(x.shape), tuple(router.shape), x.dtype, router.dtype)
    tokens, hidden = x.shape
    experts = router.shape[0]
    k = ids.numel() // tokens
    for buffer in (ids,) if weights is None else (ids, weights):
        assert buffer.dtype == torch.float32 and buffer.is_contiguous() and buffer.numel() == tokens * k, buffer.shape
    assert 1 <= k <= experts, (k, experts)
    rows = triton.next_power_of_2(experts)
    columns = min(max(16, TILE // rows), triton.next_power_of_2(hidden))
    _route_kernel[(tokens,)](
        x, x if add is None else add, router, x if norm is None else norm, ids, ids if weights is None else weights,
        hidden, experts, eps, K=k, K_TILE=triton.next_power_of_2(k), EXPERTS=rows, COLUMNS=columns,
        ADD=add is not None, NORM=norm is not None, WEIGHTS=weights is not None, num_warps=warps(rows, columns),
    )  # fmt: skip


def warps(rows: int, columns: int) -> int:
    """Warps for a [rows, columns] tile of the router: PER_THREAD elements a thread, 1 to 16 warps."""
    return min(16, max(1, rows * columns // (32 * PER_THREAD)))


if triton is not None:

    @triton.jit
    def _route_kernel(x_ptr, add_ptr, router_ptr, norm_ptr, ids_ptr, weights_ptr, D, E, eps, K: tl.constexpr,
                      K_TILE: tl.constexpr, EXPERTS: tl.constexpr, COLUMNS: tl.constexpr, ADD: tl.constexpr,
                      NORM: tl.constexpr, WEIGHTS: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)  # the token
        e = tl.arange(0, EXPERTS)  # [EXPERTS]
        d = tl.arange(0, COLUMNS)  # [COLUMNS]
        if NORM:  # offload/norm.py's arithmetic: the sum of squares in float32, rounded where it rounds
            squares = tl.zeros([COLUMNS], tl.float32)
            for start in range(0, D, COLUMNS):
                v = _row(x_ptr, add_ptr, t * D + start + d, start + d < D, ADD).to(tl.float32)
                squares += v * v
            scale = tl.rsqrt(tl.sum(squares, axis=0) / D + eps)
        products = tl.zeros([EXPERTS, COLUMNS], tl.float32)
        dtype = x_ptr.dtype.element_ty
        for start in range(0, D, COLUMNS):
            inside = start + d < D
            v = _row(x_ptr, add_ptr, t * D + start + d, inside, ADD)
            if NORM:
                v = (v.to(tl.float32) * scale).to(dtype)
                v = (tl.load(norm_ptr + start + d, mask=inside, other=0).to(tl.float32) * v.to(tl.float32)).to(dtype)
            w = tl.load(router_ptr + e[:, None] * D + start + d[None, :], mask=(e[:, None] < E) & inside[None, :],
                        other=0)  # fmt: skip
            products += w.to(tl.float32) * v.to(tl.float32)[None, :]
        logits = tl.sum(products, axis=1).to(dtype).to(tl.float32)  # rounded as F.linear's output is
        logits = tl.where(e < E, logits, float("-inf"))
        exps = tl.exp(logits - tl.max(logits, axis=0))
        probs = exps / tl.sum(exps, axis=0)
        # top-k, highest first: k rounds of the largest left, the lowest id among equals
        place = tl.arange(0, K_TILE)
        top = tl.zeros([K_TILE], tl.float32)
        chosen = tl.zeros([K_TILE], tl.float32)
        # a NaN (a NaN in x: every prob is then) counts as the largest, as torch.topk takes it, so that the ids stay
        # distinct experts, lowest first: a max over NaNs matches no element, and would pick id EXPERTS
        left = tl.where(e < E, tl.where(probs == probs, probs, 2.0), -1.0)
        for j in tl.static_range(K):
            best = tl.max(left, axis=0)
            pick = tl.min(tl.where(left == best, e, EXPERTS), axis=0)
            top = tl.where(place == j, best, top)
            chosen = tl.where(place == j, pick.to(tl.float32), chosen)
            left = tl.where(e == pick, -1.0, left)
        tl.store(ids_ptr + t * K + place, chosen, mask=place < K)
        if WEIGHTS:
            tl.store(weights_ptr + t * K + place, top / tl.sum(top, axis=0), mask=place < K)

    @triton.jit
    def _row(x_ptr, add_ptr, offsets, mask, ADD: tl.constexpr):
        """x's elements at `offsets`, plus add's where ADD, rounded to x's dtype as add_ rounds the sum."""
        v = tl.load(x_ptr + offsets, mask=mask, other=0)
        if ADD:
            v = (v.to(tl.float32) + tl.load(add_ptr + offsets, mask=mask, other=0).to(tl.float32)).to(v.dtype)
        return v
