"""The fused dequantize+GEMV kernel (quant/gemv.py) against dequantize-then-multiply.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) on CPU tensors; with one, the
same tests run the compiled kernel on CUDA tensors (references stay on the CPU, in float64).
"""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
from benchmarks import gemv_sass
from offload.moe import expert_mlp
from quant import gemv
from quant.hqq import (
    EXPERT_PRESETS,
    Quantized,
    QuantSpec,
    Workspace,
    dequantize,
    from_tensors,
    quantize,
    random_quantized,
    to_tensors,
)
from quant.linear import TRITON, linear
from quant.packing import ExpertFormat, with_meta_by_output, with_meta_by_row
from tests.test_quantized_model import carry_our_weights
from tests.tiny import hf_model, make_tiny_mixtral, prefill_then_decode

pytestmark = pytest.mark.skipif(gemv.triton is None, reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)

SPECS = {
    "2-bit g16, 8-bit meta": EXPERT_PRESETS["2"],
    "3-bit g64": EXPERT_PRESETS["3"],
    "4-bit g64": EXPERT_PRESETS["4"],
    "8-bit g64": QuantSpec(bits=8, group_size=64),
    "2-bit g16, float meta": QuantSpec(bits=2, group_size=16),
}


def reference(x: torch.Tensor, q) -> torch.Tensor:
    """x @ W.T in float64 on the CPU, W dequantized by quant/hqq.py."""
    return x.cpu().double() @ dequantize(q, torch.float32).double().T


def on_device(q):
    """q's tensors on DEVICE (the kernel reads them there)."""
    return from_tensors({k: v.to(DEVICE) for k, v in to_tensors(q, "w").items()}, "w", q.spec, q.shape)


def assert_close(got: torch.Tensor, expected: torch.Tensor, relative: float = 1e-5) -> None:
    error = (got.cpu().double() - expected).abs().max().item()
    assert error < relative * expected.abs().max().item(), error


def tolerance(q, mantissa: bool = gemv.MANTISSA_CODES) -> float:
    """assert_close's relative error for float32 x: with codes in the mantissa (2 and 4 bits), each slot's sum
    less sum_j x_j loses up to 2**8 of float32's precision (quant/gemv.py, MANTISSA_CODES)."""
    return 1e-4 if mantissa and gemv.reads_bytes(q) else 1e-5


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shape", [(256, 512), (96, 256), (40, 1024)])  # 3-bit: R % 10 != 0 pads the grid
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_equals_dequantize_then_matmul(name, shape, rows):
    generator = torch.Generator().manual_seed(sum(shape) + rows)
    q = random_quantized(shape, SPECS[name], generator)
    x = torch.randn(rows, shape[1], generator=generator)
    got = gemv.gemv(x.to(DEVICE), on_device(q))
    assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
    assert_close(got, reference(x, q), tolerance(q))


def launch_k(q) -> int:
    """gemv's default block_k for q."""
    return gemv.PACKED_LAUNCH[q.spec.bits][1] if gemv._rows_together(q) > 1 else gemv.BLOCK_K


