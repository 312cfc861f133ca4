"""`moe-offload tune MODEL`: the fused GEMV kernel's fastest launch on this GPU for each shape of MODEL's matrices.

Decode multiplies one token through the Triton kernel (quant/gemv.py) for every expert matrix and every HQQ-quantized
resident one (attention's projections). Its built-in launch was chosen on an H100 for Mixtral's 2-bit w1; other
shapes and other GPUs (a T4 has 40 SMs, not 132, and no cp.async) may run faster in another. This times them on
the GPU at hand (quant/gemv_tune.py) and writes the fastest where gemv reads it for that GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offload.api import kernel_meta_order, resolve_dtype
from offload.convert import Progress, open_source
from offload.planner import resolve_device
from quant import gemv, gemv_tune
from quant.errors import MoEOffloadError
from quant.gemv_tune import Shape
from quant.hqq import Quantized
from quant.packing import ExpertFormat

NO_GPU = (
    "tune times the Triton kernel on a CUDA GPU, and there is none here: on the CPU, decode runs the C kernel, "
    "which has no launch to tune"
)


@dataclass
class Tuned:
    device: str  # the GPU's name, as gemv.device_name gives it
    dtype: str  # x's: "bfloat16"
    results: dict[str, dict]  # gemv_tune.tune's, by tuning key
    path: Path  # where gemv reads them


def kernel_shapes(source, dtype: torch.dtype, meta_order: str = "grid") -> dict[str, Shape]:
    """The spec and shape of every matrix decode multiplies through the kernel, by name: the experts' first
    ("experts.w1+w3", gemv.gated's pair, then "experts.w2", then w1 and w3 alone, which decode multiplies only with
    gemv.GATED off), since a tune cut short keeps the shapes it finished, with their scales and zeros as a load holds
    them in `meta_order` (quant/packing.py); then each HQQ-quantized resident weight ("layers.0.q_proj", ...).
    Float and NF4 weights take no part."""
    shapes = {}
    fmt = source.expert_format(dtype).in_order(meta_order)
    if fmt.spec is not None:
        weights = ExpertFormat._weight_shapes(fmt.hidden_size, fmt.intermediate_size)
        shapes["experts.w1+w3"] = Shape(fmt.spec, weights["w1"], gated=True, meta_rows=fmt.meta_by_row(weights["w1"]))
        for name in ("w2", "w1", "w3"):
            shapes[f"experts.{name}"] = Shape(fmt.spec, weights[name], meta_rows=fmt.meta_by_row(weights[name]))
    for name, weight in source.resident().items():
        if isinstance(weight, Quantized):
            shapes[name] = Shape(weight.spec, tuple(weight.shape))
    return shapes


def tune_model(
    model: str, *, device: str = "auto", dtype: str = "auto", expert_bits: str = "none", attn_bits: str = "none",
    attn_quant: str = "hqq", verify: bool = True, meta_rows: bool | None = None, progress: Progress | None = None,
    about: dict | None = None, timer: gemv_tune.Timer | None = None,
) -> Tuned:  # fmt: skip
    """Tune every shape of `model`'s kernel_shapes on `device` for one token of `dtype`, its experts as a load with
    `meta_rows` holds them (the load options' names and meanings), and save each shape's result where gemv reads it
    as it is done (gemv_tune.save, recording `about`): an interrupted tune (Ctrl-C, a session's time limit) keeps the
    shapes it finished. `timer` stands in for CUDA's (gemv_tune.timed_us), as the tests' does on the interpreter."""
    where = resolve_device(device)
    if timer is None:
        if where.type != "cuda":
            raise MoEOffloadError(NO_GPU)
        if gemv.triton is None:
            raise MoEOffloadError("tune times the Triton kernel, and Triton is not installed: CUDA builds of torch "
                                  "ship it (pip install triton)")  # fmt: skip
        timer = gemv_tune.timed_us
    compute = resolve_dtype(dtype, where)
    source = open_source(model, expert_bits=expert_bits, attn_bits=attn_bits, attn_quant=attn_quant, verify=verify)
    shapes = kernel_shapes(source, compute, kernel_meta_order(meta_rows))
    if not shapes:
        raise MoEOffloadError(f"{model} has no HQQ-quantized matrix for the kernel to multiply: nothing to tune")
    results = gemv_tune.tune(shapes, where, compute, timer=timer, progress=progress,
                             tuned=lambda result: gemv_tune.save(result, where, about or {}))  # fmt: skip
    if not results:
        raise MoEOffloadError(f"the kernel serves none of {model}'s quantized matrices (quant/gemv.py, supports): "
                              "nothing to tune")  # fmt: skip
    name = gemv.device_name(where)
    return Tuned(name, str(compute).removeprefix("torch."), results, gemv.user_tuned_file(name))
