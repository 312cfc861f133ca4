"""Tuning the fused GEMV kernel (quant/gemv.py) for one GPU: variants, then launch shapes, on a model's shapes.

`moe-offload tune MODEL` runs `tune` on every matrix shape decode multiplies through the kernel, and on the experts'
w1 and w3 as gemv.gated's pair (its own launch: twice the tiles a program), and writes what it found to
gemv.user_tuned_folder(), where gemv reads it: from then on, on that GPU, each shape runs its fastest launch. For
each shape, in turn:
  1. the built-in default launch (gemv.launch with nothing tuned);
  2. every variant (VARIANTS: late_sum, fast_codes, stages, mantissa_codes) at the default launch shape;
  3. the fastest of those at every launch shape (LAUNCH_SHAPES: block_n x block_k x num_warps, 36);
  4. the fastest of those with K split over 2, 4 and 8 programs an output (SPLITS, gemv.SPLIT_K);
  5. the fastest of those with the meta loaded ahead of the codes' sums, or after (gemv.EARLY_META);
  6. every variant again at the fastest of those (a variant that lost at one launch may win at another).
About 65 launches a shape, where every variant at every shape would be 432; each compiles in well under a second
(sm_90's, ahead of time on a 2-core CPU: about 0.3 s).
A launch whose result differs from the default launch's by more than rounding is left out (a miscompiled variant
must not win), and so is one that cannot be built (gemv.CANNOT_LAUNCH: shared memory, say). Each time is device
time per call, from a CUDA graph of calls over copies of the weights that together overflow L2 (timed_us), as a
decode step reads its codes from memory.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from quant import gemv
from quant.errors import MoEOffloadError
from quant.files import write_atomically
from quant.hqq import Quantized, QuantSpec, Workspace, quantized_nbytes, random_quantized
from quant.packing import with_meta_by_row

# (late_sum, fast_codes, stages, mantissa_codes): the first three in every combination as integer codes, then with
# codes in the mantissa, where fast_codes is left only the 8-bit meta's conversion
VARIANTS = [(*flags, False) for flags in itertools.product((False, True), (False, True), (1, 3))]
VARIANTS += [(late_sum, True, stages, True) for late_sum in (False, True) for stages in (1, 3)]
KEYWORDS = ("late_sum", "fast_codes", "stages", "mantissa_codes")
# (block_n, block_k, num_warps) choices by kernel: the packed-row kernel's block_n counts packed rows, each making
# PER outputs, so fewer a program; _gemv_kernel's counts outputs
LAUNCH_SHAPES = {
    True: ((1, 2, 4, 8), (512, 1024, 2048), (2, 4, 8)),
    False: ((8, 16, 32, 64), (128, 256, 512), (2, 4, 8)),
}
SPLITS = (2, 4, 8)  # split_k choices, tried at the fastest launch shape
# A launch agrees with the default launch's output within this fraction of its largest value: bfloat16 rounds at
# 2**-8 (4e-3), and the variants round differently (mantissa_codes: gemv.MANTISSA_CODES)
AGREE = 1e-2


class Shape(NamedTuple):
    """What `tune` times: a matrix's spec and shape [N, K], or with `gated` gemv.gated's pair of two such matrices;
    with `meta_rows`, their scales and zeros by packed row (quant/packing.py, with_meta_by_row), as a load with
    meta_rows holds an expert's."""

    spec: QuantSpec
    shape: tuple[int, int]
    gated: bool = False
    meta_rows: bool = False


Timer = Callable[[list], float]  # device microseconds per call of `calls`, taken in turn
Progress = Callable[[str, int, int], None]  # (what, done, total), as offload.convert.Progress


