"""Fused dequantize + GEMV for HQQ weights: y = x @ W.T without ever writing W out.

A decode step multiplies one token by every active expert's three matrices. Dequantizing first
writes each [N, K] weight out in 16-bit and reads it back: for a 2-bit Mixtral expert matrix that is
~235 MB of traffic to use ~15 MB of codes. This Triton kernel reads the packed codes and the
(possibly 8-bit-quantized) scales and zeros in place, and accumulates in float32.

Per group r (g consecutive inputs k of output n), with codes c, zero z and scale s:
    sum_k W[n, k] x[k] = sum_r s_r * (sum_j c_rj x_j - z_r * sum_j x_j)
so the kernel needs one scale and one zero per group, not per weight.

Code layout is hqq's (quant/hqq.py): grid row r = n * K/g + k // g lives in packed row r % step,
at bit slot r // step (highest bits first), column k % g. So one packed element holds the codes of PER
grid rows step apart; when N % PER == 0, step = N/PER * K/g and those rows are outputs n, n + N/PER,
..., n + (PER-1) N/PER at the same k. Two kernels:
  - `_gemv_packed_kernel` (N % PER == 0, every Mixtral shape at 2 and 4 bits): a program takes packed
    rows n < N/PER, reads each element once, contiguously, and makes all PER outputs from it;
  - `_gemv_kernel` (any shape, e.g. 3-bit's padded grid): a program takes consecutive outputs, so it
    reads each element for one of its codes, and PER far-apart programs read the same element.
`gated` runs either kernel on an expert's w1 and w3 at once (GATED): silu(x @ w1.T) * (x @ w3.T) in one launch.

Triton runs on CUDA; tests run the same kernel on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from quant.errors import MoEOffloadError
from quant.files import cache_dir
from quant.hqq import _ROWS_PER_ELEMENT, Quantized, QuantSpec, Workspace, _device, random_quantized
from quant.packing import has_meta_by_row, with_meta_by_row

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton; linear() then dequantizes instead
    triton = None

# What a launch raises where its kernel cannot be built for this GPU (shared memory or registers, ptxas, the
# compiler): `tune` and the benchmarks pass over such a launch. An error at run time (CUDA's) is not among them.
CANNOT_LAUNCH: tuple[type[Exception], ...] = (
    ()
    if triton is None
    else (
        triton.runtime.errors.OutOfResources,
        triton.runtime.errors.PTXASError,
        triton.compiler.errors.CompilationError,
    )
)

MAX_ROWS = 8  # tokens per call the kernel serves; a prefill's matrix product is faster dequantized
BLOCK_N = 16  # _gemv_kernel's outputs per program: small, so a 4096-output matrix spreads over 256 programs
BLOCK_K = 256  # inputs per loop step; a multiple of every supported group size up to 256
# _gemv_packed_kernel's (block_n packed rows, block_k inputs, warps) by bits. 2-bit: the H100 sweep's best
# for Mixtral's w1 (benchmarks/results/h100_9d0bc23/gemv_kernel_h100.json: 69.6 us against 94.2 at
# (4, 1024, 4); w2's best was (1, 2048, 2) at 86.7 us). 3- and 4-bit: about BLOCK_N outputs and 4 KB of
# codes a step, untuned
PACKED_LAUNCH = {2: (2, 512, 2), 3: (2, 512, 4), 4: (8, 512, 4)}
# Both kernels' compile-time variants, against instruction-bound loops (2-bit w1 read ~300 GB/s of codes on
# the H100 before them). LATE_SUM: the K loop keeps a sum per group and reduces over the groups, across
# threads, once at the end (the 2-bit packed loop's sm_90 SASS: 21 SHFL a step -> 1). FAST_CODES: codes to
# float32 by _as_float's magic number, not I2F (that loop: 72 I2F(P) a step -> 0, for 72 FADD). Both on,
# untimed yet: benchmarks/gemv_kernel.py --variants times every combination
LATE_SUM = True
FAST_CODES = True
# K steps whose tiles are in flight at once (tl.range's num_stages): above 1, Triton's pipeliner copies the x and
# code tiles of the next steps into shared memory with cp.async (sm_80 and later) while this one computes, where
# each step otherwise waits a memory latency for its own. The 2-bit packed loop issues ~610 sm_90 instructions a
# step, ~19 us for w1 at an H100's issue rate, against ~70 us measured: it waits more than it computes. A
# stage of the packed kernel's tiles is ~2 KB; _gemv_kernel's 3-bit tile is 16 KB, three stages of which would
# cost occupancy, so it keeps one. Untimed yet: benchmarks/gemv_kernel.py --variants times 1 against 3
PACKED_STAGES = 3
# The packed-row kernel's 2- and 4-bit codes as floats without converting them (_slot_dot): each byte is shifted
# once into the mantissa of 1.0's bits, below its top bit, and one mask a code then reads slot i's code c as the
# float 1 + c 2**-e, exactly. Summed against x and less sum_j x_j, that is 2**-e sum_j c_j x_j. A code costs that
# mask and its product, where as an integer it cost a shift, a mask, an OR and an FADD (or an I2F). The 2-bit
# loop's sm_90 SASS: 657 instructions a step -> 480, 64 registers -> 48 (benchmarks/gemv_sass.py). The
# subtraction cancels up to 2**8 of float32's precision (e = 8 for the lowest slot): with float32 x, up to 3e-5 of
# the largest output on tests/test_gemv.py's shapes (which allow 1e-4), where a bfloat16 output rounds at 4e-3.
# Untimed yet: benchmarks/gemv_kernel.py --variants times it against the integer codes
MANTISSA_CODES = True
# Programs that share each output's K loop (split-K): each sums its own span of K into a float32 partial, and a
# second kernel (_sum_splits_kernel) adds the partials into the output. For shapes with few outputs a program and
# long K loops, such as Mixtral's w2 (4096 x 14336: 512 programs of 28 steps at 2 bits, 0.18 of an H100's wave by
# benchmarks/gemv_sass.py), where each step waits on memory and too few programs are in flight to cover it. 1: no
# split. Untimed yet: `moe-offload tune` times 2, 4 and 8 on each shape
SPLIT_K = 1
SUM_BLOCK = 1024  # _sum_splits_kernel's outputs a program
# Each step's scales and zeros loaded ahead of its codes' sums, not after them. Behind them, the 2-bit packed loop's
# sm_90 SASS issues its 24 meta loads (4 bit slots x the scale's and zero's 8-bit codes and their float16 meta) at
# instructions 268-362 of 429, after the codes' math, so every step waits out their latency; ahead (14-145), that
# math covers it, at the same 429 instructions but 64 registers a thread rather than 48: 16 programs an SM, not 21
# (benchmarks/results/gemv_sass_e933124.json). At the default launch that costs nothing on Mixtral's shapes, whose
# programs all fit on an H100 at once either way (w1 in 0.65 or 0.85 of a wave); at launches of more programs it is
# a trade. Untimed yet: `moe-offload tune` tries both at the launch it finds, benchmarks/gemv_kernel.py --variants
# times it off at the default launch. The loads stay early because the barrier of the x sums' layout conversion
# follows them: with the sums made in the codes' layout instead (no barrier; 418 instructions), ptxas sank them
# back to 273-323 (an ad hoc try, not recorded)
EARLY_META = True
# An expert's w1 and w3 in one launch (`gated`): each program makes the same outputs of both, from one read of x and
# one set of its group sums, with both matrices' tiles in flight, and writes silu(w1 x) * w3 x from float32. Apart,
# a decode step's 2-bit Mixtral expert was two GEMV launches of 0.85 of an H100's wave each, then silu and the
# product as two elementwise kernels over the [1, 14336] results (64 experts a token: 256 launches, 128 of them
# elementwise; benchmarks/results/h100_9d0bc23/profile_decode_h100_graphs.json). The 2-bit packed loop's sm_90 SASS
# at the default launch: 763 instructions a step for both matrices' 128 codes a thread, where apart each took 429
# for 64 (benchmarks/results/gemv_sass_93f22e2.json). Untimed yet: benchmarks/gemv_kernel.py times the pair and the
# expert MLP with it and without; off, expert_mlp launches w1 and w3 apart
GATED = True
# gated's early_meta where not tuned. Early, the 2-bit pair at the default launch holds 96 registers a thread: 10
# programs an SM, and w1's 1792 programs in 1.36 of an H100's waves; late, 64 registers, 16 programs an SM, 0.85 of
# a wave, with the meta loaded after the codes' sums as EARLY_META's comment says (gemv_sass_93f22e2.json, gated).
# Late keeps every program in flight at once, as early does apart; `tune` tries both
GATED_EARLY_META = False
# META_ROWS, the packed-row kernel's reading of scales and zeros by packed row (quant/packing.py, with_meta_by_row),
# where a weight's lie so: a property of the weight, not of the launch. A thread then reads its packed row's PER bit
# slots' scale codes and zero codes in two loads of PER bytes, and the float16 meta of their meta group in four loads
# of PER (one a step where a step's groups lie in one meta group), which Triton's pipeliner copies ahead with the x
# and codes tiles (cp.async). In grid order each is a load of one value, 6 PER a step, issued in the step that uses
# it: the 2-bit packed loop's sm_90 SASS has 24 such loads a step and 429 instructions, by row none and 397; gated
# (at GATED_EARLY_META) 48 and 763, by row none and 711, at the same 64 registers (benchmarks/results/
# gemv_sass_8935bad.json). On a T4 (sm_75, no cp.async) 24 loads a step become 6, and 369 instructions 340
# (gemv_sass_t4_8935bad.json). A load holds its experts so with `meta_rows` (offload/api.py; the CLI's --meta-rows),
# repacking each from its file's grid order; tuned launches are filed by layout (tuning_key)
# load's meta_rows where not given, on CUDA: off until a GPU has timed by row against grid order (benchmarks/
# gemv_kernel.py's meta_by_row rows, and gpu_session.sh's bench-rows step, the whole decode both ways)
META_ROWS_BY_DEFAULT = False
# gemv's launch keywords: a launch shape, then a variant of the kernel
LAUNCH = ("block_n", "block_k", "num_warps", "split_k", "late_sum", "fast_codes", "stages", "mantissa_codes",
          "early_meta")  # fmt: skip
_LAUNCH_KEYS = frozenset(LAUNCH)
FLAGS = ("late_sum", "fast_codes", "mantissa_codes", "early_meta")  # the launch keywords that are true or false
# Launches tuned on a GPU by `moe-offload tune` (quant/gemv_tune.py), one file a GPU, named by its device name:
# gemv runs a matrix shape's where its keywords are left out. Those that ship with the package, then the user's own,
# which win where both tune a shape (user_tuned_folder). Off: the built-in defaults above, which the benchmarks time
TUNED_FOLDER = Path(__file__).with_name("gemv_tuned")
USE_TUNED = True


def supports(x: Tensor, q: Quantized) -> bool:
    """Whether `gemv` serves this call: Triton present, a small batch, and a layout the kernel reads
    (a power-of-two group size dividing BLOCK_K; float or 8-bit meta in grid order; int32 offsets). The device is
    the caller's choice: Workspace.kernel is quant.linear.TRITON on CUDA, or in tests under Triton's interpreter."""
    if triton is None or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[1] != q.shape[1]:
        return False
    g = q.spec.group_size
    if g & (g - 1) or BLOCK_K % g or q.shape[0] * q.shape[1] >= 2**31:
        return False
    # meta in grid order, or by packed row (META_ROWS); the CPU's, by output (quant/packing.py), is a view with rows
    # apart
    return q.spec.meta_bits in (None, 8) and (
        all(meta.codes.is_contiguous() for meta in (q.scale, q.zero) if isinstance(meta, Quantized))
        or has_meta_by_row(q)
    )


def supports_gated(x: Tensor, gate: Quantized, up: Quantized) -> bool:
    """Whether `gated` serves silu(x @ gate.T) * (x @ up.T): GATED, and both matrices ones `gemv` serves, of one
    spec and shape (an expert's w1 and w3), where no first try of gated's failed (gated_first_try)."""
    return (
        gate.spec == up.spec and gate.shape == up.shape and gated_works(x.device, x.dtype, gate.spec)
        and supports(x, gate) and supports(x, up) and _meta_by_row(gate) == _meta_by_row(up)
    )  # fmt: skip


def _meta_by_row(q: Quantized) -> bool:
    """Whether q, which supports() serves, holds its meta by packed row (META_ROWS), not in grid order."""
    return isinstance(q.scale, Quantized) and not q.scale.codes.is_contiguous()


def gated_works(device: torch.device, dtype: torch.dtype, spec: QuantSpec) -> bool:
    """GATED, and no first try of gated failed on `device` for x of `dtype` and matrices of `spec`."""
    return GATED and (_device(device), dtype, spec) not in _gated_failed


# (device, x's dtype, spec) where gated_first_try failed: w1 and w3 launch apart there
_gated_failed: dict[tuple[torch.device, torch.dtype, QuantSpec], str] = {}


def gated_first_try(
    device: torch.device, dtype: torch.dtype, spec: QuantSpec, shape: tuple[int, int], meta_rows: bool = False
) -> str | None:
    """Run `gated` once on a random pair of `spec` and `shape`, with `meta_rows` their meta by packed row (load()
    tries an expert's w1 and w3 on CUDA, as it holds them), against silu of one gemv times the other: None where it
    runs and agrees within bfloat16's rounding of the two products, else why not, and from then on supports_gated is
    off for this device, dtype and spec, so that w1 and w3 launch apart (a Triton too old or too new for the GPU,
    say, must not stop decode)."""
    generator = torch.Generator(device).manual_seed(0)
    w1, w3 = (random_quantized(shape, spec, generator) for _ in range(2))
    if meta_rows:
        w1, w3 = with_meta_by_row(w1), with_meta_by_row(w3)
    x = torch.randn(1, shape[1], generator=generator, device=device).to(dtype)
    if not supports_gated(x, w1, w3):
        return None  # nothing to try: gated would not be asked
    try:
        got = gated(x, w1, w3).float()
        first, second = gemv(x, w1).float(), gemv(x, w3).float()
    except Exception as error:  # noqa: BLE001 -- any failure means one thing: launch w1 and w3 apart
        why = f"{type(error).__name__}: {error}"
    else:
        expected = torch.nn.functional.silu(first) * second
        agrees = (got - expected).abs().max() <= 2e-2 * expected.abs().max()
        why = None if agrees else "its result differs from the two launches'"
    if why is not None:
        _gated_failed[_device(device), dtype, spec] = why
    return why


def _rows_together(q: Quantized) -> int:
    """Outputs made from each packed element a program reads: PER when N % PER == 0 (the packed-row
    kernel), else 1 (_gemv_kernel; 8-bit, one code per byte, is the same either way)."""
    per = _ROWS_PER_ELEMENT[q.spec.bits]
    return per if q.shape[0] % per == 0 else 1


def reads_bytes(q: Quantized) -> bool:
    """Whether the packed-row kernel takes q from bytes (2 and 4 bits), where MANTISSA_CODES applies."""
    return _rows_together(q) > 1 and q.codes.dtype == torch.uint8


def default_variant(q: Quantized) -> tuple[bool, bool, int, bool]:
    """(late_sum, fast_codes, stages, mantissa_codes): the variant gemv runs q in where its keywords are left out."""
    packed = _rows_together(q) > 1
    return LATE_SUM, FAST_CODES, PACKED_STAGES if packed else 1, MANTISSA_CODES and reads_bytes(q)


def user_tuned_folder() -> Path:
    """Where `moe-offload tune` writes: the cache's gemv-tuned (by default ~/.cache/moe-offload/gemv-tuned)."""
    return cache_dir() / "gemv-tuned"


def user_tuned_file(device: str) -> Path:
    """The file `tune` writes for the GPU named `device` (device_name), in user_tuned_folder()."""
    return user_tuned_folder() / tuned_file_name(device)


def device_name(device: torch.device) -> str:
    """The name tuned launches are filed under: CUDA's name for the GPU ("NVIDIA H100 80GB HBM3"), or "cpu" (the
    tests' interpreted kernel)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tuned_file_name(device: str) -> str:
    """A GPU's tuned launches' file name: "NVIDIA_H100_80GB_HBM3.json"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_") + ".json"


@functools.lru_cache(maxsize=256)
def tuning_key(
    spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype, gated: bool = False, meta_rows: bool = False
) -> str:
    """What a tuned launch is filed under: "2-bit g16, 8-bit meta g128 14336x4096 bfloat16" (x's dtype), `gated`'s
    pairs of that shape under "gated 2-bit g16, ..." (twice the tiles a program: launched apart), and matrices with
    their meta by packed row (META_ROWS: other loads, another kernel) under "..., meta by row"."""
    key = f"{'gated ' * gated}{spec.describe()} {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    return key + ", meta by row" * meta_rows


def _check_launch(launch: object) -> str | None:
    """What is wrong with a tuned file's launch, or None."""
    if not isinstance(launch, dict):
        return "a launch is not an object"
    for key in LAUNCH:
        value = launch.get(key)
        if key in FLAGS:
            if not isinstance(value, bool):
                return f"{key} is {value!r}, not true or false"
        elif type(value) is not int or value < 1 or (key != "stages" and value & (value - 1)):
            return f"{key} is {value!r}, not a positive whole number" + ("" if key == "stages" else ", a power of two")
    return None


def read_tuned_record(path: Path, device: str) -> dict:
    """A tuned file as `tune` wrote it (its launches with their timings, and what made them), checked: or a one-line
    error naming the file, unreadable, not what `tune` writes, or tuned on another GPU than `device`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MoEOffloadError(f"{path}: cannot read tuned GEMV launches ({error}); delete it, or run "
                              "`moe-offload tune` again") from None  # fmt: skip
    launches = record.get("launches") if isinstance(record, dict) else None
    if isinstance(launches, dict):
        problem = next(filter(None, map(_check_launch, launches.values())), None)
    else:
        problem = "no launches"
    if problem is None and record.get("device") != device:
        problem = f"tuned on {record.get('device')!r}, not on this {device!r}"
    if problem is not None:
        raise MoEOffloadError(f"{path} is not a tuned GEMV file for this GPU: {problem}; delete it, or run "
                              "`moe-offload tune` again")  # fmt: skip
    return record


def read_tuned(path: Path, device: str) -> dict[str, dict]:
    """A tuned file's launches by tuning_key: gemv's keywords alone (read_tuned_record's errors)."""
    launches = read_tuned_record(path, device)["launches"]
    return {key: {name: launch[name] for name in LAUNCH} for key, launch in launches.items()}


_tuned: dict[torch.device, dict[str, dict]] = {}  # by device: read once, and again after forget_tuned()


def tuned_launches(device: torch.device) -> dict[str, dict]:
    """The launches tuned for `device`'s GPU, by tuning_key: the package's file for it, then the user's, which wins
    a shape both have. Empty where neither tuned it."""
    if device not in _tuned:
        name, launches = device_name(device), {}
        for folder in (TUNED_FOLDER, user_tuned_folder()):
            path = folder / tuned_file_name(name)
            if path.is_file():
                launches.update(read_tuned(path, name))
        _tuned[device] = launches
    return _tuned[device]


def forget_tuned() -> None:
    """Read the tuned files again at the next call: `tune` has written one."""
    _tuned.clear()


def launch(x: Tensor, q: Quantized, *, tuned: bool = True, gated: bool = False, **given) -> dict:
    """gemv's LAUNCH keywords for x @ q.T (or with `gated`, gated's for q and its pair): those `given` (and not None),
    else the launch tuned for q's shape and x's dtype on x's GPU (tuned_launches, while `tuned` and USE_TUNED), else
    the defaults: PACKED_LAUNCH[bits] (the packed-row kernel's) or BLOCK_N and BLOCK_K on 4 warps, SPLIT_K,
    default_variant(q) and EARLY_META (gated: GATED_EARLY_META)."""
    assert given.keys() <= _LAUNCH_KEYS, given.keys() - _LAUNCH_KEYS
    shape = PACKED_LAUNCH[q.spec.bits] if _rows_together(q) > 1 else (BLOCK_N, BLOCK_K, 4)
    early_meta = GATED_EARLY_META if gated else EARLY_META
    chosen = dict(zip(LAUNCH, (*shape, SPLIT_K, *default_variant(q), early_meta), strict=True))
    if tuned and USE_TUNED and any(given.get(key) is None for key in LAUNCH):
        if launches := tuned_launches(x.device):
            chosen.update(launches.get(tuning_key(q.spec, tuple(q.shape), x.dtype, gated, _meta_by_row(q)), ()))
    chosen.update((key, value) for key, value in given.items() if value is not None)
    chosen["mantissa_codes"] = chosen["mantissa_codes"] and reads_bytes(q)
    return chosen


def gemv(
    x: Tensor, q: Quantized, out: Tensor | None = None, workspace: Workspace | None = None, *,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None, split_k: int | None = None,
    late_sum: bool | None = None, fast_codes: bool | None = None, stages: int | None = None,
    mantissa_codes: bool | None = None, early_meta: bool | None = None,
) -> Tensor:  # fmt: skip
    """x [M, K] @ dequantize(q).T -> [M, N] in x.dtype, into `out` when given (no allocation then, unless the
    launch splits K and there is no `workspace` to hold the partial sums).

    The keywords are the launch (`launch` resolves those left out: tuned for this GPU by `moe-offload tune`, else
    the defaults). block_n, block_k and num_warps are the launch shape; benchmarks/gemv_kernel.py sweeps them.
    block_n counts packed rows where _rows_together(q) > 1 (each makes that many outputs), else outputs.
    split_k > 1 splits each output's K loop over that many programs (SPLIT_K), whose float32 partials a second
    kernel adds (the sum's order changes, by float32 rounding).
    late_sum, fast_codes and mantissa_codes pick the kernel's variant (fast_codes changes no bit of the result,
    late_sum the order of its sum, mantissa_codes its rounding, as MANTISSA_CODES says, and only where
    reads_bytes(q)). stages is how many K steps' tiles are in flight, and early_meta (EARLY_META) loads each step's
    scales and zeros ahead of its codes' sums (neither changes a bit of the result).
    """
    chosen = launch(x, q, block_n=block_n, block_k=block_k, num_warps=num_warps, split_k=split_k, late_sum=late_sum,
                    fast_codes=fast_codes, stages=stages, mantissa_codes=mantissa_codes,
                    early_meta=early_meta)  # fmt: skip
    return _run(x, q, None, out, workspace, chosen)


def gated(
    x: Tensor, gate: Quantized, up: Quantized, out: Tensor | None = None, workspace: Workspace | None = None, **given
) -> Tensor:
    """silu(x @ dequantize(gate).T) * (x @ dequantize(up).T) -> [M, N] in x.dtype, in one launch (GATED): an expert's
    w1 and w3, as supports_gated says. Both products and the gate are float32 until the one rounding to x.dtype.
    `given` are gemv's launch keywords, resolved by `launch` for the pair (tuned apart from gemv's); the same launch
    runs both matrices, so that each program makes the same outputs of both."""
    assert supports_gated(x, gate, up), (tuple(x.shape), gate.shape, up.shape, gate.spec, up.spec)
    return _run(x, gate, up, out, workspace, launch(x, gate, gated=True, **given))


def _meta(q: Quantized) -> tuple[tuple[Tensor, ...], int]:
    """q's scales and zeros as the kernels take them: six tensors (the scale's codes, their scale and zero, then the
    zero's), and the meta's group size. Float meta is its own codes: the kernels read only the first of each three."""
    if isinstance(q.scale, Quantized):
        scale, zero = q.scale, q.zero
        return (scale.codes, scale.scale, scale.zero, zero.codes, zero.scale, zero.zero), scale.spec.group_size
    return (q.scale, q.scale, q.scale, q.zero, q.zero, q.zero), 1


def _run(x: Tensor, q: Quantized, up: Quantized | None, out: Tensor | None, workspace: Workspace | None,
         chosen: dict) -> Tensor:  # fmt: skip
    """x @ q.T, or with `up` silu(x @ q.T) * (x @ up.T), at the launch `chosen` (all of LAUNCH)."""
    # M = tokens (rows of x), N = outputs, K = inputs
    per = _rows_together(q)
    block_n, block_k, num_warps, split_k, late_sum, fast_codes, stages, mantissa_codes, early_meta = (
        chosen[key] for key in LAUNCH
    )
    assert supports(x, q) and block_k % q.spec.group_size == 0, (tuple(x.shape), q.shape, q.spec, block_k)
    rows, inputs = x.shape
    outputs = q.shape[0]
    if out is None:
        out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    assert out.shape == (rows, outputs) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    x = x.contiguous()
    meta, meta_group = _meta(q)
    # without `up` the kernel reads none of the second matrix's pointers: q's stand in for them
    up_meta = meta if up is None else _meta(up)[0]
    halves = 1 if up is None else 2  # gated: each split's partials of both products
    partial = out  # where the programs write: the output itself, or with split_k float32 partials [split_k, 2?, M, N]
    if split_k > 1:
        shape = (split_k, halves, rows, outputs)
        if workspace is None:
            partial = torch.empty(shape, dtype=torch.float32, device=x.device)
        else:
            partial = workspace.buffer("gemv.split_k", shape, torch.float32, x.device)
    args = (x, q.codes, *meta, (q if up is None else up).codes, *up_meta, out, partial, outputs, inputs,
            q.codes.shape[0])  # fmt: skip
    # the launch tiles the matrix exactly (no ragged program, no ragged step): the loads need no mask
    even = (outputs // per) % block_n == 0 and inputs % block_k == 0
    constants = dict(
        BITS=q.spec.bits, PER=_ROWS_PER_ELEMENT[q.spec.bits], GROUP=q.spec.group_size,
        QUANTIZED_META=isinstance(q.scale, Quantized), META_GROUP=meta_group,
        BLOCK_N=block_n, BLOCK_K=block_k, GB=block_k // q.spec.group_size, num_warps=num_warps, SPLIT_K=split_k,
        EVEN=even, LATE_SUM=late_sum, FAST_CODES=fast_codes, STAGES=stages, EARLY_META=early_meta, GATED=up is not None,
    )  # fmt: skip
    if per > 1:
        grid = (triton.cdiv(outputs // per, block_n), rows, split_k)
        _gemv_packed_kernel[grid](*args, PER_P2=triton.next_power_of_2(per), MANTISSA_CODES=mantissa_codes,
                                  META_ROWS=_meta_by_row(q), **constants)  # fmt: skip
    else:
        _gemv_kernel[(triton.cdiv(outputs, block_n), rows, split_k)](*args, **constants)
    if split_k > 1:
        size = rows * outputs
        _sum_splits_kernel[(triton.cdiv(size, SUM_BLOCK),)](partial, out, size, SPLIT_K=split_k, HALVES=halves,
                                                            BLOCK=SUM_BLOCK)  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _as_float(c, FAST: tl.constexpr):
        """Non-negative integer codes (below 2**23) as float32, exactly. FAST: an OR and an FADD at full
        rate, where .to(tl.float32) is an I2F at 1/8 of FMA throughput on Hopper: 0x4B000000 | c is the
        float 2**23 + c (c fills the mantissa), and subtracting 2**23 leaves c."""
        if FAST:
            value = (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            value = c.to(tl.float32)
        return value

    @triton.jit
    def _slot_dot(packed, xk, xs, LOW: tl.constexpr, BITS: tl.constexpr, MANTISSA: tl.constexpr, FAST: tl.constexpr):
        """sum_j c_j x_j [BN, GB] of the codes at bits LOW.. of packed [BN, GB, G], against xk [GB, G] whose sums
        are xs [GB]. MANTISSA (MANTISSA_CODES): packed holds each byte at bits 15..22 of float32's 1.0, 0x3F800000
        (exponent 127, mantissa 0), so a mask that keeps 1.0's bits reads a code c as the float 1 + c 2**-e, with
        e = 8 - LOW; summed against x, less xs, that is 2**-e sum_j c_j x_j, and the scaling back is exact."""
        if MANTISSA:
            one_plus = (packed & ((((1 << BITS) - 1) << (15 + LOW)) | 0x3F800000)).to(tl.float32, bitcast=True)
            cx = (tl.sum(one_plus * xk[None, :, :], axis=2) - xs[None, :]) * (1 << (8 - LOW))
        else:
            code = _as_float((packed >> LOW) & ((1 << BITS) - 1), FAST)  # [BN, GB, G]
            cx = tl.sum(code * xk[None, :, :], axis=2)
        return cx

    @triton.jit
    def _k_span(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """The inputs [start, end) this program's K loop covers: all of K, or with SPLIT_K its program_id(2)'s share,
        whole steps of BLOCK_K (the last shares may be short, or empty)."""
        if SPLIT_K == 1:
            start, end = 0, K
        else:
            span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            start = tl.program_id(2) * span
            end = tl.minimum(K, start + span)
        return start, end

    @triton.jit
    def _load(pointer, mask, EVEN: tl.constexpr):
        """tl.load under `mask` (0 where it is off), or with EVEN (the launch tiles the matrix exactly) unmasked: no
        predicate to compute and no register to zero a load, where a mask cost the 2-bit loop 44 of its 480 sm_90
        instructions a step."""
        if EVEN:
            value = tl.load(pointer)
        else:
            value = tl.load(pointer, mask=mask, other=0)
        return value

    @triton.jit
    def _silu(a):
        """silu(a) = a sigmoid(a), in float32."""
        return a * tl.sigmoid(a)

    @triton.jit
    def _store(out_ptr, partial_ptr, m, N, outputs, acc, mask, SPLIT_K: tl.constexpr, HALF: tl.constexpr,
               HALVES: tl.constexpr):  # fmt: skip
        """acc (float32) into out, in its dtype; or with SPLIT_K into this program's float32 partial, half HALF of
        [SPLIT_K, HALVES, M, N] (HALVES: 2 where the kernel is gated, whose two products are summed apart)."""
        if SPLIT_K == 1:
            tl.store(out_ptr + m * N + outputs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            split = tl.program_id(2) * HALVES + HALF
            tl.store(partial_ptr + (split * tl.num_programs(1) + m) * N + outputs, acc, mask=mask)

    @triton.jit
    def _finish(out_ptr, partial_ptr, m, N, outputs, acc, acc_up, mask, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
        """A program's sums into out: acc, or GATED silu(acc) * acc_up; with SPLIT_K, both partials as they are."""
        if GATED and SPLIT_K == 1:
            _store(out_ptr, partial_ptr, m, N, outputs, _silu(acc) * acc_up, mask, SPLIT_K, 0, 1)
        elif GATED:
            _store(out_ptr, partial_ptr, m, N, outputs, acc, mask, SPLIT_K, 0, 2)
            _store(out_ptr, partial_ptr, m, N, outputs, acc_up, mask, SPLIT_K, 1, 2)
        else:
            _store(out_ptr, partial_ptr, m, N, outputs, acc, mask, SPLIT_K, 0, 1)

    @triton.jit
    def _sum_splits_kernel(partial_ptr, out_ptr, SIZE, SPLIT_K: tl.constexpr, HALVES: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
        """out = the sum of the SPLIT_K partials [SPLIT_K, SIZE], in out's dtype; HALVES = 2 (gated): silu of the sum
        of the first halves of [SPLIT_K, 2, SIZE] times the sum of the second."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < SIZE
        acc = tl.load(partial_ptr + i, mask=ok, other=0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(partial_ptr + s * HALVES * SIZE + i, mask=ok, other=0)
        if HALVES == 2:
            up = tl.load(partial_ptr + SIZE + i, mask=ok, other=0)
            for s in tl.static_range(1, SPLIT_K):
                up += tl.load(partial_ptr + (s * HALVES + 1) * SIZE + i, mask=ok, other=0)
            acc = _silu(acc) * up
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _group_meta(
        r, mask, codes, scale, zero, QUANTIZED: tl.constexpr, META_GROUP: tl.constexpr, FAST_CODES: tl.constexpr,
        EVEN: tl.constexpr,
    ):  # fmt: skip
        """A group's scale (or zero) in float32: stored float16, or 8-bit codes with their own meta."""
        if QUANTIZED:
            c = _as_float(_load(codes + r, mask, EVEN), FAST_CODES)
            meta = r.to(tl.uint32) // META_GROUP  # r >= 0: a shift, where int32's division rounds toward zero
            z = _load(zero + meta, mask, EVEN).to(tl.float32)
            s = _load(scale + meta, mask, EVEN).to(tl.float32)
            value = (c - z) * s
        else:
            value = _load(codes + r, mask, EVEN).to(tl.float32)
        return value

    @triton.jit
    def _scale_zero(
        r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
        QUANTIZED: tl.constexpr, META_GROUP: tl.constexpr, FAST_CODES: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """Grid rows r's scales and zeros in float32 (_group_meta)."""
        s = _group_meta(r, mask, scale_codes, scale_scale, scale_zero, QUANTIZED, META_GROUP, FAST_CODES, EVEN)
        z = _group_meta(r, mask, zero_codes, zero_scale, zero_zero, QUANTIZED, META_GROUP, FAST_CODES, EVEN)
        return s, z

    @triton.jit
    def _grid_step(
        acc, codes_ptr, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero, r, mask, xk, xs, j,
        STEP, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr, QUANTIZED_META: tl.constexpr,
        META_GROUP: tl.constexpr, EVEN: tl.constexpr, LATE_SUM: tl.constexpr, FAST_CODES: tl.constexpr,
        EARLY_META: tl.constexpr,
    ):  # fmt: skip
        """acc plus _gemv_kernel's K step of one matrix: grid rows r [BN, GB], against xk [GB, G], xs its sums."""
        address = (r % STEP) * GROUP  # hqq packs grid row r into packed row r % STEP, bit slot r // STEP
        packed = _load(codes_ptr + address[:, :, None] + j[None, None, :], mask[:, :, None], EVEN)
        if EARLY_META:  # loaded ahead of the codes' sums, whose math then covers their wait
            s, z = _scale_zero(r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
                               QUANTIZED_META, META_GROUP, FAST_CODES, EVEN)  # fmt: skip
        # [BN, GB] int32, as the shifted codes are. A masked lane's row may lie past the last slot: its shift is held
        # at 0, not negative (LLVM makes a negative shift poison; its codes are masked, and meet a zero scale)
        shift = (PER - 1 - tl.minimum(r // STEP, PER - 1)) * BITS
        code = _as_float((packed >> shift[:, :, None]) & ((1 << BITS) - 1), FAST_CODES)  # [BN, GB, G]
        cx = tl.sum(code * xk[None, :, :], axis=2)  # [BN, GB]: sum_j c_j x_j
        if not EARLY_META:
            s, z = _scale_zero(r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
                               QUANTIZED_META, META_GROUP, FAST_CODES, EVEN)  # fmt: skip
        part = s * (cx - z * xs[None, :])  # [BN, GB]
        if LATE_SUM:
            acc += part
        else:
            acc += tl.sum(part, axis=1)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, codes_ptr,
        scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
        up_codes, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes, up_zero_scale, up_zero_zero,
        out_ptr, partial_ptr,
        N, K, STEP,
        BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
        QUANTIZED_META: tl.constexpr, META_GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GB: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
        LATE_SUM: tl.constexpr, FAST_CODES: tl.constexpr, STAGES: tl.constexpr, EARLY_META: tl.constexpr,
        GATED: tl.constexpr,
    ):  # fmt: skip
        # one program: BLOCK_N outputs of one row of x, looping over K (its share, _k_span) in BLOCK_K steps, held as
        # [BLOCK_N, GB, GROUP] tiles (GB = BLOCK_K // GROUP groups per step): index math once per group. GATED: the
        # same outputs of the second matrix (up_*) too, from the same x tiles, and silu(first) * second
        m = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = n < N
        j = tl.arange(0, GROUP)  # [G] position inside a group
        groups_per_row = K // GROUP
        # LATE_SUM: a sum per group, [BN, GB], reduced over the groups (across threads) once after the loop
        acc = tl.zeros([BLOCK_N, GB] if LATE_SUM else [BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, GB] if LATE_SUM else [BLOCK_N], dtype=tl.float32)
        k_start, k_end = _k_span(K, BLOCK_K, SPLIT_K)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            g = k0 // GROUP + tl.arange(0, GB)  # [GB] group of the row
            g_ok = g < groups_per_row
            xk = _load(x_ptr + m * K + g[:, None] * GROUP + j[None, :], g_ok[:, None], EVEN).to(tl.float32)  # [GB, G]
            r = n[:, None] * groups_per_row + g[None, :]  # [BN, GB] grid row of each group
            mask = n_ok[:, None] & g_ok[None, :]
            xs = tl.sum(xk, axis=1)  # [GB]: sum_j x_j, once for both matrices
            acc = _grid_step(acc, codes_ptr, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
                             r, mask, xk, xs, j, STEP, BITS, PER, GROUP, QUANTIZED_META, META_GROUP, EVEN, LATE_SUM,
                             FAST_CODES, EARLY_META)  # fmt: skip
            if GATED:
                acc_up = _grid_step(acc_up, up_codes, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes,
                                    up_zero_scale, up_zero_zero, r, mask, xk, xs, j, STEP, BITS, PER, GROUP,
                                    QUANTIZED_META, META_GROUP, EVEN, LATE_SUM, FAST_CODES, EARLY_META)  # fmt: skip
        if LATE_SUM:
            acc = tl.sum(acc, axis=1)  # [BN]
            acc_up = tl.sum(acc_up, axis=1)
        _finish(out_ptr, partial_ptr, m, N, n, acc, acc_up, n_ok, SPLIT_K, GATED)

    @triton.jit
    def _codes_tile(codes_ptr, p, mask, j, GROUP: tl.constexpr, EVEN: tl.constexpr, FAST_CODES: tl.constexpr,
                    MANTISSA_CODES: tl.constexpr):  # fmt: skip
        """_gemv_packed_kernel's step of codes [BN, GB, G] from packed rows p [BN, GB], as _slot_dot reads them."""
        packed = _load(codes_ptr + p[:, :, None] * GROUP + j[None, None, :], mask[:, :, None], EVEN)
        if MANTISSA_CODES:
            packed = (packed.to(tl.int32) << 15) | 0x3F800000  # each byte into 1.0's mantissa, once (_slot_dot)
        elif FAST_CODES:
            packed = packed.to(tl.int32)  # widened once; every bit slot shifts and masks in 32 bits
        return packed

    @triton.jit
    def _pair_meta(
        r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
        up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes, up_zero_scale, up_zero_zero,
        QUANTIZED_META: tl.constexpr, META_GROUP: tl.constexpr, FAST_CODES: tl.constexpr, EVEN: tl.constexpr,
        GATED: tl.constexpr,
    ):  # fmt: skip
        """Grid rows r's scales and zeros (_scale_zero), and GATED the second matrix's: s, z, s_up, z_up (without
        GATED, s and z again, unread)."""
        s, z = _scale_zero(r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
                           QUANTIZED_META, META_GROUP, FAST_CODES, EVEN)  # fmt: skip
        s_up, z_up = s, z
        if GATED:
            s_up, z_up = _scale_zero(r, mask, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes,
                                     up_zero_scale, up_zero_zero, QUANTIZED_META, META_GROUP, FAST_CODES,
                                     EVEN)  # fmt: skip
        return s, z, s_up, z_up

    @triton.jit
    def _into_slot(acc, part, slot, i, LATE_SUM: tl.constexpr):
        """acc plus one bit slot's sums part [BN, GB] in its column i: acc [BN, GB, P] with LATE_SUM, else [BN, P]."""
        if LATE_SUM:
            acc += tl.where(slot[None, None, :] == i, part[:, :, None], 0.0)
        else:
            acc += tl.where(slot[None, :] == i, tl.sum(part, axis=1)[:, None], 0.0)
        return acc

    @triton.jit
    def _row_meta(p, mask, first, first_ok, slot, codes, meta, PER: tl.constexpr, META_GROUP: tl.constexpr,
                  ONE_META_GROUP: tl.constexpr, FAST_CODES: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
        """Packed rows p's [BN, GB] scales and zeros of every bit slot [BN, GB, P] in float32, from meta by packed row
        (quant/packing.py, with_meta_by_row): `codes` [STEP, 2, P] (slots' scale codes, then zero codes) and `meta`
        [STEP / META_GROUP, 4, P] float16 (the scales' scale and zero, the zeros' scale and zero). Each load is a
        thread's P slots at once, which the pipeliner copies ahead with the codes' tiles. ONE_META_GROUP: the step's
        packed rows of an output lie in one meta group, that of `first` [BN, 1], so that its meta is read once."""
        row = p[:, :, None] * (2 * PER) + slot[None, None, :]  # [BN, GB, P]
        if ONE_META_GROUP:
            group, group_ok = first[:, :, None], first_ok[:, :, None]  # [BN, 1, 1]
        else:
            group, group_ok = p[:, :, None], mask[:, :, None]
        group = (group.to(tl.uint32) // META_GROUP).to(tl.int32) * (4 * PER) + slot[None, None, :]
        mask = mask[:, :, None]
        s = (_as_float(_load(codes + row, mask, EVEN), FAST_CODES)
             - _load(meta + group + PER, group_ok, EVEN).to(tl.float32)
             ) * _load(meta + group, group_ok, EVEN).to(tl.float32)  # fmt: skip
        z = (_as_float(_load(codes + row + PER, mask, EVEN), FAST_CODES)
             - _load(meta + group + 3 * PER, group_ok, EVEN).to(tl.float32)
             ) * _load(meta + group + 2 * PER, group_ok, EVEN).to(tl.float32)  # fmt: skip
        return s, z

    @triton.jit
    def _pair_row_meta(p, mask, first, first_ok, slot, codes, meta, up_codes, up_meta, PER: tl.constexpr,
                       META_GROUP: tl.constexpr, ONE_META_GROUP: tl.constexpr, FAST_CODES: tl.constexpr,
                       EVEN: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
        """_row_meta of the matrix, and GATED of the second: s, z, s_up, z_up (without GATED, s and z again)."""
        s, z = _row_meta(p, mask, first, first_ok, slot, codes, meta, PER, META_GROUP, ONE_META_GROUP, FAST_CODES,
                         EVEN)  # fmt: skip
        s_up, z_up = s, z
        if GATED:
            s_up, z_up = _row_meta(p, mask, first, first_ok, slot, up_codes, up_meta, PER, META_GROUP, ONE_META_GROUP,
                                   FAST_CODES, EVEN)  # fmt: skip
        return s, z, s_up, z_up

    @triton.jit
    def _slots_dot(packed, xk, xs, slot, BITS: tl.constexpr, PER: tl.constexpr, MANTISSA: tl.constexpr,
                   FAST: tl.constexpr):  # fmt: skip
        """_slot_dot of every bit slot, as [BN, GB, P]: slot i's sums in column i."""
        cx = _slot_dot(packed, xk, xs, 0, BITS, MANTISSA, FAST)[:, :, None]  # the last slot's: the lowest bits
        for i in tl.static_range(PER - 1):
            cx = tl.where(slot[None, None, :] == i, _slot_dot(packed, xk, xs, (PER - 1 - i) * BITS, BITS, MANTISSA,
                                                              FAST)[:, :, None], cx)  # fmt: skip
        return cx

    @triton.jit
    def _into_slots(acc, part, LATE_SUM: tl.constexpr):
        """acc plus every bit slot's sums part [BN, GB, P]: acc [BN, GB, P] with LATE_SUM, else [BN, P]."""
        if LATE_SUM:
            acc += part
        else:
            acc += tl.sum(part, axis=1)
        return acc

    @triton.jit
    def _packed_step(
        acc, acc_up, packed, packed_up,
        scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
        up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes, up_zero_scale, up_zero_zero,
        p, mask, first, first_ok, xk, xs, slot,
        STEP, BITS: tl.constexpr, PER: tl.constexpr, QUANTIZED_META: tl.constexpr, META_GROUP: tl.constexpr,
        ONE_META_GROUP: tl.constexpr,
        EVEN: tl.constexpr, LATE_SUM: tl.constexpr, FAST_CODES: tl.constexpr, MANTISSA_CODES: tl.constexpr,
        EARLY_META: tl.constexpr, GATED: tl.constexpr, META_ROWS: tl.constexpr,
    ):  # fmt: skip
        """acc (and GATED acc_up) plus _gemv_packed_kernel's K step, from the codes tiles `packed` (and `packed_up`:
        _codes_tile). A slot at a time, the two matrices side by side, so that EARLY_META issues both's meta loads
        ahead of either's sums. META_ROWS: every slot's sums, then every slot's meta at once (_row_meta)."""
        if META_ROWS:
            if EARLY_META:
                s, z, s_up, z_up = _pair_row_meta(p, mask, first, first_ok, slot, scale_codes, scale_scale,
                                                  up_scale_codes, up_scale_scale, PER, META_GROUP, ONE_META_GROUP,
                                                  FAST_CODES, EVEN, GATED)  # fmt: skip
            cx = _slots_dot(packed, xk, xs, slot, BITS, PER, MANTISSA_CODES, FAST_CODES)  # [BN, GB, P]
            if GATED:
                cx_up = _slots_dot(packed_up, xk, xs, slot, BITS, PER, MANTISSA_CODES, FAST_CODES)
            if not EARLY_META:
                s, z, s_up, z_up = _pair_row_meta(p, mask, first, first_ok, slot, scale_codes, scale_scale,
                                                  up_scale_codes, up_scale_scale, PER, META_GROUP, ONE_META_GROUP,
                                                  FAST_CODES, EVEN, GATED)  # fmt: skip
            acc = _into_slots(acc, s * (cx - z * xs[None, :, None]), LATE_SUM)
            if GATED:
                acc_up = _into_slots(acc_up, s_up * (cx_up - z_up * xs[None, :, None]), LATE_SUM)
            return acc, acc_up
        for i in tl.static_range(PER):  # bit slot i: its own codes, scales and zeros, its own outputs
            r = p + i * STEP  # [BN, GB] grid row
            if EARLY_META:  # loaded ahead of the codes' sums, whose math then covers their wait
                s, z, s_up, z_up = _pair_meta(r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale,
                                              zero_zero, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes,
                                              up_zero_scale, up_zero_zero, QUANTIZED_META, META_GROUP, FAST_CODES,
                                              EVEN, GATED)  # fmt: skip
            cx = _slot_dot(packed, xk, xs, (PER - 1 - i) * BITS, BITS, MANTISSA_CODES, FAST_CODES)  # [BN, GB]
            if GATED:
                cx_up = _slot_dot(packed_up, xk, xs, (PER - 1 - i) * BITS, BITS, MANTISSA_CODES, FAST_CODES)
            if not EARLY_META:
                s, z, s_up, z_up = _pair_meta(r, mask, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale,
                                              zero_zero, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes,
                                              up_zero_scale, up_zero_zero, QUANTIZED_META, META_GROUP, FAST_CODES,
                                              EVEN, GATED)  # fmt: skip
            acc = _into_slot(acc, s * (cx - z * xs[None, :]), slot, i, LATE_SUM)
            if GATED:
                acc_up = _into_slot(acc_up, s_up * (cx_up - z_up * xs[None, :]), slot, i, LATE_SUM)
        return acc, acc_up

    @triton.jit
    def _gemv_packed_kernel(
        x_ptr, codes_ptr,
        scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
        up_codes, up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes, up_zero_scale, up_zero_zero,
        out_ptr, partial_ptr,
        N, K, STEP,
        BITS: tl.constexpr, PER: tl.constexpr, PER_P2: tl.constexpr, GROUP: tl.constexpr,
        QUANTIZED_META: tl.constexpr, META_GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GB: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
        LATE_SUM: tl.constexpr, FAST_CODES: tl.constexpr, STAGES: tl.constexpr, MANTISSA_CODES: tl.constexpr,
        EARLY_META: tl.constexpr, GATED: tl.constexpr, META_ROWS: tl.constexpr,
    ):  # fmt: skip
        # N % PER == 0, so STEP = N/PER * K/g: packed row p = n * K/g + k // g of an n < N/PER holds, at bit
        # slot i, grid row p + i * STEP, i.e. output n + i * N/PER. One program: BLOCK_N such n (each K
        # contiguous elements), read once in [BLOCK_N, GB, GROUP] tiles, for BLOCK_N * PER outputs. GATED: the
        # same outputs of the second matrix (up_*) too, from the same x tiles and sums, and silu(first) * second
        m = tl.program_id(1)
        per_slot = N // PER  # outputs per bit slot
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] packed row of outputs n + i * per_slot
        n_ok = n < per_slot
        slot = tl.arange(0, PER_P2)  # [P] bit slot; PER_P2 is PER rounded up to a power of two (3-bit: 16)
        j = tl.arange(0, GROUP)  # [G] position inside a group
        groups_per_row = K // GROUP
        # column i sums output n + i * per_slot; LATE_SUM keeps a sum per group, [BN, GB, P], and reduces
        # over the groups (across threads) once after the loop rather than per step and bit slot
        acc = tl.zeros([BLOCK_N, GB, PER_P2] if LATE_SUM else [BLOCK_N, PER_P2], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, GB, PER_P2] if LATE_SUM else [BLOCK_N, PER_P2], dtype=tl.float32)
        k_start, k_end = _k_span(K, BLOCK_K, SPLIT_K)  # all of K, or this program's share of it
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            g = k0 // GROUP + tl.arange(0, GB)  # [GB] group of the row
            g_ok = g < groups_per_row
            xk = _load(x_ptr + m * K + g[:, None] * GROUP + j[None, :], g_ok[:, None], EVEN).to(tl.float32)  # [GB, G]
            xs = tl.sum(xk, axis=1)  # [GB]: sum_j x_j
            p = n[:, None] * groups_per_row + g[None, :]  # [BN, GB] packed row, = grid row of bit slot 0
            first = n[:, None] * groups_per_row + k0 // GROUP  # [BN, 1]: the step's first packed row of each output
            mask = n_ok[:, None] & g_ok[None, :]
            packed = _codes_tile(codes_ptr, p, mask, j, GROUP, EVEN, FAST_CODES, MANTISSA_CODES)
            if GATED:  # both tiles' loads issued before either's math
                packed_up = _codes_tile(up_codes, p, mask, j, GROUP, EVEN, FAST_CODES, MANTISSA_CODES)
            acc, acc_up = _packed_step(
                acc, acc_up, packed, packed_up if GATED else packed,
                scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero,
                up_scale_codes, up_scale_scale, up_scale_zero, up_zero_codes, up_zero_scale, up_zero_zero,
                p, mask, first, n_ok[:, None], xk, xs, slot, STEP, BITS, PER, QUANTIZED_META, META_GROUP,
                META_GROUP % GB == 0, EVEN, LATE_SUM, FAST_CODES,
                MANTISSA_CODES, EARLY_META, GATED, META_ROWS,
            )  # fmt: skip
        if LATE_SUM:
            acc = tl.sum(acc, axis=1)  # [BN, P]
            acc_up = tl.sum(acc_up, axis=1)
        outputs = n[:, None] + slot[None, :] * per_slot  # [BN, P]
        mask = n_ok[:, None] & (slot[None, :] < PER)
        _finish(out_ptr, partial_ptr, m, N, outputs, acc, acc_up, mask, SPLIT_K, GATED)
