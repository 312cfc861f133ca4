"""The quantized linear forward.

A few tokens against an HQQ weight (a decode step) run a fused dequantize+GEMV kernel when the workspace
carries one: TRITON on CUDA (quant/gemv.py), CPU on the CPU (quant/cpu_gemv.py). Otherwise a quantized
weight (HQQ or NF4) with a workspace is dequantized a tile of output rows at a time
(quant.hqq.dequantize_tiles, quant.bnb.dequantize_tiles), each tile multiplied into its columns of the
output: the workspace holds one tile, not the whole weight. Without a workspace the weight is dequantized
whole into new tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from quant import bnb, cpu_gemv, gemv, hqq
from quant.bnb import NF4Quantized, dequantize_nf4
from quant.hqq import Quantized, Workspace, dequantize, tile_weights

Weight = Tensor | Quantized | NF4Quantized


def map_tensors(weight: Weight, fn: Callable[[Tensor], Tensor]) -> Weight:
    """`weight` with `fn` applied to every tensor in it: a plain one, or an HQQ or NF4 weight's codes and
    meta (an HQQ weight's meta may be quantized in turn)."""
    if isinstance(weight, Tensor):
        return fn(weight)
    if isinstance(weight, NF4Quantized):
        return NF4Quantized(fn(weight.codes), fn(weight.absmax), weight.shape, weight.spec)
    scale, zero = map_tensors(weight.scale, fn), map_tensors(weight.zero, fn)
    return Quantized(fn(weight.codes), scale, zero, weight.shape, weight.spec)


def weight_tensors(weight: Weight) -> Iterator[Tensor]:
    """Every tensor in `weight`, in map_tensors' order: a plain one, or an HQQ or NF4 weight's codes and meta."""
    if isinstance(weight, Tensor):
        yield weight
    elif isinstance(weight, NF4Quantized):
        yield from (weight.codes, weight.absmax)
    else:
        yield weight.codes
        yield from weight_tensors(weight.scale)
        yield from weight_tensors(weight.zero)


def weight_to_tensors(weight: Weight, name: str) -> dict[str, Tensor]:
    """`weight` as a safetensors file holds it: `name` itself for a plain tensor, or an HQQ or NF4 weight's codes
    and meta under `name`'s keys (quant.hqq.to_tensors, quant.bnb.to_tensors)."""
    if isinstance(weight, Tensor):
        return {name: weight}
    if isinstance(weight, NF4Quantized):
        return bnb.to_tensors(weight, name)
    return hqq.to_tensors(weight, name)


def weight_nbytes(weight: Weight) -> int:
    """The bytes of every tensor in `weight`."""
    return sum(tensor.nbytes for tensor in weight_tensors(weight))


@dataclass(frozen=True)
class Kernel:
    """A fused dequantize+GEMV: which calls it serves, and the call (x, q, out, workspace) -> out. `gated`, where the
    kernel has one, makes silu(x @ gate.T) * (x @ up.T) in one call (gate, up: an expert's w1 and w3), and
    `supports_gated` says which pairs it serves."""

    name: str  # as bench's JSON and `info` name it
    supports: Callable[[Tensor, Quantized], bool]
    multiply: Callable[[Tensor, Quantized, Tensor | None, Workspace], Tensor]
    supports_gated: Callable[[Tensor, Quantized, Quantized], bool] = lambda x, gate, up: False
    gated: Callable[[Tensor, Quantized, Quantized, Tensor | None, Workspace], Tensor] | None = None


# Looked up at call time, so that a test's patched gemv.gemv is the one called
TRITON = Kernel(
    "fused dequantize+GEMV (Triton)",
    gemv.supports,
    lambda x, q, out, ws: gemv.gemv(x, q, out, ws),
    lambda x, gate, up: gemv.supports_gated(x, gate, up),
    lambda x, gate, up, out, ws: gemv.gated(x, gate, up, out, ws),
)
CPU = Kernel("fused dequantize+GEMV (C)", cpu_gemv.supports, lambda x, q, out, ws: cpu_gemv.multiply(x, q, out, ws))
DEQUANTIZE = "dequantize in tiles, then matmul"  # what runs without a kernel


def linear(
    x: Tensor, weight: Tensor | Quantized | NF4Quantized, workspace: Workspace | None = None, out: Tensor | None = None
) -> Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], in x.dtype; written into `out` when given.

    An HQQ weight goes through `workspace.kernel` when there is one and it serves the call; otherwise a
    quantized weight is dequantized in tiles into `workspace`'s buffers when one is given, else whole into
    new tensors.
    """
    kernel = workspace.kernel if workspace is not None else None
    if kernel is not None and isinstance(weight, Quantized) and kernel.supports(x, weight):
        return kernel.multiply(x, weight, out, workspace)
    if isinstance(weight, Quantized | NF4Quantized):
        if workspace is not None:
            return _tiled(x, weight, workspace, out)
        weight = dequantize(weight, x.dtype) if isinstance(weight, Quantized) else dequantize_nf4(weight, x.dtype)
    elif weight.dtype != x.dtype:  # a table kept at its checkpoint's width: the CPU's lm_head (offload/decoder.py)
        return _widened(x, weight, workspace, out)
    if out is None:
        return F.linear(x, weight)
    return torch.matmul(x, weight.T, out=out)


def silu_gate(
    x: Tensor, gate: Weight, up: Weight, workspace: Workspace | None = None, out: Tensor | None = None,
    up_out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """silu(x @ gate.T) * (x @ up.T) [..., N] in x.dtype: an expert's w1 and w3, in one call of `workspace.kernel`'s
    `gated` where it serves the pair (quant/gemv.py, gated: float32 until one rounding), else as two `linear`s, the
    silu and the product in place in `out` (`up_out` holds the second product). Written into `out` when given."""
    kernel = workspace.kernel if workspace is not None else None
    if kernel is not None and kernel.gated is not None and isinstance(gate, Quantized) and isinstance(up, Quantized):
        if kernel.supports_gated(x, gate, up):
            return kernel.gated(x, gate, up, out, workspace)
    product = F.silu(linear(x, gate, workspace, out), inplace=True)
    return product.mul_(linear(x, up, workspace, up_out))


def tiles(
    weight: Quantized | NF4Quantized, dtype: torch.dtype, workspace: Workspace, device: torch.device
) -> Iterator[tuple[int, Tensor]]:
    """The weight dequantized a block of output rows at a time, in tiles sized for `device`."""
    if isinstance(weight, Quantized):
        return hqq.dequantize_tiles(weight, dtype, workspace, tile_weights(device))
    # NF4 holds 8 bytes a tile weight (the int32 index, the float32 values, the result) to HQQ's 3 or 5:
    # a quarter of the weights. On CUDA, Mixtral's q_proj comes in 4 tiles of 1024 rows, and k_proj whole
    # shares their buffers: 34 MB, where dequantizing q_proj whole held 101 MB
    return bnb.dequantize_tiles(weight, dtype, workspace, tile_weights(device) // 4)


def _check_shapes(x: Tensor, shape: tuple[int, ...], out: Tensor | None) -> None:
    """x [..., K] times a weight [N, K], into `out` [..., N] when given: mm(out=) would resize a view silently."""
    n, k = shape
    if x.shape[-1] != k or (out is not None and out.shape != (*x.shape[:-1], n)):
        got = "" if out is None else f" into {tuple(out.shape)}"
        raise ValueError(f"linear: x {tuple(x.shape)} times a weight {tuple(shape)}{got}: shapes do not match")


def _tiled(x: Tensor, weight: Quantized | NF4Quantized, workspace: Workspace, out: Tensor | None) -> Tensor:
    """x @ dequantized(weight).T a tile at a time: each tile's product goes straight into its columns of
    `out` (a strided view of a row-major matrix, which BLAS and cuBLAS write in place)."""
    n, k = weight.shape
    _check_shapes(x, weight.shape, out)
    if out is None:
        out = x.new_empty((*x.shape[:-1], n))
    x2, out2 = x.reshape(-1, k), out.view(-1, n)
    for first, rows in tiles(weight, x.dtype, workspace, x.device):
        torch.mm(x2, rows.T, out=out2[:, first : first + rows.shape[0]])
    return out


def _widened(x: Tensor, weight: Tensor, workspace: Workspace | None, out: Tensor | None) -> Tensor:
    """x @ weight.T for a weight narrower than x (float16 or bfloat16 against float32), each weight widened
    exactly: through the C kernel when the workspace carries it and it serves the call (a decode step's lm_head),
    else widened a tile of rows at a time (into `workspace` when given), each tile multiplied into its columns."""
    n, k = weight.shape
    _check_shapes(x, weight.shape, out)
    x2 = x.reshape(-1, k)
    if workspace is not None and workspace.kernel is CPU and cpu_gemv.supports_wide(x2, weight):
        y = cpu_gemv.multiply_wide(x2, weight, None if out is None else out.view(-1, n))
        return y.view(*x.shape[:-1], n) if out is None else out
    if out is None:
        out = x.new_empty((*x.shape[:-1], n))
    out2, rows = out.view(-1, n), max(1, tile_weights(x.device) // k)
    for first in range(0, n, rows):
        tile = weight[first : first + rows]
        if workspace is not None:
            tile = workspace.buffer("linear.widened", (rows, k), x.dtype, x.device)[: tile.shape[0]].copy_(tile)
        torch.mm(x2, tile.to(x.dtype).T, out=out2[:, first : first + tile.shape[0]])
    return out


def workspace_bytes(weights: Iterable[Quantized | NF4Quantized], dtype: torch.dtype, device: torch.device) -> int:
    """The bytes one Workspace holds once `linear` has multiplied by each of `weights` in `dtype` on
    `device` without a fused kernel: its buffers, one set per shape, counted by dequantizing copies on
    the meta device (no memory, no arithmetic)."""
    workspace = Workspace()
    seen = set()
    for weight in weights:
        if (weight.shape, weight.spec) not in seen:
            seen.add((weight.shape, weight.spec))
            on_meta = map_tensors(weight, lambda tensor: torch.empty_like(tensor, device="meta"))  # shapes only
            for _ in tiles(on_meta, dtype, workspace, device):
                pass
    return sum(buffer.nbytes for buffer in workspace._buffers.values())
