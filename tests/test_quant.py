"""quant/hqq.py and quant/linear.py: bit-exact against hqq, deterministic, errors in order."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hqq.core.quantize import HQQLinear, Quantizer

from quant import hqq
from quant.bnb import NF4_LEVELS, NF4Spec, dequantize_nf4, quantize_nf4
from quant.bnb import dequantize_tiles as bnb_dequantize_tiles
from quant.bnb import from_tensors as nf4_from_tensors
from quant.bnb import to_tensors as nf4_to_tensors
from quant.errors import MoEOffloadError
from quant.hqq import (
    ATTN_PRESETS,
    EXPERT_PRESETS,
    Quantized,
    QuantSpec,
    Workspace,
    dequantize,
    dequantize_tiles,
    from_tensors,
    preset,
    quantize,
    quantized_nbytes,
    random_quantized,
    tensor_shapes,
    to_tensors,
)
from quant.linear import linear, map_tensors, weight_nbytes, weight_tensors, weight_to_tensors, workspace_bytes
from quant.packing import ExpertFormat

# out=96, in=80: odd shapes. 480 groups of 16; meta groups of 32 (15), 48 (10) or 24 (20).
SPECS = [
    QuantSpec(bits=2, group_size=16),
    QuantSpec(bits=3, group_size=16),
    QuantSpec(bits=4, group_size=16),
    QuantSpec(bits=8, group_size=16),
    QuantSpec(bits=2, group_size=16, meta_bits=8, meta_group_size=32),
    QuantSpec(bits=3, group_size=16, meta_bits=3, meta_group_size=32),
    QuantSpec(bits=4, group_size=16, meta_bits=8, meta_group_size=32),
    QuantSpec(bits=8, group_size=16, meta_bits=4, meta_group_size=48),
    QuantSpec(bits=2, group_size=16, meta_bits=2, meta_group_size=24),
]


def _weight(shape=(96, 80), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _hqq_meta(q: Quantized, dtype: torch.dtype) -> dict:
    """hqq's own meta dict for q, in `dtype` (what Quantizer.dequantize reads)."""
    packing = Quantizer.bit_to_packing[q.spec.bits]
    meta = {
        "nbits": q.spec.bits,
        "group_size": q.spec.group_size,
        "shape": torch.Size(q.shape),
        "axis": 1,
        "packing": packing,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
        "view_as_float": False,
        "compute_dtype": dtype,
    }
    for part in ("scale", "zero"):
        value = getattr(q, part)
        if isinstance(value, Quantized):
            meta[f"quant_{part}"] = True
            meta[f"{part}_q"] = value.codes
            meta[f"meta_{part}"] = _hqq_meta(value, dtype)
        else:
            meta[f"quant_{part}"] = False
            meta[part] = value.to(dtype)
    return meta


def _hqq_dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """HQQLinear.dequantize itself (it dequantizes quantized zero/scale first), on a stand-in layer."""
    layer = SimpleNamespace(ready=True, W_q=q.codes, meta=_hqq_meta(q, dtype))
    return HQQLinear.dequantize(layer)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_is_bit_exact_against_hqq(spec, dtype):
    q = quantize(_weight(), spec)
    ours = dequantize(q, dtype)
    theirs = _hqq_dequantize(q, dtype)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == (96, 80)
    as_int = {4: torch.int32, 2: torch.int16}[dtype.itemsize]  # compare bits: no NaN/-0.0 leniency
    assert torch.equal(ours.view(as_int), theirs.view(as_int))


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_codes_are_hqqs_own(spec):
    weight = _weight()
    q = quantize(weight, spec)
    codes, meta = Quantizer.quantize(weight, nbits=spec.bits, group_size=spec.group_size, axis=1, device="cpu")
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.scale, meta["scale"].half()) and torch.equal(q.zero, meta["zero"].half())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_quantize_is_deterministic_and_shapes_are_predicted(spec):
    weight = _weight(seed=3)
    a = to_tensors(quantize(weight, spec), "w")
    b = to_tensors(quantize(weight.clone(), spec), "w")
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
        assert not a[name].is_inference()
    predicted = tensor_shapes((96, 80), spec, "w")
    assert {k: (tuple(v.shape), v.dtype) for k, v in a.items()} == predicted
    assert quantized_nbytes((96, 80), spec) == sum(t.numel() * t.element_size() for t in a.values())
    float_meta = [t for name, t in a.items() if not name.endswith("codes")]
    assert all(t.dtype == torch.float16 for t in float_meta)


