"""The quantized linear forward: dequantize to the activation dtype, then one matmul.

The first, simplest correct kernel; a fused dequantize-matmul can replace it behind the same call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from quant.bnb import NF4Quantized, dequantize_nf4
from quant.hqq import Quantized, Workspace, dequantize


def linear(x: Tensor, weight: Tensor | Quantized | NF4Quantized, workspace: Workspace | None = None) -> Tensor:
    """x [..., in] @ weight[out, in].T -> [..., out], in x.dtype.

    An HQQ weight is dequantized into `workspace`'s buffers when one is given, else into new tensors.
    """
    if isinstance(weight, Quantized):
        weight = dequantize(weight, x.dtype, workspace)
    elif isinstance(weight, NF4Quantized):
        weight = dequantize_nf4(weight, x.dtype)
    return F.linear(x, weight)
