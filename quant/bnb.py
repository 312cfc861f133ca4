"""bitsandbytes NF4 for non-expert layers (`--attn-quant bnb`): quantize with bnb, dequantize ourselves.

bnb 0.50 quantizes NF4 on CPU as well as CUDA. Dequantization is ours (table lookup times the
block's absmax, in float32, then cast), bit-exact against `bitsandbytes.functional.dequantize_4bit`,
so reading a checkpoint needs no bnb, and it works on views like `quant.hqq.dequantize`.
bnb is imported only when quantizing: its import logs a warning on machines without its CPU kernels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from quant.errors import MoEOffloadError
from quant.hqq import Workspace

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023), float32 exactly as bnb's get_4bit_type("nf4").
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class NF4Spec:
    blocksize: int = 64  # weights per absmax, over the flattened weight

    def to_dict(self) -> dict:
        return {"method": "bnb-nf4", "blocksize": self.blocksize}

    @classmethod
    def from_dict(cls, d: Mapping) -> NF4Spec:
        return cls(blocksize=int(d["blocksize"]))


@dataclass
class NF4Quantized:
    codes: Tensor  # uint8 [numel/2]: two level indices per byte, high nibble first
    absmax: Tensor  # float32 [numel/blocksize]
    shape: tuple[int, ...]
    spec: NF4Spec


def _bnb_functional():
    """bitsandbytes.functional, imported without its CPU backend's warning that the optional `kernels`
    package is missing (on CPUs with AVX512-BF16): that is for bnb's 4-bit GEMM, which we never call."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        cpu_ops.setLevel(level)
    return functional


def quantize_nf4(weight: Tensor, spec: NF4Spec = NF4Spec()) -> NF4Quantized:
    """NF4-quantize a float weight with bitsandbytes, on its own device. Deterministic."""
    bnb_functional = _bnb_functional()

    if bad := shape_problem(tuple(weight.shape), spec):
        raise MoEOffloadError(f"{bad}; choose another --attn-quant")
    codes, state = bnb_functional.quantize_4bit(
        weight.contiguous(), blocksize=spec.blocksize, compress_statistics=False, quant_type="nf4"
    )
    return NF4Quantized(codes.reshape(-1), state.absmax.float(), tuple(weight.shape), spec)


def shape_problem(shape: tuple[int, ...], spec: NF4Spec) -> str | None:
    """Why a weight of `shape` cannot be NF4-quantized with `spec`, or None where it can."""
    numel = math.prod(shape)
    if numel % spec.blocksize:
        return (f"cannot NF4-quantize a weight of shape {shape}: {numel} weights are not a multiple of block size "
                f"{spec.blocksize}")  # fmt: skip
    return None


def dequantize_nf4(q: NF4Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """levels[code] * absmax in float32, cast to `dtype` (the order bnb uses), reshaped to q.shape.

    Each byte's two levels come from one lookup in a [256, 2] table, by an int32 index a byte: 6 bytes a
    weight in bfloat16 at most, where a 64-bit index a weight would take 8 alone."""
    values = _pairs(q.codes.device).index_select(0, q.codes.int()).view(-1, q.spec.blocksize)  # [blocks, blocksize]
    return values.mul_(q.absmax.view(-1, 1)).to(dtype).view(q.shape)


def _pairs(device: torch.device) -> Tensor:
    """[256, 2] float32: the two levels of each code byte, high nibble first."""
    return torch.tensor([(high, low) for high in NF4_LEVELS for low in NF4_LEVELS], dtype=torch.float32, device=device)


def dequantize_tiles(
    q: NF4Quantized, dtype: torch.dtype, workspace: Workspace, max_weights: int
) -> Iterator[tuple[int, Tensor]]:
    """dequantize_nf4(q) a block of whole output rows at a time, as quant.hqq.dequantize_tiles: yields (first
    row, rows [m, K]) of at most `max_weights` weights (or one row), in workspace buffers that the next tile
    overwrites; the same values, bit for bit. A weight whose rows split an absmax block comes whole."""
    n, k = q.shape
    rows = n if k % q.spec.blocksize else max(1, min(n, max_weights // k))
    device = q.codes.device
    pairs = workspace.constant("nf4.pairs", device, _pairs)
    index = workspace.buffer("nf4.index", (rows * k // 2,), torch.int32, device)
    values = workspace.buffer("nf4.values", (rows * k // 2, 2), torch.float32, device)
    if dtype != torch.float32:  # bnb's order: the product in float32, then the cast
        result = workspace.buffer("nf4.result", (rows * k,), dtype, device)
    for first in range(0, n, rows):
        begin, end = first * k, min(first + rows, n) * k  # weights, over the flattened weight
        part = index[: (end - begin) // 2].copy_(q.codes[begin // 2 : end // 2])
        tile = torch.index_select(pairs, 0, part, out=values[: (end - begin) // 2]).view(-1, q.spec.blocksize)
        tile.mul_(q.absmax[begin // q.spec.blocksize : end // q.spec.blocksize].view(-1, 1))
        if dtype != torch.float32:
            tile = result[: end - begin].copy_(tile.view(-1))
        yield first, tile.view(-1, k)


def to_tensors(q: NF4Quantized, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.nf4": q.codes, f"{prefix}.absmax": q.absmax}


def from_tensors(tensors: Mapping[str, Tensor], prefix: str, spec: NF4Spec, shape) -> NF4Quantized:
    return NF4Quantized(tensors[f"{prefix}.nf4"], tensors[f"{prefix}.absmax"], tuple(shape), spec)


def tensor_shapes(shape: tuple[int, ...], spec: NF4Spec, prefix: str) -> dict[str, tuple[tuple, torch.dtype]]:
    numel = math.prod(shape)
    return {
        f"{prefix}.nf4": ((numel // 2,), torch.uint8),
        f"{prefix}.absmax": ((numel // spec.blocksize,), torch.float32),
    }
