"""Rotary position embedding (RoPE) in one kernel.

Eagerly, transformers' rotation (apply_rope, below) of a layer's queries or keys is five kernels (the negated half,
the concatenation, two products, the sum), and a decode step also gathers its position's cos and sin rows (two more):
twelve small kernels a layer, each a launch's worth of device time, as offload/norm.py says of the norm's.
`rotate` is one Triton kernel a token: it reads the token's position, its cos and sin rows from the whole tables
and its heads, and writes them rotated. The arithmetic is transformers', rounding where its steps round: each
product to x's dtype, then their sum. The decoder uses it where `works` (Decoder.fused_rope: CUDA with Triton,
where a first try agrees); tests run it on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from offload.norm import agrees, cuda_with_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the decoder rotates in torch then
    triton = None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, S] rotated by position; rotate_half pairs dim i with dim i + S/2 (HF convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@functools.cache
def works(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where the decoder rotates through the kernel on `device` in `dtype`: CUDA, with Triton, and a first
    try on Mixtral's key heads that runs and agrees with transformers' steps; else why not, in words (the decoder
    then rotates in torch's steps, as on the CPU). Tried once per device and dtype."""
    return cuda_with_triton(device) or first_try(device, dtype)


def first_try(device: torch.device, dtype: torch.dtype) -> str | None:
    """works' try, on any device the kernel runs on (the CPU's interpreter in tests)."""

    def both() -> tuple[Tensor, Tensor]:
        generator = torch.Generator(device).manual_seed(0)
        x, cos, sin = (torch.randn(shape, generator=generator, device=device).to(dtype)
                       for shape in ((2, 8, 128), (16, 128), (16, 128)))  # fmt: skip
        positions = torch.tensor([9, 2], device=device)
        return rotate(x, cos, sin, positions), apply_rope(x, cos[positions], sin[positions])

    return agrees(both, dtype, "rotation")


def supports(x: Tensor, cos: Tensor, positions: Tensor) -> bool:
    """Whether rotate takes x [T, heads, S] at `positions` [T] of the tables cos [N, S]: contiguous, one dtype."""
    return (
        triton is not None and x.dim() == 3 and x.is_contiguous() and cos.dim() == 2 and cos.shape[1] == x.shape[2]
        and cos.dtype == x.dtype and cos.is_contiguous() and positions.shape == (x.shape[0],)
        and positions.is_contiguous()
    )  # fmt: skip


def rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """apply_rope(x, cos[positions], sin[positions]) in one kernel, into a new tensor: x [T, heads, S], the tables
    cos and sin [N, S] whole, positions [T] on x's device (an int tensor: a decode step's stays on the device)."""
    out = torch.empty_like(x)
    _launch(x, cos, sin, positions, out)
    return out


def supports_cache(keys: Tensor, values: Tensor, key_cache: Tensor, value_cache: Tensor) -> bool:
    """Whether rotate_into_cache takes keys and values [T, heads, S] and the caches [heads, N, S]: contiguous, one
    dtype (and what rotate asks of the keys)."""
    heads, size = keys.shape[1:]
    return all(
        t.dim() == 3 and t.is_contiguous() and t.dtype == keys.dtype
        for t in (values, key_cache, value_cache)
    ) and values.shape == keys.shape and key_cache.shape == value_cache.shape and (
        key_cache.shape[0], key_cache.shape[2]) == (heads, size)  # fmt: skip


def rotate_into_cache(
    keys: Tensor, values: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, key_cache: Tensor, value_cache: Tensor
) -> None:
    """The KV cache write with the keys' rotation, in one kernel: apply_rope(keys, cos[positions], sin[positions])
    into key_cache [heads, N, S], and values copied into value_cache, each token's at its position. keys and values
    [T, heads, S]; positions [T] on the device. Graph-safe."""
    assert supports_cache(keys, values, key_cache, value_cache), (keys.shape, values.shape, key_cache.shape)
    _launch(keys, cos, sin, positions, key_cache, values, value_cache)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, out: Tensor, values: Tensor | None = None,
            value_cache: Tensor | None = None) -> None:  # fmt: skip
    """x rotated into out: [T, heads, S] as x, or with `values` the key cache [heads, N, S] at the positions (and
    values copied into value_cache there)."""
    assert supports(x, cos, positions) and sin.shape == cos.shape and sin.dtype == cos.dtype, (x.shape, cos.shape)
    tokens, heads, size = x.shape
    heads_p2, half_p2 = triton.next_power_of_2(heads), triton.next_power_of_2(size // 2)
    cache = values is not None
    _rope_kernel[(tokens,)](x, cos, sin, positions, out, values if cache else x, value_cache if cache else out, heads,
                            size, out.shape[1] * size if cache else size, HEADS=heads_p2, HALF=half_p2, CACHE=cache,
                            num_warps=min(8, max(1, heads_p2 * half_p2 // 256)))  # fmt: skip


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, v_ptr, v_out_ptr, H, S, OUT_HEAD,
                     HEADS: tl.constexpr, HALF: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
        # each head's two halves as tiles [HEADS, HALF]: x1 (dims 0..S/2) and x2 (S/2..S), each read in runs.
        # rotate_half(x) is (-x2, x1), so the first half is x1 cos - x2 sin and the second x2 cos + x1 sin.
        # out: [T, H, S] as x (OUT_HEAD = S); CACHE: the key cache [H, N, S] (OUT_HEAD = N * S), the token's row at
        # its position, and the values v copied into theirs (v_out) there
        t = tl.program_id(0)  # the token
        h = tl.arange(0, HEADS)[:, None]  # [HEADS, 1]
        d = tl.arange(0, HALF)[None, :]  # [1, HALF]
        half = S // 2
        inside = (h < H) & (d < half)
        row = t * H * S + h * S
        x1 = tl.load(x_ptr + row + d, mask=inside, other=0)
        x2 = tl.load(x_ptr + row + half + d, mask=inside, other=0)
        table = tl.load(pos_ptr + t).to(tl.int64) * S  # the position's row of the tables
        cos1 = tl.load(cos_ptr + table + d, mask=d < half, other=0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + half + d, mask=d < half, other=0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + d, mask=d < half, other=0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + half + d, mask=d < half, other=0).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        dest = h * OUT_HEAD + (table if CACHE else t * H * S)  # [HEADS, 1]: each head's row of out
        tl.store(out_ptr + dest + d, _rounded_sum(a * cos1, -b * sin1, x1.dtype), mask=inside)
        tl.store(out_ptr + dest + half + d, _rounded_sum(b * cos2, a * sin2, x1.dtype), mask=inside)
        if CACHE:
            tl.store(v_out_ptr + dest + d, tl.load(v_ptr + row + d, mask=inside, other=0), mask=inside)
            tl.store(v_out_ptr + dest + half + d, tl.load(v_ptr + row + half + d, mask=inside, other=0), mask=inside)

    @triton.jit
    def _rounded_sum(by_cos, by_sin, dtype: tl.constexpr):
        """by_cos + by_sin rounded where transformers' steps round: each product to `dtype`, then their sum."""
        return (by_cos.to(dtype).to(tl.float32) + by_sin.to(dtype).to(tl.float32)).to(dtype)
