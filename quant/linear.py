"""The quantized linear forward.

A few tokens against an HQQ weight (a decode step) run the fused dequantize+GEMV kernel
(quant/gemv.py) when the workspace asks for it; everything else dequantizes to the activation dtype,
then does one matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quant import gemv
from quant.bnb import NF4Quantized, dequantize_nf4
from quant.hqq import Quantized, Workspace, dequantize


def linear(
    x: Tensor, weight: Tensor | Quantized | NF4Quantized, workspace: Workspace | None = None, out: Tensor | None = None
) -> Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], in x.dtype; written into `out` when given.

    An HQQ weight goes through the fused kernel when `workspace.fused` is set and the kernel serves
    the call; otherwise it is dequantized into `workspace`'s buffers when one is given, else into new
    tensors.
    """
    if isinstance(weight, Quantized):
        if workspace is not None and workspace.fused and gemv.supports(x, weight):
            return gemv.gemv(x, weight, out)
        weight = dequantize(weight, x.dtype, workspace)
    elif isinstance(weight, NF4Quantized):
        weight = dequantize_nf4(weight, x.dtype)
    if out is None:
        return F.linear(x, weight)
    return torch.matmul(x, weight.T, out=out)
