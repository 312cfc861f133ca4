"""RMSNorm in one kernel, with the residual add before it.

Eagerly, transformers' RMSNorm (rms_norm, below) is about eight kernels: x to float32, its square, the mean, the
epsilon, the reciprocal square root, x to float32 again, the product and back to x's dtype, the weight's product;
the decode step's copy into its buffer and the residual add before it make ten. Each moves a few KB, so each costs
a launch's worth of device time, 1 to 4 us (the H100 profile at 9d0bc23,
benchmarks/results/h100_9d0bc23/profile_decode_h100_graphs.json: its reductions, casts and products), and a decode
step norms 2 x 32 + 1 times, and the prefetcher's late guess once at each layer but the last. `fused_rms_norm` is
one Triton kernel a row: it reads x (and with `add`, adds it into x first, as the residual stream's add_ does) and
writes the normed row.

The arithmetic is transformers': the sum of squares in float32, x * rsqrt(mean + eps) rounded to x's dtype, then the
weight's product rounded again (a 16-bit product in torch is float32's, rounded). Only the sum's order differs
(a tree, not torch's), which moves float32's last bits. `normed` picks it where asked to and it serves the tensors:
the decoder and the prefetcher ask where `works` (Decoder.fused_norm: CUDA with Triton, where a first try agrees);
tests run it on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the decoder norms in torch then
    triton = None

NO_TRITON, NOT_CUDA = "Triton is not installed", "not a CUDA device"  # works' answers where no try is made
MAX_HIDDEN = 16384  # a row is one program's tile: Mixtral's 4096, and room for larger models


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' MixtralRMSNorm: normalize in float32, scale in the input's dtype."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def normed(x: Tensor, weight: Tensor, eps: float, *, fused: bool, out: Tensor | None = None,
           add: Tensor | None = None) -> Tensor:  # fmt: skip
    """rms_norm(x, weight, eps), into `out` when given; with `add`, x += add in place first (the residual stream's
    add). In one kernel (fused_rms_norm) where `fused` and it takes these tensors, else in transformers' steps."""
    if fused and supports(x, weight) and (add is None or add.is_contiguous()):
        return fused_rms_norm(x, weight, eps, out, add)
    if add is not None:
        x.add_(add)
    y = rms_norm(x, weight, eps)
    return y if out is None else out.copy_(y)


@functools.cache
def works(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where the decoder norms through the kernel on `device` in `dtype`: CUDA, with Triton, and a first
    try on a Mixtral-wide row that runs and agrees with transformers' steps; else why not, in words (the decoder
    then norms in torch's steps, as on the CPU). Tried once per device and dtype."""
    return cuda_with_triton(device) or first_try(device, dtype)


def first_try(device: torch.device, dtype: torch.dtype) -> str | None:
    """works' try, on any device the kernel runs on (the CPU's interpreter in tests)."""

    def both() -> tuple[Tensor, Tensor]:
        generator = torch.Generator(device).manual_seed(0)
        x, weight = (torch.randn(shape, generator=generator, device=device).to(dtype) for shape in ((2, 4096), (4096,)))
        return fused_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5)

    return agrees(both, dtype, "norm")


def cuda_with_triton(device: torch.device) -> str | None:
    """None where a first try of the resident part's kernels is made: CUDA, with Triton; else NO_TRITON or
    NOT_CUDA."""
    if triton is None:
        return NO_TRITON
    return None if device.type == "cuda" else NOT_CUDA


def takes(what: str, why_not: str | None) -> bool:
    """Whether a kernel whose first try (`works`) said `why_not` is taken; a try that was made and failed is said in
    a warning, since decode is then slower than it could be."""
    if why_not not in (None, NO_TRITON, NOT_CUDA):
        warnings.warn(f"{what} runs in torch's steps here: its kernel's first try failed ({why_not})", stacklevel=3)
    return why_not is None


def agrees(both: Callable[[], tuple[Tensor, Tensor]], dtype: torch.dtype, what: str) -> str | None:
    """A first try: both() runs a kernel and transformers' steps on the same input; None where it runs and they
    agree within a few roundings of `dtype`, else why not (any failure means one thing: torch's steps)."""
    try:
        got, expected = (result.float() for result in both())
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    if (got - expected).abs().max() > 4 * torch.finfo(dtype).eps * expected.abs().max():
        return f"the kernel's {what} differs from transformers' steps"
    return None


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether fused_rms_norm takes x [T, D] with weight [D]: contiguous, of one dtype, D at most MAX_HIDDEN."""
    return (
        triton is not None and x.dim() == 2 and x.is_contiguous() and weight.shape == (x.shape[1],)
        and weight.dtype == x.dtype and weight.is_contiguous() and x.shape[1] <= MAX_HIDDEN
    )  # fmt: skip


def fused_rms_norm(
    x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None, add: Tensor | None = None
) -> Tensor:
    """rms_norm of each row of x [T, D] in one kernel, scaled by weight [D], into `out` when given (else a new
    tensor); with `add` [T, D], x += add first, in place (x's dtype, rounded once), and the sum normed."""
    assert supports(x, weight), (tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype)
    rows, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if add is not None:
        assert add.shape == x.shape and add.is_contiguous(), (add.shape, x.shape)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](x, x if add is None else add, weight, out, hidden, eps, BLOCK=block, ADD=add is not None,
                              num_warps=min(16, max(1, block // 512)))  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, add_ptr, weight_ptr, out_ptr, D, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        inside = d < D
        x = tl.load(x_ptr + row * D + d, mask=inside, other=0)
        if ADD:  # the residual stream's add, rounded to its dtype as add_ rounds it, and written back
            x = (x.to(tl.float32) + tl.load(add_ptr + row * D + d, mask=inside, other=0).to(tl.float32)).to(x.dtype)
            tl.store(x_ptr + row * D + d, x, mask=inside)
        x = x.to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + d, mask=inside, other=0)
        y = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=inside)