def test_to_tensors_from_tensors_round_trip():
    spec = QuantSpec(bits=2, group_size=16, meta_bits=8, meta_group_size=32)
    q = quantize(_weight(), spec)
    flat = to_tensors(q, "layers.0.w1")
    assert sorted(flat) == [
        "layers.0.w1.codes",
        "layers.0.w1.scale.codes",
        "layers.0.w1.scale.scale",
        "layers.0.w1.scale.zero",
        "layers.0.w1.zero.codes",
        "layers.0.w1.zero.scale",
        "layers.0.w1.zero.zero",
    ]
    back = from_tensors(flat, "layers.0.w1", spec, (96, 80))
    assert back.scale.shape == (480, 1) and back.scale.spec == spec.meta_spec
    assert torch.equal(dequantize(back), dequantize(q))


def test_error_falls_with_bits_and_meta_quantization_costs_little():
    weight = _weight((256, 512), seed=1)

    def rel_error(spec):
        return float((dequantize(quantize(weight, spec)) - weight).norm() / weight.norm())

    errors = {bits: rel_error(QuantSpec(bits=bits, group_size=64)) for bits in (2, 3, 4, 8)}
    assert errors[8] < 0.01 < errors[4] < 0.1 < errors[3] < 0.2 < errors[2] < 0.45
    plain, meta = rel_error(QuantSpec(2, 16)), rel_error(EXPERT_PRESETS["2"])
    assert plain < 0.31 and meta < plain * 1.001


def test_presets():
    assert EXPERT_PRESETS["2"] == QuantSpec(bits=2, group_size=16, meta_bits=8, meta_group_size=128)
    assert EXPERT_PRESETS["3"] == QuantSpec(3, 64) and EXPERT_PRESETS["4"] == QuantSpec(4, 64)
    assert EXPERT_PRESETS["none"] is None and ATTN_PRESETS["4"] == QuantSpec(4, 64)
    assert ATTN_PRESETS["8"] == QuantSpec(8, 64) and ATTN_PRESETS["none"] is None
    for spec in (*EXPERT_PRESETS.values(), *ATTN_PRESETS.values()):
        if spec is not None:
            assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(MoEOffloadError) as err:
        preset(EXPERT_PRESETS, "5", "--expert-bits")
    assert str(err.value) == "unknown --expert-bits '5'; choose one of 2, 3, 4, none"
    with pytest.raises(ValueError):
        QuantSpec(bits=5, group_size=64)