def timed_us(calls: list, repeats: int = 50) -> float:
    """Device microseconds per call: `repeats` calls, taking `calls` in turn, captured back to back in a
    CUDA graph; the median of 5 replays, timed with CUDA events, over `repeats`. Host work (Triton's launch
    costs tens of us a call) is left out, as in a decode step replayed from a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # outside the graph: Triton compiles, the workspace makes its buffers
            call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(repeats):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / repeats)
    return sorted(times)[len(times) // 2]


def variants(q: Quantized) -> list[dict]:
    """The VARIANTS gemv runs q in: stages above 1 in the packed-row kernel only (_gemv_kernel keeps one, as
    gemv.PACKED_STAGES says), mantissa_codes where gemv.reads_bytes(q)."""
    packed, mantissa = gemv._rows_together(q) > 1, gemv.reads_bytes(q)
    chosen = [v for v in VARIANTS if (packed or v[2] == 1) and (mantissa or not v[3])]
    return [dict(zip(KEYWORDS, variant, strict=True)) for variant in chosen]


def launch_shapes(q: Quantized) -> list[dict]:
    """Every LAUNCH_SHAPES choice for q's kernel whose block_k holds whole groups."""
    shapes = itertools.product(*LAUNCH_SHAPES[gemv._rows_together(q) > 1])
    return [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in shapes if k % q.spec.group_size == 0]


def copies_for(spec: QuantSpec, shape: tuple[int, int], gated: bool = False, *, l2_bytes: int) -> int:
    """Copies of a matrix (or with `gated` of a pair) that together hold twice `l2_bytes`: a call reads what the
    calls before it evicted."""
    return max(1, math.ceil(2 * l2_bytes / ((1 + gated) * quantized_nbytes(shape, spec))))


def multiply(x: torch.Tensor, m: Quantized | tuple[Quantized, Quantized], out=None, workspace=None, **launch):
    """gemv.gemv of one matrix, or gemv.gated of a pair (w1, w3): what tune and the kernel benchmarks time."""
    if isinstance(m, tuple):
        return gemv.gated(x, *m, out, workspace, **launch)
    return gemv.gemv(x, m, out, workspace, **launch)