class Launches:
    """Stands in for a Triton kernel in gemv's module and records the grids it is launched on, whether the launch
    was unmasked (EVEN), and whether it was gated (GATED)."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.even, self.gated = kernel, [], [], []

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.grids.append(grid)
            self.even.append(keywords["EVEN"])
            self.gated.append(keywords["GATED"])
            return self.kernel[grid](*args, **keywords)

        return run


@pytest.mark.parametrize(
    "spec, shape, together, launch",
    [  # launch: (block_n, block_k), None for gemv's default; N / PER not a multiple of block_n leaves a ragged program
        (EXPERT_PRESETS["2"], (64, 256), 4, None),  # packed rows 0..15, each the codes of outputs n + 16 i
        (EXPERT_PRESETS["2"], (48, 512), 4, (8, 64)),  # 12 packed rows: a ragged second program; 8 steps over K
        (EXPERT_PRESETS["2"], (64, 512), 4, (4, 128)),  # whole programs and steps: unmasked loads
        (EXPERT_PRESETS["4"], (96, 256), 2, (32, 128)),
        (EXPERT_PRESETS["3"], (20, 128), 10, (1, 64)),  # N % 10 == 0: 3-bit's grid is not padded either
        (EXPERT_PRESETS["2"], (2, 1024), 1, None),  # 128 groups pack 4 to a byte, but N % 4 != 0: the fallback
        (QuantSpec(2, 16), (42, 64), 1, (16, 64)),
        (EXPERT_PRESETS["4"], (3, 128), 1, None),
        (EXPERT_PRESETS["3"], (96, 256), 1, None),  # the padded grid
    ],
)
@pytest.mark.parametrize("late", [False, True], ids=["sum per step", "late sum"])
def test_packed_rows_and_the_fallback_equal_dequantize_then_matmul(monkeypatch, spec, shape, together, launch, late):
    """Shapes with N % PER == 0 take _gemv_packed_kernel (each packed row read once makes PER outputs);
    others _gemv_kernel. Both, in every variant and pipelined or not (the interpreter ignores stages; on a
    GPU they compile apart), against dequantize-then-multiply, at two tokens; and with K split over 3 programs
    an output (uneven where K has 8 steps: 3, 3 and 2; empty shares where it has one), their partials summed."""
    generator = torch.Generator().manual_seed(sum(shape))
    q = random_quantized(shape, spec, generator)
    x = torch.randn(2, shape[1], generator=generator)
    assert gemv._rows_together(q) == together
    packed, fallback = Launches(gemv._gemv_packed_kernel), Launches(gemv._gemv_kernel)
    monkeypatch.setattr(gemv, "_gemv_packed_kernel", packed)
    monkeypatch.setattr(gemv, "_gemv_kernel", fallback)
    block_n, block_k = launch or (None, None)
    expected = reference(x, q)
    launches = [(*variant, 1, False) for variant in itertools.product((False, True), (1, 3), (False, True))]
    launches += [(True, 3, True, 3, False), (True, 3, True, 1, True)]  # K split 3 ways; the meta early
    results = {}
    for fast, stages, mantissa, split_k, early_meta in launches:
        got = gemv.gemv(x.to(DEVICE), on_device(q), block_n=block_n, block_k=block_k, late_sum=late, fast_codes=fast,
                        stages=stages, mantissa_codes=mantissa, split_k=split_k, early_meta=early_meta)  # fmt: skip
        # codes to float by I2F or by the magic number: both exact, the sums may differ in order
        assert_close(got, expected, tolerance(q, mantissa))
        results[fast, stages, mantissa, split_k, early_meta] = got
    # the meta loaded ahead of the codes' sums changes no bit
    assert torch.equal(results[True, 3, True, 1, True], results[True, 3, True, 1, False])
    default_n = gemv.PACKED_LAUNCH[spec.bits][0] if together > 1 else gemv.BLOCK_N
    programs = math.ceil(shape[0] // together / (block_n or default_n))  # a program per block_n (packed) rows
    assert (packed if together > 1 else fallback).grids == [(programs, 2, s) for s in (1,) * 8 + (3, 1)]
    assert (fallback if together > 1 else packed).grids == []
    even = shape[0] // together % (block_n or default_n) == 0 and shape[1] % (block_k or launch_k(q)) == 0
    assert (packed if together > 1 else fallback).even == [even] * 10
    assert (packed if together > 1 else fallback).gated == [False] * 10


@pytest.mark.parametrize(
    "spec, shape, launch",
    [  # launch: (block_n, block_k), None for gemv's default
        (EXPERT_PRESETS["2"], (64, 256), None),  # the packed-row kernel, unmasked
        (EXPERT_PRESETS["2"], (48, 512), (8, 64)),  # a ragged second program; 8 steps over K
        (EXPERT_PRESETS["4"], (96, 256), (32, 128)),
        (EXPERT_PRESETS["3"], (96, 256), None),  # 3-bit's padded grid: _gemv_kernel
        (QuantSpec(2, 16), (42, 64), (16, 64)),  # N % 4 != 0: _gemv_kernel, float meta
    ],
)
def test_gated_is_silu_of_the_first_product_times_the_second(monkeypatch, spec, shape, launch):
    """gated (an expert's w1 and w3 in one launch) against silu(gemv(x, w1)) * gemv(x, w3) at the same launch, whose
    float32 sums it shares (only silu's rounding differs), and against dequantize-then-multiply in float64; at two
    tokens, with the meta early and late (no bit changes), and with K split 3 ways (each product's partials summed
    apart, then gated)."""
    generator = torch.Generator().manual_seed(sum(shape) + spec.bits)
    w1, w3 = (on_device(random_quantized(shape, spec, generator)) for _ in range(2))
    x = torch.randn(2, shape[1], generator=generator).to(DEVICE)
    a, b = reference(x, w1), reference(x, w3)
    exact = a * torch.sigmoid(a) * b
    packed, fallback = Launches(gemv._gemv_packed_kernel), Launches(gemv._gemv_kernel)
    monkeypatch.setattr(gemv, "_gemv_packed_kernel", packed)
    monkeypatch.setattr(gemv, "_gemv_kernel", fallback)
    block_n, block_k = launch or (None, None)
    results = {}
    for split_k, early_meta in [(1, False), (1, True), (3, False)]:
        keywords = dict(block_n=block_n, block_k=block_k, split_k=split_k, early_meta=early_meta)
        got = gemv.gated(x, w1, w3, **keywords)
        assert got.shape == (2, shape[0]) and got.dtype == torch.float32
        first, second = gemv.gemv(x, w1, **keywords), gemv.gemv(x, w3, **keywords)
        assert_close(got, (first * torch.sigmoid(first) * second).double().cpu(), relative=1e-6)
        assert_close(got, exact, 10 * tolerance(w1))  # silu(a) b: a's and b's errors, each times the other
        results[split_k, early_meta] = got
    assert torch.equal(results[1, False], results[1, True])
    launched, other = (packed, fallback) if gemv._rows_together(w1) > 1 else (fallback, packed)
    assert launched.gated == [True, False, False] * 3 and other.gated == []
    assert [grid[2] for grid in launched.grids] == [1] * 6 + [3] * 3


def test_a_failed_first_try_launches_w1_and_w3_apart(monkeypatch):
    """gated_first_try (load() runs it on CUDA, on a pair held as its experts are): None where gated runs and agrees
    with its two launches; where it raises or disagrees, why, and supports_gated is then off for that device, dtype
    and spec only, so an expert launches w1 and w3 apart."""
    monkeypatch.setattr(gemv, "_gated_failed", {})
    two, four = EXPERT_PRESETS["2"], EXPERT_PRESETS["4"]
    assert gemv.gated_first_try(DEVICE, torch.float32, two, (64, 256)) is None and gemv._gated_failed == {}
    original = gemv._run
    rows = []  # with meta_rows, the pair it tries is held by packed row, as load holds its experts so
    monkeypatch.setattr(gemv, "_run", lambda x, q, up, *args: rows.append(gemv._meta_by_row(q)) or original(
        x, q, up, *args))  # fmt: skip
    assert gemv.gated_first_try(DEVICE, torch.float32, two, (64, 2048), meta_rows=True) is None and rows == [True] * 3

    def unsupported(x, q, up, *args):
        if up is not None:
            raise RuntimeError("PTX .version 8.7 does not support .target sm_120")
        return original(x, q, up, *args)

    monkeypatch.setattr(gemv, "_run", unsupported)
    why = "RuntimeError: PTX .version 8.7 does not support .target sm_120"
    assert gemv.gated_first_try(DEVICE, torch.float32, two, (64, 256)) == why
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(1, 256, generator=generator).to(DEVICE)
    pair = [on_device(random_quantized((64, 256), two, generator)) for _ in range(2)]
    other = [on_device(random_quantized((64, 256), four, generator)) for _ in range(2)]
    assert not gemv.supports_gated(x, *pair)
    assert gemv.supports_gated(x, *other) and gemv.supports_gated(x.half(), *pair)  # that spec and dtype only
    monkeypatch.setattr(gemv, "_gated_failed", {})
    monkeypatch.setattr(gemv, "_run", lambda x, q, up, *args: original(x, q, up, *args) * (1 + (up is not None)))
    assert gemv.gated_first_try(DEVICE, torch.float32, two, (64, 256)) == "its result differs from the two launches'"
    monkeypatch.setattr(gemv, "_run", original)
    fmt = ExpertFormat.build(256, 64, two, torch.float32)
    weights = fmt.unpack(fmt.random(torch.Generator(DEVICE).manual_seed(11), torch.empty(fmt.nbytes, dtype=torch.uint8,
                                                                                         device=DEVICE)))  # fmt: skip
    calls = []
    monkeypatch.setattr(gemv, "gemv", lambda *args, _call=gemv.gemv, **keywords: calls.append("gemv") or _call(
        *args, **keywords))  # fmt: skip
    expert_mlp(x, weights, Workspace(TRITON), reuse=True)
    assert calls == ["gemv"] * 3  # w1, w3 and w2 apart


def test_gated_serves_pairs_of_one_spec_and_shape(monkeypatch):
    generator = torch.Generator().manual_seed(8)
    w1, w3 = (random_quantized((64, 256), EXPERT_PRESETS["2"], generator) for _ in range(2))
    x = torch.zeros(1, 256)
    assert gemv.supports_gated(x, w1, w3)
    assert not gemv.supports_gated(x, w1, random_quantized((128, 256), EXPERT_PRESETS["2"], generator))
    assert not gemv.supports_gated(x, w1, random_quantized((64, 256), QuantSpec(2, 16), generator))  # float meta
    assert not gemv.supports_gated(torch.zeros(gemv.MAX_ROWS + 1, 256), w1, w3)  # a prefill: dequantize
    monkeypatch.setattr(gemv, "GATED", False)
    assert not gemv.supports_gated(x, w1, w3)


@pytest.mark.parametrize("spec", [EXPERT_PRESETS["2"], EXPERT_PRESETS["4"]], ids=["2-bit", "4-bit"])
def test_codes_in_the_mantissa_read_each_code_exactly(spec):
    """x one-hot at input k makes y the weights' column k: each code of column k, of every bit slot, read as
    1 + c 2**-e, less the one x, scaled back. Exact in both variants, so the mask, the byte's shift and the
    scaling are right for every slot and every byte of a group (k runs through one group's positions)."""
    q = random_quantized((64, 256), spec, torch.Generator().manual_seed(spec.bits))
    assert gemv.reads_bytes(q) and not gemv.reads_bytes(random_quantized((40, 128), EXPERT_PRESETS["3"]))
    weights = dequantize(q, torch.float32)
    for first in range(0, spec.group_size, gemv.MAX_ROWS):
        inputs = torch.arange(first, first + gemv.MAX_ROWS) + spec.group_size  # the second group's positions
        x = torch.zeros(gemv.MAX_ROWS, 256).scatter_(1, inputs[:, None], 1.0)  # row m: one-hot at inputs[m]
        for mantissa in (False, True):
            got = gemv.gemv(x.to(DEVICE), on_device(q), mantissa_codes=mantissa).cpu()
            assert torch.equal(got, weights[:, inputs].T), (mantissa, (got - weights[:, inputs].T).abs().max())


def test_which_kernel_each_mixtral_matrix_takes():
    """_rows_together: PER outputs per element read (the packed-row kernel) where N % PER == 0, else 1."""
    empty = torch.empty(0)

    def together(shape, spec):
        return gemv._rows_together(Quantized(empty, empty, empty, shape, spec))

    for shape in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]:  # w1 and w3, w2, q and o, k and v
        assert together(shape, EXPERT_PRESETS["2"]) == 4
        assert together(shape, EXPERT_PRESETS["4"]) == 2
        assert together(shape, EXPERT_PRESETS["3"]) == 1  # 10 rows per int32, and 10 divides none of them
        assert together(shape, QuantSpec(8, 64)) == 1  # one code per byte: nothing to share
    assert together((40, 1024), EXPERT_PRESETS["3"]) == 10
    assert together((42, 64), QuantSpec(2, 16)) == 1


@pytest.mark.parametrize("bits", ["2", "3", "4"])
def test_gemv_on_hqq_quantized_weights_in_a_packed_expert(bits):
    """Real hqq codes, read through views into one packed buffer, as the MoE block reads a slot."""
    generator = torch.Generator().manual_seed(int(bits))
    fmt = ExpertFormat.build(128, 256, EXPERT_PRESETS[bits], torch.float32)
    raw = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in fmt._weight_shapes(128, 256).items()}
    buffer = torch.zeros(2 * fmt.nbytes, dtype=torch.uint8, device=DEVICE)[fmt.nbytes :]  # like an arena row
    buffer.copy_(fmt.pack(**raw))
    for name, q in fmt.unpack(buffer).items():
        x = torch.randn(1, q.shape[1], generator=generator)
        assert_close(gemv.gemv(x.to(DEVICE), q), reference(x, quantize(raw[name], fmt.spec)), tolerance(q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_in_half_precision_rounds_once(dtype):
    """16-bit activations: the kernel accumulates in float32 and rounds the result once."""
    generator = torch.Generator().manual_seed(5)
    q = random_quantized((128, 512), EXPERT_PRESETS["2"], generator)
    x = torch.randn(1, 512, generator=generator).to(dtype)
    got = gemv.gemv(x.to(DEVICE), on_device(q))
    assert got.dtype == dtype
    assert_close(got, reference(x, q), relative=torch.finfo(dtype).eps)


def test_gemv_writes_into_out_and_linear_dispatches_on_the_workspace():
    generator = torch.Generator().manual_seed(6)
    q = on_device(random_quantized((64, 256), EXPERT_PRESETS["4"], generator))
    x = torch.randn(1, 256, generator=generator).to(DEVICE)
    out = torch.full((1, 64), float("nan"), device=DEVICE)
    assert gemv.gemv(x, q, out) is out
    assert torch.equal(linear(x, q, Workspace(TRITON)), out)
    # without fused, the same call dequantizes: close, but not the same rounding
    unfused = linear(x, q, Workspace())
    assert (unfused - out).abs().max().item() < 1e-5 and not torch.equal(unfused, out)
    # K split over two programs: their partial sums live in the workspace, made at the first call, then reused
    workspace, split = Workspace(TRITON), torch.empty_like(out)
    for _ in range(2):
        assert gemv.gemv(x, q, split, workspace, split_k=2, block_k=128) is split
        assert [key[0] for key in workspace._buffers] == ["gemv.split_k"]
    partials = workspace.buffer("gemv.split_k", (2, 1, 1, 64), torch.float32, DEVICE)[:, 0]  # [split, half, M, N]
    assert torch.equal(partials.sum(0), split) and (split - out).abs().max().item() < 1e-5
    assert partials.abs().min() > 0  # each program summed half of K: neither partial is the whole
    assert (partials - split).abs().min() > 0


@pytest.mark.parametrize("reuse", [False, True], ids=["prefill", "decode"])
def test_the_expert_launches_w1_and_w3_together_where_the_kernel_is_gated(monkeypatch, reuse):
    """expert_mlp through the Triton workspace: w1 and w3 in one gated launch, then w2, where GATED; w1, w3 and w2
    apart where not; the same result within silu's rounding. Tokens at most MAX_ROWS take the kernel either way."""
    generator = torch.Generator(DEVICE).manual_seed(9)
    fmt = ExpertFormat.build(128, 256, EXPERT_PRESETS["2"], torch.float32)
    weights = fmt.unpack(fmt.random(generator, torch.empty(fmt.nbytes, dtype=torch.uint8, device=DEVICE)))
    x = torch.randn(2, 128, generator=generator, device=DEVICE)
    calls = []
    for name in ("gemv", "gated"):
        monkeypatch.setattr(gemv, name, lambda *args, _call=getattr(gemv, name), _name=name, **keywords: (
            calls.append(_name), _call(*args, **keywords))[1])  # fmt: skip
    together = expert_mlp(x, weights, Workspace(TRITON), reuse=reuse).clone()
    assert calls == ["gated", "gemv"]
    monkeypatch.setattr(gemv, "GATED", False)
    apart = expert_mlp(x, weights, Workspace(TRITON), reuse=reuse)
    assert calls[2:] == ["gemv"] * 3
    assert_close(together, apart.double().cpu(), relative=1e-5)  # w2's sums of silu's ulps, with cancellation
    assert not torch.equal(together, apart)  # float32 silu in the kernel, torch's apart


def test_gemv_supports_only_what_it_reads():
    generator = torch.Generator().manual_seed(7)
    q = random_quantized((64, 256), EXPERT_PRESETS["2"], generator)
    assert gemv.supports(torch.zeros(gemv.MAX_ROWS, 256), q)
    assert not gemv.supports(torch.zeros(gemv.MAX_ROWS + 1, 256), q)  # a prefill: dequantize in tiles, then matmul
    assert not gemv.supports(torch.zeros(1, 128), q)  # wrong input size
    assert not gemv.supports(torch.zeros(1, 240), random_quantized((64, 240), QuantSpec(4, 48), generator))
    assert not gemv.supports(torch.zeros(1, 256), random_quantized((64, 256), QuantSpec(2, 16, 4, 128), generator))
    by_output = with_meta_by_output(random_quantized((64, 2048), EXPERT_PRESETS["2"], generator))  # the CPU's
    assert not gemv.supports(torch.zeros(1, 2048), by_output)
    # what it refuses still multiplies, through dequantization
    x = torch.randn(gemv.MAX_ROWS + 1, 256, generator=generator)
    assert_close(linear(x, q, Workspace(TRITON)), reference(x, q))


@pytest.mark.parametrize(
    "shape, keywords",
    [
        ((16, 2048), {}),  # the default launch: 2 programs of 2 packed rows, 4 steps of 32 groups, in one meta group
        ((12, 2048), {"late_sum": False, "early_meta": True, "split_k": 2}),  # a ragged program; K in 2 splits
        ((16, 2048), {"block_k": 4096, "mantissa_codes": False}),  # one step of 256 groups, past K: 2 meta groups
    ],
)
def test_meta_by_packed_row_multiplies_as_grid_order(shape, keywords):
    """With the scales and zeros by packed row (quant/packing.py, with_meta_by_row: META_ROWS), the packed kernel
    reads them there, alone and gated; a pair whose two matrices differ in layout launches apart."""
    generator = torch.Generator().manual_seed(shape[0])
    w1, w3 = (random_quantized(shape, EXPERT_PRESETS["2"], generator) for _ in range(2))
    grid1, grid3 = on_device(w1), on_device(w3)
    rows1, rows3 = with_meta_by_row(grid1), with_meta_by_row(grid3)  # on DEVICE: views of two new tensors each
    x = torch.randn(2, shape[1], generator=generator)
    assert gemv.supports(x.to(DEVICE), rows1) and gemv._meta_by_row(rows1) and not gemv._meta_by_row(grid1)
    got = gemv.gemv(x.to(DEVICE), rows1, **keywords)
    assert_close(got, reference(x, w1), tolerance(w1, keywords.get("mantissa_codes", gemv.MANTISSA_CODES)))
    assert_close(got, gemv.gemv(x.to(DEVICE), grid1, **keywords).double().cpu(), 1e-6)  # the sums' order may differ
    both = gemv.gated(x.to(DEVICE), rows1, rows3, **keywords)
    expected = torch.nn.functional.silu(reference(x, w1)) * reference(x, w3)
    assert_close(both, expected, 1e-4)
    assert not gemv.supports_gated(x.to(DEVICE), rows1, grid3) and not gemv.supports_gated(x.to(DEVICE), grid1, rows3)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py has the CUDA twin")
def test_fused_decode_equals_transformers_with_our_dequantized_weights(tmp_path, monkeypatch):
    """The whole model, prefill dequantized and every decode step through the kernel (experts in slots,
    4-bit attention fused too), against transformers carrying the same dequantized weights."""
    monkeypatch.setattr(offload.api, "meta_order", lambda meta_rows, device, fused: "grid")  # as on CUDA
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=2, experts=4, seed=7)
    model = offload.load(str(tiny), device="cpu", expert_bits="2", attn_bits="4", slots=2)
    model.moe.workspace.kernel = model.decoder.workspace.kernel = TRITON  # what load() picks on CUDA
    calls = []  # each gemv call's bits, and "gated" for each of gated's
    original, original_gated = gemv.gemv, gemv.gated
    monkeypatch.setattr(gemv, "gemv", lambda x, q, out=None, workspace=None: calls.append(q.spec.bits) or original(
        x, q, out, workspace))  # fmt: skip
    monkeypatch.setattr(gemv, "gated", lambda x, w1, w3, out=None, workspace=None: calls.append("gated") or
                        original_gated(x, w1, w3, out, workspace))  # fmt: skip
    tokens = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(0))
    model.reset()
    got = [model.decoder.forward(tokens[:10], 0)[-1]]
    # ten tokens: attention dequantizes; an expert that few enough of them chose runs the kernel: w1 and w3 gated,
    # then w2
    assert 4 not in calls and calls.count(2) == calls.count("gated") > 0
    calls.clear()
    for position in range(10, 14):
        got.append(model.decoder.forward(tokens[position : position + 1], position)[-1])
    monkeypatch.undo()
    # per decode step and layer: q, k, v, o (4-bit) and two experts' w1 and w3 pair and w2 (2-bit)
    assert calls.count(4) == 4 * 2 * 4 and calls.count("gated") == calls.count(2) == 4 * 2 * 2
    reference = hf_model(tiny)
    carry_our_weights(reference, model)
    with torch.no_grad():
        expected = reference(tokens[None]).logits[0, 9:]
    assert (torch.stack(got) - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py has the CUDA twin")
def test_a_load_with_meta_rows_decodes_by_packed_row_as_grid_order(tmp_path, monkeypatch):
    """meta_rows, as on CUDA: at hidden 2048 (128 groups an output of w1 and w3 at 2-bit g16) each expert is repacked
    from its file's grid order into its row of the arena by packed row, copied into a slot as it is, and multiplied
    there by the kernel reading its meta by row (META_ROWS); w2 (16 groups an output) stays in grid order. The logits
    are grid order's, but for the sums' order."""
    import offload.api

    tiny = make_tiny_mixtral(tmp_path / "m", hidden=2048, intermediate=256, layers=1, experts=4, seed=3)
    tokens = torch.randint(3, 128, (6,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(offload.api, "decode_kernel", lambda fused, device: TRITON)  # as on CUDA
    monkeypatch.setitem(gemv.PACKED_LAUNCH, 2, (64, 512, 2))  # interpreted: 32 times fewer programs, w1 whole in one
    logits, pairs = {}, []
    original = gemv.gated
    monkeypatch.setattr(gemv, "gated", lambda x, w1, w3, out=None, workspace=None: pairs.append(
        (gemv._meta_by_row(w1), gemv._meta_by_row(w3))) or original(x, w1, w3, out, workspace))  # fmt: skip
    for order in ("row", "grid"):
        monkeypatch.setattr(offload.api, "meta_order", lambda meta_rows, device, fused, order=order: order)
        model = offload.load(str(tiny), device="cpu", expert_bits="2", slots=2)
        fmt = model.prepared.expert_format
        assert fmt.meta_order == order and fmt.meta_by_row((256, 2048)) == (order == "row")
        assert model.info()["experts"] == "2-bit g16, 8-bit meta g128" + ", scales and zeros by packed row" * (
            order == "row")  # fmt: skip
        logits[order] = prefill_then_decode(model, tokens, 3)
        assert pairs and set(pairs) == {(order == "row",) * 2}  # every decode step's experts, both matrices
        pairs.clear()
    assert_close(logits["row"], logits["grid"].double(), 1e-5)


def test_the_kernel_compiles_for_a_t4_and_an_h100_with_vector_loads():
    """The interpreter checks the arithmetic; this compiles the kernels for real GPUs (sm_75: the T4 of a
    free Colab, sm_90: H100) with Triton's own ptxas, no GPU needed, and checks the codes are read 16
    bytes at a time rather than byte by byte; and, gated, both matrices' codes and meta with x's tile read once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("gemv_ptx.py")), "75", "90"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loads = json.loads(done.stdout)
    # _gemv_kernel at 2, 3, 4 and 8 bits; _gemv_packed_kernel at 2, 3 and 4 (8-bit never takes it); and
    # offload/embedding.py's gather: one load of the token's id, then 16 bytes of its row a thread
    # (counted by kind: Triton versions spell the id's load differently, e.g. with a cache hint)
    gathers = {case: loads.pop(case) for case in list(loads) if case.startswith("_gather_rows_kernel")}
    kinds = [f"{dtype} sm_{arch}" for dtype in ("bf16", "fp16") for arch in (75, 90)]  # fp16: auto's dtype on a T4
    assert sorted(gathers) == [f"_gather_rows_kernel {kind}" for kind in kinds]
    for case, counts in gathers.items():
        rows = sum(n for load, n in counts.items() if load.endswith(".v4.b32"))
        assert rows >= 1 and sum(counts.values()) - rows == 1, (case, counts)
    # offload/norm.py's kernel on a 4096-wide row: x and the weight (and the residual add's input) 16 bytes a load
    norms = {case: loads.pop(case) for case in list(loads) if case.startswith("_rms_norm_kernel")}
    assert len(norms) == 8 and all(set(counts) == {"ld.global.v4.b32"} for counts in norms.values()), norms
    for case in [case for case in norms if " add " in case]:
        assert 2 * norms[case]["ld.global.v4.b32"] == 3 * norms[case.replace(" add", "")]["ld.global.v4.b32"], case
    # offload/rope.py's kernel on Mixtral's 32 query heads and 8 key heads: the position once, each half of the
    # heads 16 bytes a load (the tables' rows too, where each thread reads a run of them); the keys' launch writes
    # the KV cache, so it reads the values' halves too, 16 bytes a load
    ropes = {case: loads.pop(case) for case in list(loads) if case.startswith("_rope_kernel")}
    assert len(ropes) == 8 and all(c["ld.global.b64"] == 1 and c["ld.global.v4.b32"] >= 2 for c in ropes.values())
    assert all(c["ld.global.v4.b32"] == 4 for case, c in ropes.items() if " 8 heads " in case), ropes
    # offload/router.py's kernel on Mixtral's router: all 8 x 4096 of it in one tile, 16 bytes a load, 8 a thread of
    # 16 warps, and x's columns in one load a thread (a guess reads the residual stream and the MoE output twice,
    # for the sum of squares and the product, and the norm's weight): no loop, one load's latency for the router
    routes = {case: loads.pop(case) for case in list(loads) if case.startswith("_route_kernel")}
    assert len(routes) == 8
    for case, counts in routes.items():
        assert counts == {"ld.global.v4.b32": 8 + (5 if " guess " in case else 1)}, case
    sums = {case: loads.pop(case) for case in list(loads) if case.startswith("_sum_splits_kernel")}
    for arch in (75, 90):  # 4 partials of 16-byte loads a thread; gated, both products' partials
        alone, gated = sums[f"_sum_splits_kernel alone sm_{arch}"], sums[f"_sum_splits_kernel gated sm_{arch}"]
        assert gated == {load: 2 * n for load, n in alone.items()} and alone["ld.global.v4.b32"] >= 4
    # the packed kernel with 8-bit meta by packed row (META_ROWS), alone and gated: a thread's bit slots' scale codes
    # and zero codes in a load of 4 bytes each, their float16 meta in four of 8 bytes; on sm_90 each copied ahead by
    # cp.async with the tiles, so that no load to registers is left
    by_row = {case: loads.pop(case) for case in list(loads) if " rows " in case}
    assert sorted(by_row) == sorted(f"_gemv_packed_kernel{gated} rows 2-bit, 8-bit meta, bf16 sm_{arch}"
                                    for arch in (75, 90) for gated in ("", " gated"))  # fmt: skip
    for case, counts in by_row.items():
        matrices = 2 if " gated " in case else 1
        if case.endswith("sm_75") or gemv.PACKED_STAGES == 1:
            assert counts == {"ld.global.v4.b32": 1 + matrices, "ld.global.b32": 2 * matrices,
                              "ld.global.v2.b32": 4 * matrices}, case  # fmt: skip
        else:  # the tiles in 16-byte copies, the meta in 4 and 8, each of them in every stage
            assert counts == {"cp.async.cg.shared.global": (1 + matrices) * gemv.PACKED_STAGES,
                              "cp.async.ca.shared.global": 6 * matrices * gemv.PACKED_STAGES}, case  # fmt: skip
    assert sorted(case.split()[0] for case in loads) == ["_gemv_kernel"] * 16 + ["_gemv_packed_kernel"] * 12
    for case in [case for case in loads if " gated " in case]:  # an expert's w1 and w3 at once
        alone, gated = loads[case.replace(" gated", "")], loads[case]
        meta = ("ld.global.b8", "ld.global.b16")  # both matrices' scales and zeros, one at a time
        assert {k: gated.get(k) for k in meta} == {k: 2 * alone[k] if k in alone else None for k in meta}, case
        assert sum(alone.values()) < sum(gated.values()) < 2 * sum(alone.values()), case  # x's tile read once
    for case, counts in loads.items():
        # the code and x tiles: 16-byte loads, or on sm_90 the packed kernel's pipelined (PACKED_STAGES)
        # 16-byte cp.async copies to shared memory; sm_75 has no cp.async and loads them as before
        pipelined = case.startswith("_gemv_packed_kernel") and case.endswith("sm_90") and gemv.PACKED_STAGES > 1
        tiles = counts.get("cp.async.cg.shared.global" if pipelined else "ld.global.v4.b32", 0)
        assert tiles >= 2 and (not pipelined or "ld.global.v4.b32" not in counts), (case, counts)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="there the benchmark itself runs: gpu_session.sh's kernel step")
def test_the_kernel_benchmark_times_every_variant_and_launch_it_reports(monkeypatch):
    """benchmarks/gemv_kernel.py's measurements on small shapes, interpreted, its CUDA timers stood in for by one
    that runs the calls and counts: every variant and launch a GPU run reports reaches gemv as its keywords, the
    default is timed once, and the kernel's error is its own. 2-bit's meta groups of 8, not 128, let these shapes hold
    their meta by packed row, which the benchmark times too."""
    from benchmarks import gemv_kernel

    monkeypatch.setattr(gemv_kernel, "HIDDEN", 128)
    monkeypatch.setattr(gemv_kernel, "INTERMEDIATE", 256)
    monkeypatch.setitem(gemv_kernel.EXPERT_PRESETS, "2", QuantSpec(2, 16, meta_bits=8, meta_group_size=8))
    original, original_gated, seen, timings = gemv.gemv, gemv.gated, set(), itertools.count(1)
    by_row = []  # (bits, shape, gated) of each call with the meta by packed row

    def recording(x, q, out=None, workspace=None, **keywords):
        seen.add((q.spec.bits, tuple(q.shape), tuple(sorted(keywords.items()))))
        if gemv._meta_by_row(q):
            by_row.append((q.spec.bits, tuple(q.shape), False))
        return original(x, q, out, **keywords)

    def recording_gated(x, w1, w3, out=None, workspace=None, **keywords):
        seen.add(("gated", w1.spec.bits, tuple(w1.shape), tuple(sorted(keywords.items()))))
        if gemv._meta_by_row(w1) and gemv._meta_by_row(w3):
            by_row.append((w1.spec.bits, tuple(w1.shape), True))
        return original_gated(x, w1, w3, out, **keywords)

    def timer(calls, repeats=50):
        for call in calls:
            call()
        return float(next(timings))

    monkeypatch.setattr(gemv, "gemv", recording)
    monkeypatch.setattr(gemv, "gated", recording_gated)
    monkeypatch.setattr(gemv_kernel, "timed_us", timer)
    monkeypatch.setattr(gemv_kernel, "eager_us", timer)
    options = argparse.Namespace(variants=True, sweep=False, sweep_bits="2,3,4", copies=1)
    rows, mlps = gemv_kernel.measure(torch.device("cpu"), torch.float32, 0, options)
    assert [(row["bits"], row["matrix"]) for row in rows] == [(b, m) for b in (2, 3, 4) for m in ("w1", "w2")]
    expected = [(b, fused, gated) for b in (2, 3, 4) for fused, gated in ((False, False), (True, False), (True, True))]
    assert [(mlp["bits"], mlp["fused"], mlp["gated"]) for mlp in mlps] == expected
    assert gemv.GATED  # each MLP timing put it back
    for row in rows:
        variants = [tuple(v[key] for key in gemv_kernel.KEYWORDS) for v in row["variants"]]
        if row["bits"] == 3:  # _gemv_kernel: one stage, and int32 codes the mantissa variant leaves alone
            assert variants == [v for v in gemv_kernel.VARIANTS if v[2] == 1 and not v[3]]
        else:
            assert variants == gemv_kernel.VARIANTS
        default = (gemv.LATE_SUM, gemv.FAST_CODES, gemv.PACKED_STAGES if row["bits"] != 3 else 1,
                   gemv.MANTISSA_CODES and row["bits"] != 3)  # fmt: skip
        timed = {variant: v["us"] for variant, v in zip(variants, row["variants"], strict=True)}
        assert timed.pop(default) == row["fused_us"] and row["fused_us"] not in timed.values()  # timed once
        shape = tuple(row["shape"])
        for variant in timed:
            assert (row["bits"], shape, tuple(sorted(zip(gemv_kernel.KEYWORDS, variant)))) in seen, variant
        assert [split["split_k"] for split in row["splits"]] == list(gemv_kernel.SPLITS)
        for split_k in gemv_kernel.SPLITS:
            assert (row["bits"], shape, (("split_k", split_k),)) in seen
        assert row["early_meta"]["early_meta"] is not gemv.EARLY_META
        assert (row["bits"], shape, (("early_meta", not gemv.EARLY_META),)) in seen
        launches = [(v["block_n"], v["block_k"], v["num_warps"]) for v in row.get("launches", ())]
        assert launches == gemv_kernel.LAUNCHES.get(row["bits"], [])
        for n, k, w in launches:
            assert (2, shape, (("block_k", k), ("block_n", n), ("num_warps", w))) in seen
        assert row["relative_error"] < 1e-4  # float32 x: the kernel's own error (tolerance(), above)
        if row["matrix"] == "w1":  # with w3, gated: at the default launch, and with its early_meta flipped
            assert row["gated"]["apart_us"] == 2 * row["fused_us"]
            assert row["gated"]["early_meta"]["early_meta"] is not gemv.GATED_EARLY_META
            flipped = (("early_meta", not gemv.GATED_EARLY_META),)
            assert {("gated", row["bits"], shape, ()), ("gated", row["bits"], shape, flipped)} <= seen
        else:
            assert "gated" not in row
        if row["bits"] == 2:  # by packed row too: alone, and w1 with w3 gated, at the default launch
            assert set(row["meta_by_row"]) == ({"us", "gated_us"} if row["matrix"] == "w1" else {"us"})
        else:
            assert "meta_by_row" not in row  # 3 bits: no 8-bit meta; 4 bits: float16 meta
    assert sorted(set(by_row)) == [(2, (128, 256), False), (2, (256, 128), False), (2, (256, 128), True)]


def test_the_static_counts_read_the_loop_and_the_occupancy_right():
    """benchmarks/gemv_sass.py's readings: the longest backward branch's body in nvdisasm's listing, opcodes without
    predicates or suffixes; and programs an H100 SM holds, by registers (allocated 256 a warp) and shared memory."""
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/              @!P0 FADD R3, R2, R3 ;
        /*0030*/               @P2 BRA `(.L_x_1) ;
        /*0040*/                   FFMA R3, R2, R2, R3 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   BRA `(.L_x_2);
.L_x_2:
        /*0070*/                   EXIT ;
"""
    assert gemv_sass.loop_body(listing) == ["LDG", "FADD", "BRA", "FFMA", "BRA"]
    h100, t4 = gemv_sass.GPUS[90], gemv_sass.GPUS[75]
    assert gemv_sass.occupancy(64, 4224, 2, h100) == 16  # the 2-bit default: 4096 registers a warp, 65536 an SM
    assert gemv_sass.occupancy(95, 1024, 2, h100) == 10  # 95 a thread rounds to 3072 a warp: 21 warps, 10 programs
    assert gemv_sass.occupancy(32, 200 * 1024, 2, h100) == 1  # shared memory binds
    assert gemv_sass.occupancy(16, 0, 1, h100) == 32  # the most programs an SM takes
    assert gemv_sass.occupancy(16, 0, 1, t4) == 16 and gemv_sass.occupancy(32, 0, 4, t4) == 8  # a T4: 32 warps
