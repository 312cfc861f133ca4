"""The quantized linear forward.

A few tokens against an HQQ weight (a decode step) run the fused dequantize+GEMV kernel
(quant/gemv.py) when the workspace asks for it. Otherwise an HQQ weight with a workspace is dequantized
a tile of output rows at a time (quant.hqq.dequantize_tiles), each multiplied into its columns of the
output: the workspace holds one tile, not the whole weight. Without a workspace, and for NF4, the weight
is dequantized whole into new tensors, then multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quant import gemv
from quant.bnb import NF4Quantized, dequantize_nf4
from quant.hqq import Quantized, Workspace, dequantize, dequantize_tiles, tile_weights


def linear(
    x: Tensor, weight: Tensor | Quantized | NF4Quantized, workspace: Workspace | None = None, out: Tensor | None = None
) -> Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], in x.dtype; written into `out` when given.

    An HQQ weight goes through the fused kernel when `workspace.fused` is set and the kernel serves
    the call; otherwise it is dequantized in tiles into `workspace`'s buffers when one is given, else
    whole into new tensors.
    """
    if isinstance(weight, Quantized):
        if workspace is not None and workspace.fused and gemv.supports(x, weight):
            return gemv.gemv(x, weight, out)
        if workspace is not None:
            return _tiled(x, weight, workspace, out)
        weight = dequantize(weight, x.dtype)
    elif isinstance(weight, NF4Quantized):
        weight = dequantize_nf4(weight, x.dtype)
    if out is None:
        return F.linear(x, weight)
    return torch.matmul(x, weight.T, out=out)


def _tiled(x: Tensor, q: Quantized, workspace: Workspace, out: Tensor | None) -> Tensor:
    """x @ dequantize(q).T a tile at a time: each tile's product goes straight into its columns of `out`
    (a strided view of a row-major matrix, which BLAS and cuBLAS write in place)."""
    n, k = q.shape
    if out is None:
        out = x.new_empty((*x.shape[:-1], n))
    x2, out2 = x.reshape(-1, k), out.view(-1, n)
    for first, weight in dequantize_tiles(q, x.dtype, workspace, tile_weights(x.device)):
        torch.mm(x2, weight.T, out=out2[:, first : first + weight.shape[0]])
    return out