def tune_shape(matrices: list, x: torch.Tensor, timer: Timer = timed_us,
               tried: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """The fastest launch for x @ q.T over `matrices` (copies of one shape, taken in turn; or pairs of them, for
    gemv.gated), as the module says: {"launch": gemv's keywords, "us", "default_us", "timings": every launch tried,
    once, with its us (None: it could not launch, or its result was wrong)}. `tried(n)` hears the count of launches
    tried after each."""
    gated = isinstance(matrices[0], tuple)
    q = matrices[0][0] if gated else matrices[0]
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    workspace = Workspace()  # split-K's partial sums, made once, as in decode
    default = gemv.launch(x, q, tuned=False, gated=gated)  # the built-in launch, whatever is tuned
    expected = multiply(x, matrices[0], **default).float()
    scale = expected.abs().max().item() or 1.0
    timings: list[dict] = []

    def attempt(launch: dict) -> float | None:
        earlier = next((t for t in timings if all(t[key] == launch[key] for key in gemv.LAUNCH)), None)
        if earlier is not None:
            return earlier["us"]
        try:
            got = multiply(x, matrices[0], **launch).float()
            us = None
            if (got - expected).abs().max().item() <= AGREE * scale:
                us = timer([functools.partial(multiply, x, m, out, workspace, **launch) for m in matrices])
        except gemv.CANNOT_LAUNCH:
            us = None
        timings.append({**launch, "us": None if us is None else round(us, 2)})
        if tried is not None:
            tried(len(timings))
        return us

    def fastest(launches: list[dict]) -> tuple[float, dict]:
        """The fastest of `launches` that runs right, one of which must."""
        us, i = min((us, i) for i, launch in enumerate(launches) if (us := attempt(launch)) is not None)
        return us, launches[i]

    default_us = attempt(default)
    assert default_us is not None, "the default launch must run"
    best_us, best = fastest([default, *({**default, **variant} for variant in variants(q))])  # ties: the default
    best_us, best = fastest([best, *({**best, **shape} for shape in launch_shapes(q))])
    best_us, best = fastest([best, *({**best, "split_k": split_k} for split_k in SPLITS)])
    best_us, best = fastest([best, {**best, "early_meta": not best["early_meta"]}])
    best_us, best = fastest([best, *({**best, **variant} for variant in variants(q))])  # at the launch found
    return {"launch": best, "us": round(best_us, 2), "default_us": round(default_us, 2), "timings": timings}


def tune(
    shapes: dict[str, Shape], device: torch.device, dtype: torch.dtype,
    timer: Timer = timed_us, progress: Progress | None = None, l2_bytes: int | None = None,
    tuned: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:  # fmt: skip
    """tune_shape for each tuning key of `shapes` (a name per matrix, e.g. "w1", "layers.0.q_proj", or pair, "w1+w3":
    its Shape, or spec and shape), on random matrices of it on `device` with one token of `dtype`: by gemv.tuning_key,
    tune_shape's dict and "matrices", the names of that key. Shapes the kernel does not serve (gemv.supports,
    gemv.supports_gated) are left out, and so is a gated pair whose first try fails here (gemv.gated_first_try).
    `tuned({key: result})` hears each shape's as it is done (save, so that an interrupted tune keeps them)."""
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    by_key: dict[str, list[str]] = {}
    for name, value in shapes.items():
        spec, shape, gated, meta_rows = Shape(*value)
        by_key.setdefault(gemv.tuning_key(spec, tuple(shape), dtype, gated, meta_rows), []).append(name)
    results = {}
    for key, names in by_key.items():
        shape = Shape(*shapes[names[0]])
        if shape.gated and gemv.gated_first_try(device, dtype, shape.spec, tuple(shape.shape), shape.meta_rows):
            continue  # gated fails on this GPU: decode launches w1 and w3 apart, as tuned below
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(1, shape.shape[1], generator=generator, device=device).to(dtype)
        matrices = [_random(shape, generator)]
        if not (gemv.supports_gated(x, *matrices[0]) if shape.gated else gemv.supports(x, matrices[0])):
            continue
        copies = copies_for(shape.spec, shape.shape, shape.gated, l2_bytes=l2_bytes)
        matrices += [_random(shape, generator) for _ in range(copies - 1)]
        tried = None
        if progress is not None:
            tried = functools.partial(_tried, progress, key, len(results), len(by_key))
        results[key] = {**tune_shape(matrices, x, timer, tried), "matrices": names}
        if tuned is not None:
            tuned({key: results[key]})
        if progress is not None:
            progress(key, len(results), len(by_key))
    return results


def _random(shape: Shape, generator: torch.Generator) -> Quantized | tuple[Quantized, Quantized]:
    """A random matrix of `shape`, or with shape.gated a pair of them; with shape.meta_rows, held by packed row."""

    def one() -> Quantized:
        q = random_quantized(shape.shape, shape.spec, generator)
        return with_meta_by_row(q) if shape.meta_rows else q

    return (one(), one()) if shape.gated else one()


def _tried(progress: Progress, key: str, done: int, total: int, launches: int) -> None:
    progress(f"{key}: {launches} launch{'es' * (launches != 1)}", done, total)


def save(results: dict[str, dict], device: torch.device, about: dict) -> Path:
    """Write `tune`'s results where gemv reads them for this GPU (gemv.user_tuned_folder()), keeping the shapes of
    an earlier tune that these did not time (another model's, say), and return the file. `about` is recorded with
    them: the commit and command, say. A file there that gemv cannot read is replaced."""
    name = gemv.device_name(device)
    path = gemv.user_tuned_file(name)
    launches, timings = {}, {}
    if path.is_file():
        try:
            earlier = gemv.read_tuned_record(path, name)
            launches, timings = earlier["launches"], earlier.get("timings", {})
        except MoEOffloadError as error:
            warnings.warn(f"replacing it: {error}", stacklevel=2)
    for key, result in results.items():
        launches[key] = {**result["launch"], "us": result["us"], "default_us": result["default_us"],
                         "matrices": result["matrices"]}  # fmt: skip
        timings[key] = result["timings"]
    record = {**about, "device": name, "torch": torch.__version__, "triton": gemv.triton.__version__,
              "launches": launches, "timings": timings}  # fmt: skip
    write_atomically(path, lambda temp: temp.write_text(json.dumps(record, indent=1) + "\n"), "the tuned file")
    gemv.forget_tuned()
    return path