def test_shapes_that_do_not_group_are_refused():
    with pytest.raises(MoEOffloadError) as err:
        quantize(_weight(), QuantSpec(4, 64))
    assert str(err.value) == (
        "cannot quantize a weight of shape (96, 80) at 4-bit g64: its input size 80 is not a multiple of "
        "group size 64; pass --expert-bits none (unquantized): no other preset takes this shape"
    )
    with pytest.raises(MoEOffloadError) as err:
        quantize(_weight(), EXPERT_PRESETS["2"])
    assert str(err.value) == (
        "cannot quantize a weight of shape (96, 80) at 2-bit g16, 8-bit meta g128: its 480 groups are not "
        "a multiple of meta group size 128; pass --expert-bits none (unquantized): no other preset takes this shape"
    )
    with pytest.raises(MoEOffloadError) as err:  # 2-bit g16 takes both [64, 96] and [96, 64], as an expert needs
        tensor_shapes((64, 96), EXPERT_PRESETS["4"], "w")
    assert str(err.value) == (
        "cannot quantize a weight of shape (64, 96) at 4-bit g64: its input size 96 is not a multiple of group "
        "size 64; pass --expert-bits 2 or none (none: unquantized)"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(dtype):
    weight = _weight((64, 128), seed=2)
    q = quantize(weight, QuantSpec(4, 32))
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = linear(x, q)
    assert out.dtype == dtype and out.shape == (3, 5, 64)
    assert torch.equal(out, F.linear(x, dequantize(q, dtype)))
    exact = F.linear(x.float(), weight)
    assert float((out.float() - exact).norm() / exact.norm()) < 0.1
    assert torch.equal(linear(x, weight.to(dtype)), F.linear(x, weight.to(dtype)))
    assert math.prod(out.shape) == 3 * 5 * 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_dequantize_is_bit_exact_against_bitsandbytes(dtype):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = _weight((96, 128), seed=6, dtype=torch.bfloat16)
    q = quantize_nf4(weight, NF4Spec(blocksize=64))
    assert q.codes.shape == (96 * 128 // 2,) and q.absmax.shape == (96 * 128 // 64,)
    assert torch.equal(torch.tensor(NF4_LEVELS), bnb_functional.get_4bit_type("nf4", device="cpu"))
    state = bnb_functional.QuantState(
        absmax=q.absmax, shape=torch.Size(q.shape), code=None, blocksize=64, quant_type="nf4", dtype=dtype
    )
    theirs = bnb_functional.dequantize_4bit(q.codes.view(-1, 1), state)
    as_int = {4: torch.int32, 2: torch.int16}[dtype.itemsize]
    assert torch.equal(dequantize_nf4(q, dtype).view(as_int), theirs.view(as_int))
    again = quantize_nf4(weight.clone(), NF4Spec(blocksize=64))
    assert torch.equal(again.codes, q.codes) and torch.equal(again.absmax, q.absmax)
    back = nf4_from_tensors(nf4_to_tensors(q, "q_proj"), "q_proj", NF4Spec(64), (96, 128))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(linear(x, back), F.linear(x, dequantize_nf4(q, dtype)))
    rel = (dequantize_nf4(q) - weight.float()).norm() / weight.float().norm()
    assert 0.05 < float(rel) < 0.12  # between hqq 4-bit g64 (~0.086) and 3-bit


def test_quantize_bytes_do_not_depend_on_the_thread_count():
    weight = _weight((256, 512), seed=7, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = to_tensors(quantize(weight, EXPERT_PRESETS["2"]), "w")
    finally:
        torch.set_num_threads(threads)
    many = to_tensors(quantize(weight, EXPERT_PRESETS["2"]), "w")
    assert all(torch.equal(one[name].view(torch.uint8), many[name].view(torch.uint8)) for name in one)


@pytest.mark.parametrize("preset", ["2", "3", "4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_through_a_workspace_is_bit_identical_and_reuses_its_buffers(preset, dtype):
    from quant.hqq import Workspace

    spec = EXPERT_PRESETS[preset]
    weights = [torch.randn(96, 128, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantized = [quantize(w, spec) for w in weights]
    workspace = Workspace()
    first = dequantize(quantized[0], dtype, workspace)
    assert torch.equal(first, dequantize(quantized[0], dtype))
    buffers = len(workspace._buffers)
    for q in quantized[1:]:  # the same shape: the same buffers, and still the exact values
        again = dequantize(q, dtype, workspace)
        assert torch.equal(again, dequantize(q, dtype))
        assert again.data_ptr() == first.data_ptr()
    assert len(workspace._buffers) == buffers


# 480 groups either way: below one output row a tile, a few rows, a third of a bit slot, and all of it
@pytest.mark.parametrize("max_weights", [1, 400, 2000, 1 << 20])
@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])  # 3-bit: 96 outputs split its slots of 10 rows, 80 do not
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_tiles_put_together_are_dequantize_bit_for_bit(spec, shape, max_weights):
    q = quantize(_weight(shape, seed=3), spec)
    (n, k), per = shape, {2: 4, 3: 10, 4: 2, 8: 1}[spec.bits]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        whole = dequantize(q, dtype)
        rebuilt, rows, tiles = torch.full_like(whole, float("nan")), 0, 0
        for first, tile in dequantize_tiles(q, dtype, Workspace(), max_weights):
            rebuilt[first : first + tile.shape[0]] = tile
            rows, tiles = rows + tile.shape[0], tiles + 1
            assert tile.numel() <= (max(max_weights, k) if n % per == 0 else n * k)  # else whole
        assert rows == n and torch.equal(rebuilt, whole)  # each row once, and no NaN left
        assert tiles >= (per if n % per == 0 else 1)  # one bit slot a tile at least


# (shape, weights a tile, whether the 8-bit meta (groups of 128) comes a tile at a time): tiles of 256 and 128
# grid rows, whole slots of 896 rows, start on its groups; tiles of 64 and 448 rows do not
@pytest.mark.parametrize(("shape", "max_weights", "tiled"), [
    ((256, 256), 1 << 12, True), ((256, 256), 1 << 11, True), ((256, 256), 1 << 10, False),
    ((256, 256), 1 << 20, True), ((64, 896), 896 * 16, True), ((64, 896), 896 * 8, False),
])  # fmt: skip
def test_an_aligned_8bit_meta_comes_a_tile_at_a_time_bit_for_bit(shape, max_weights, tiled):
    q = quantize(_weight(shape, seed=4), EXPERT_PRESETS["2"])
    assert q.spec.describe() == "2-bit g16, 8-bit meta g128"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        whole, workspace = dequantize(q, dtype), Workspace()
        rebuilt = torch.full_like(whole, float("nan"))
        for first, tile in dequantize_tiles(q, dtype, workspace, max_weights):
            rebuilt[first : first + tile.shape[0]] = tile
        assert torch.equal(rebuilt, whole)
        # a tile's rows of the meta, in a buffer of one tile's grid rows; or each meta dequantized whole
        made = {key[0]: key[1] for key in workspace._buffers}
        grid_rows = made["tile.grid"][0]
        if tiled:
            assert made["tile.scale.rows"] == made["tile.zero.rows"] == (grid_rows, 1) and "scale.grid" not in made
        else:
            assert made["scale.grid"] == (math.prod(shape) // 16 // 128, 128) and "tile.scale.rows" not in made


@pytest.mark.parametrize("bits", ["2", "3", "4"])
def test_linear_through_a_workspace_multiplies_tile_by_tile_into_out(bits):
    """Real hqq codes read through views into one packed buffer at an offset, as the MoE block reads a slot."""
    generator = torch.Generator().manual_seed(int(bits))
    fmt = ExpertFormat.build(128, 256, EXPERT_PRESETS[bits], torch.float32)
    raw = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in fmt._weight_shapes(128, 256).items()}
    buffer = torch.zeros(2 * fmt.nbytes, dtype=torch.uint8)[fmt.nbytes :]  # like an arena row
    buffer.copy_(fmt.pack(**raw))
    for q in fmt.unpack(buffer).values():
        for tokens in (1, 7):
            x = torch.randn(tokens, q.shape[1], generator=generator)
            out = torch.empty(tokens, q.shape[0])
            workspace = Workspace()
            with pytest.MonkeyPatch.context() as patch:  # tiles of 8 output rows here (0.5% of a real tile)
                patch.setitem(hqq.TILE_WEIGHTS, "cpu", 8 * q.shape[1])
                assert linear(x, q, workspace, out) is out
            exact = (x.double() @ dequantize(q, torch.float64).T).float()  # float32 sums in any order: ~1e-7
            torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6)
            grids = {key[0]: b.numel() for key, b in workspace._buffers.items() if key[0] in ("grid", "tile.grid")}
            # 3-bit's grid pads 10 rows to a byte, so its bit slots split output rows: dequantized whole
            assert grids == ({"grid": math.prod(q.shape)} if bits == "3" else {"tile.grid": 8 * q.shape[1]})


def test_tiles_refuse_shapes_that_do_not_match():
    """torch.mm(out=view) would resize a view of the wrong shape and write garbage; linear says so instead."""
    q = quantize(_weight((64, 256), seed=1), QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"^linear: x \(2, 128\) times a weight \(64, 256\): shapes do not match$"):
        linear(torch.zeros(2, 128), q, Workspace())
    with pytest.raises(ValueError, match=r"^linear: x \(2, 256\) times a weight \(64, 256\) into \(3, 64\): "):
        linear(torch.zeros(2, 256), q, Workspace(), torch.empty(3, 64))


@pytest.mark.parametrize("max_weights", [1, 300, 1 << 20])  # below one row, two rows of 128, all
@pytest.mark.parametrize("shape", [(64, 128), (96, 80)])  # 80 inputs split the blocks of 64: whole
def test_nf4_tiles_put_together_are_dequantize_bit_for_bit(shape, max_weights):
    q = quantize_nf4(_weight(shape, seed=5).to(torch.bfloat16))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        whole = dequantize_nf4(q, dtype)
        rebuilt, rows = torch.full_like(whole, float("nan")), 0
        for first, tile in bnb_dequantize_tiles(q, dtype, Workspace(), max_weights):
            rebuilt[first : first + tile.shape[0]] = tile
            rows += tile.shape[0]
            assert tile.numel() <= (max(max_weights, 128) if shape == (64, 128) else 96 * 80)
        assert rows == shape[0] and torch.equal(rebuilt, whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_through_a_workspace_allocates_only_its_output(dtype):
    from benchmarks.prefill_memory import live_peak

    q = quantize_nf4(torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(1)).to(dtype)
    workspace = Workspace()
    with pytest.MonkeyPatch.context() as patch:  # 64 rows a tile for HQQ, 16 for NF4 (a quarter)
        patch.setitem(hqq.TILE_WEIGHTS, "cpu", 64 * 1024)
        first = linear(x, q, workspace)
        peak = live_peak(lambda: linear(x, q, workspace))
        counted = workspace_bytes([q], dtype, "cpu")
    torch.testing.assert_close(first, F.linear(x, dequantize_nf4(q, dtype)))
    if dtype == torch.float32:  # (in bfloat16 the CPU's matmul allocates a scratch of its own, ~130 KB)
        assert peak == 16 * 512 * 4  # the output alone: the tiles reuse the workspace
    # a tile's int32 index (2 bytes a weight), float32 values, and the result in bfloat16; the table
    assert counted == 16 * 1024 * (2 + 4 + (2 if dtype == torch.bfloat16 else 0)) + 2048
    assert counted == sum(buffer.nbytes for buffer in workspace._buffers.values())


def test_nf4_quantization_prints_nothing_of_bitsandbytes_own():
    """bnb's CPU backend logs that the optional `kernels` package is missing on CPUs with AVX512-BF16 (this
    machine's); that is for its GEMM, which we never call, so `--attn-quant bnb` keeps it off the terminal.
    A fresh interpreter: the warning comes once, at bnb's first import."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import torch; from quant.bnb import quantize_nf4; quantize_nf4(torch.randn(64, 64))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_map_tensors_reaches_every_tensor_of_a_weight():
    """HQQ with quantized meta (2-bit Mixtral's experts), NF4 and plain: the bytes are those written to disk."""
    weights = [
        random_quantized((64, 256), EXPERT_PRESETS["2"], torch.Generator().manual_seed(0)),
        quantize_nf4(torch.randn(64, 128), NF4Spec()),
        torch.zeros(3, 5, dtype=torch.bfloat16),
    ]
    on_disk = [hqq.to_tensors(weights[0], "w"), nf4_to_tensors(weights[1], "w"), {"w": weights[2]}]
    assert isinstance(weights[0].scale, Quantized)  # the case a recursion must reach
    for weight, tensors in zip(weights, on_disk):
        assert weight_nbytes(weight) == sum(t.nbytes for t in tensors.values())
        assert sorted(t.nbytes for t in weight_tensors(weight)) == sorted(t.nbytes for t in tensors.values())
        written = weight_to_tensors(weight, "w")  # what quantize writes
        assert list(written) == list(tensors) and all(torch.equal(written[k], tensors[k]) for k in tensors)
        on_meta = map_tensors(weight, lambda t: torch.empty_like(t, device="meta"))
        assert type(on_meta) is type(weight) and weight_nbytes(on_meta) == weight_nbytes(weight)
