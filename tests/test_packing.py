"""quant/packing.py: one buffer per expert, exact bytes, zero-copy views, exact round trips."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from quant import hqq
from quant.hqq import EXPERT_PRESETS, Quantized, QuantSpec, dequantize, quantize, random_quantized, to_tensors
from quant.packing import (
    ExpertFormat,
    PackedLayout,
    TensorEntry,
    by_row,
    has_meta_by_row,
    with_meta_by_output,
    with_meta_by_row,
)

D, I = 64, 128  # hidden, intermediate: w1 [128, 64] at 2-bit g16 has 512 groups, 4 meta groups of 128


def _expert(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(I, D, generator=generator) * 0.02 for _ in range(2))
    w2 = torch.randn(D, I, generator=generator) * 0.02
    return w1.to(dtype), w2.to(dtype), w3.to(dtype)


def test_layout_offsets_are_aligned_and_nbytes_exact():
    tensors = {
        "a": torch.zeros(3, dtype=torch.uint8),
        "b": torch.zeros(5, 7, dtype=torch.float16),
        "c": torch.zeros(2, dtype=torch.int32),
    }
    layout = PackedLayout.of(tensors)
    assert layout.entries == (
        TensorEntry("a", 0, (3,), "uint8"),
        TensorEntry("b", 64, (5, 7), "float16"),
        TensorEntry("c", 192, (2,), "int32"),  # b ends at 64 + 70 = 134
    )
    assert layout.nbytes == 256  # c ends at 200, rounded up so experts back to back stay aligned
    assert PackedLayout.of(tensors, align=16).nbytes == 112  # a 0..3, b 16..86, c 96..104
    assert PackedLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_views_share_storage_with_the_buffer():
    fmt = ExpertFormat.build(D, I, EXPERT_PRESETS["4"], torch.bfloat16)
    buffer = fmt.pack(*_expert())
    views = fmt.layout.views(buffer)
    for entry in fmt.layout.entries:
        assert entry.offset % 64 == 0
        assert views[entry.name].data_ptr() == buffer.data_ptr() + entry.offset
    before = buffer.clone()
    views["w2.scale"][3, 0] = 1.5  # float16 1.5 = 0x3E00, little-endian
    changed = (buffer != before).nonzero().flatten().tolist()
    offset = fmt.layout.entries[[e.name for e in fmt.layout.entries].index("w2.scale")].offset + 3 * 2
    assert changed == [offset + 1] or changed == [offset, offset + 1]
    assert buffer[offset + 1].item() == 0x3E and buffer[offset].item() == 0x00


@pytest.mark.parametrize("name", ["2", "3", "4"])
def test_pack_views_dequantize_equals_the_original(name):
    spec = EXPERT_PRESETS[name]
    fmt = ExpertFormat.build(D, I, spec, torch.bfloat16)
    w1, w2, w3 = _expert(seed=int(name))
    # Packed into the middle of an arena, as the cache does: views must work at any aligned offset.
    arena = torch.full((3, fmt.nbytes), 0xAB, dtype=torch.uint8)
    fmt.pack(w1, w2, w3, out=arena[1])
    unpacked = fmt.unpack(arena[1])
    assert torch.equal(arena[1], fmt.pack(w1, w2, w3))  # garbage in `out` never leaks into the bytes
    for key, weight in {"w1": w1, "w2": w2, "w3": w3}.items():
        original = quantize(weight, spec)
        got = unpacked[key]
        assert isinstance(got, Quantized) and got.shape == tuple(weight.shape)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize(got, dtype), dequantize(original, dtype))
        assert got.codes.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()


@pytest.mark.parametrize("spec", [EXPERT_PRESETS["2"], QuantSpec(3, 32), None], ids=["2", "3g32", "none"])
def test_analytic_layout_matches_the_real_tensors(spec):
    fmt = ExpertFormat.build(D, I, spec, torch.float16)
    if spec is None:
        tensors = dict(zip(("w1", "w2", "w3"), (w.half() for w in _expert())))
    else:
        tensors = {}
        for key, weight in zip(("w1", "w2", "w3"), _expert()):
            tensors.update(to_tensors(quantize(weight, spec), key))
    assert fmt.layout == PackedLayout.of(tensors)


def test_expert_format_dict_round_trip():
    for spec in (*EXPERT_PRESETS.values(), QuantSpec(8, 32)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            fmt = ExpertFormat.build(D, I, spec, dtype)
            assert ExpertFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unquantized_experts_round_trip_exactly(dtype):
    fmt = ExpertFormat.build(D, I, None, dtype)
    assert fmt.nbytes == 3 * D * I * dtype.itemsize  # 64 * 128 * itemsize is already 64-aligned
    w1, w2, w3 = _expert(seed=5, dtype=dtype)
    got = fmt.unpack(fmt.pack(w1, w2, w3))
    for key, weight in {"w1": w1, "w2": w2, "w3": w3}.items():
        assert got[key].dtype == dtype and torch.equal(got[key], weight)


def test_mixtral_expert_bytes():
    # Mixtral-8x7B: hidden 4096, intermediate 14336; these figures go into the README.
    nbytes = {
        name: ExpertFormat.build(4096, 14336, spec, torch.bfloat16).nbytes for name, spec in EXPERT_PRESETS.items()
    }
    assert nbytes == {"2": 66_748_416, "3": 81_474_816, "4": 99_090_432, "none": 352_321_536}


def test_pack_refuses_wrong_shapes():
    fmt = ExpertFormat.build(D, I, EXPERT_PRESETS["4"], torch.bfloat16)
    w1, w2, w3 = _expert()
    row = torch.full((fmt.nbytes,), 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w2: expected shape \(64, 128\), got \(128, 64\)"):
        fmt.pack(w1, w1, w3, out=row)
    two_bit = ExpertFormat.build(D, I, EXPERT_PRESETS["2"], torch.bfloat16)
    other = two_bit.unpack(two_bit.random(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="w3: quantized at 2-bit"):
        fmt.pack(w1, w2, other["w3"], out=row)
    assert bool((row == 7).all())  # every check comes before the first byte is written: w1 was fine
    with pytest.raises(ValueError, match="uint8 buffer of shape"):
        fmt.layout.views(torch.zeros(fmt.nbytes - 1, dtype=torch.uint8))


TINY = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-mixtral-code"


def test_trained_expert_output_error_by_preset():
    """A real trained expert (tiny model, layer 3, expert 5), packed and run: error grows as bits fall."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} is not there")
    weight_map = json.loads((TINY / "model.safetensors.index.json").read_text())["weight_map"]
    weights = []
    for index in (1, 2, 3):
        name = f"model.layers.3.block_sparse_moe.experts.5.w{index}.weight"
        with safe_open(TINY / weight_map[name], "pt") as f:
            weights.append(f.get_tensor(name))
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))

    def expert(w1, w2, w3):
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    exact = expert(*weights)
    errors = {}
    for name, spec in EXPERT_PRESETS.items():
        fmt = ExpertFormat.build(128, 256, spec, torch.float32)
        unpacked = fmt.unpack(fmt.pack(*weights))
        packed = [unpacked[key] if spec is None else dequantize(unpacked[key]) for key in ("w1", "w2", "w3")]
        errors[name] = float((expert(*packed) - exact).norm() / exact.norm())
    assert errors["none"] == 0.0
    assert errors["4"] < 0.10 < errors["3"] < 0.22 < errors["2"] < 0.37  # measured 0.090, 0.199, 0.345


@pytest.mark.parametrize("name", list(EXPERT_PRESETS))
def test_random_expert_is_deterministic_and_sane(name):
    spec = EXPERT_PRESETS[name]
    fmt = ExpertFormat.build(D, I, spec, torch.bfloat16)
    buffer = fmt.random(torch.Generator().manual_seed(1))
    assert torch.equal(buffer, fmt.random(torch.Generator().manual_seed(1), out=torch.full_like(buffer, 7)))
    assert not torch.equal(buffer, fmt.random(torch.Generator().manual_seed(2)))
    for weight in fmt.unpack(buffer).values():
        weight = weight.float() if spec is None else dequantize(weight)
        assert bool(torch.isfinite(weight).all()) and float(weight.abs().max()) < 0.1
        assert 0.005 < float(weight.std()) < 0.03


WIDE = 2048  # hidden and intermediate where 2-bit g16 gives an output 128 groups, a whole meta group: by output


@pytest.mark.parametrize("name", ["2", "3", "4"])
def test_meta_by_output_is_a_layout_of_the_same_weights(name):
    """On the CPU an expert's 8-bit scale and zero codes, and their own scales and zeros, lie by output: the same
    bytes, moved. Each format reads the other's experts and packs them back byte for byte, and both dequantize the
    same, bit for bit, whole and a tile at a time. Presets with float meta (3 and 4 bits) keep their layout."""
    spec = EXPERT_PRESETS[name]
    grid = ExpertFormat.build(WIDE, 256, spec, torch.float32)
    cpu = grid.on_cpu()
    if name != "2":
        assert cpu is grid  # its experts load as the files hold them
        return
    assert cpu.meta_order == "output" and cpu.on_cpu() is cpu and grid.meta_order == "grid"
    tiny = ExpertFormat.build(64, 128, spec, torch.float32)  # 4 and 8 groups an output, no meta group whole
    assert tiny.on_cpu() is tiny
    names = [entry.name for entry in cpu.layout.entries if entry.name.startswith("w1.")]
    assert names == ["w1.codes", "w1.meta.codes", "w1.meta.meta"]
    shapes = {entry.name: (entry.shape, entry.dtype) for entry in cpu.layout.entries}
    assert shapes["w1.meta.codes"] == ((64, 4, 2, 128), "uint8")  # w1 [256, 2048]: 64 packed rows of 4 slots
    assert shapes["w1.meta.meta"] == ((64, 4, 2, 2, 1), "float16")
    assert "w2.meta.codes" not in shapes and "w2.scale.codes" in shapes  # w2's 16 groups an output: grid order
    assert cpu.nbytes == grid.nbytes
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in ((256, WIDE), (WIDE, 256), (256, WIDE))]
    in_grid, by_output = grid.pack(*weights), cpu.pack(*weights)
    assert torch.equal(cpu.pack(**grid.unpack(in_grid)), by_output)
    assert torch.equal(grid.pack(**cpu.unpack(by_output)), in_grid)
    for fmt, source, want in ((cpu, in_grid, by_output), (grid, by_output, in_grid)):  # into a used row, as load does
        row = torch.full((fmt.nbytes,), 0xA5, dtype=torch.uint8)
        assert fmt.pack(**(grid if fmt is cpu else cpu).unpack(source), out=row) is row and torch.equal(row, want)
    assert not torch.equal(by_output, in_grid)
    ours, theirs = cpu.unpack(by_output), grid.unpack(in_grid)
    for key in ("w1", "w2", "w3"):
        assert torch.equal(dequantize(ours[key]), dequantize(theirs[key]))
        with_workspace = [dequantize(unpacked[key], workspace=hqq.Workspace()) for unpacked in (ours, theirs)]
        assert torch.equal(*with_workspace)
        for most in (1 << 12, 1 << 16):  # tiles of 2 and of 32 outputs
            tiles = [
                hqq.dequantize_tiles(unpacked[key], torch.float32, hqq.Workspace(), most) for unpacked in (ours, theirs)
            ]
            assert all(a == b and torch.equal(x, y) for (a, x), (b, y) in zip(*tiles, strict=True))


def test_meta_by_output_puts_an_outputs_scales_and_zeros_together():
    """Output q's bit slot s, scales then zeros: grid row s * step + q * G + j's code at ((q * PER + s) * 2 + part) *
    G + j, and the views over it are zero-copy."""
    cpu = ExpertFormat.build(WIDE, 256, EXPERT_PRESETS["2"], torch.float32).on_cpu()
    buffer = cpu.random(torch.Generator().manual_seed(5))
    w1 = cpu.unpack(buffer)["w1"]
    meta = {entry.name: entry for entry in cpu.layout.entries}["w1.meta.codes"]
    step, groups = w1.codes.shape[0], 128
    for part, values in enumerate((w1.scale, w1.zero)):
        assert values.codes.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        grid = values.codes.reshape(-1)  # grid order
        for s, q, j in ((0, 0, 0), (1, 0, 5), (3, 63, 127), (2, 17, 64)):
            at = meta.offset + ((q * 4 + s) * 2 + part) * groups + j
            assert grid[s * step + q * groups + j] == buffer[at]
    with pytest.raises(ValueError, match="not written to a file"):
        cpu.to_dict()
    grid_format = ExpertFormat.build(WIDE, 256, EXPERT_PRESETS["2"], torch.float32)
    assert torch.equal(buffer, cpu.pack(**grid_format.unpack(grid_format.random(torch.Generator().manual_seed(5)))))


def test_meta_by_packed_row_puts_a_rows_slots_together():
    """with_meta_by_row, the GPU kernel's order: grid row s * step + p's scale code at (p * 2 + 0) * PER + s and its
    zero code at (p * 2 + 1) * PER + s; the float16 meta of its meta group at (p // 128 * 4 + k) * PER + s (k: the
    scales' scale, their zero, the zeros' scale, their zero). The same weights, bit for bit; has_meta_by_row tells its
    views from grid order's, the CPU's by output, and a copy; what cannot hold it says why."""
    generator = torch.Generator().manual_seed(6)
    q = random_quantized((64, WIDE), EXPERT_PRESETS["2"], generator)
    rows = with_meta_by_row(q)
    assert rows.codes is q.codes and torch.equal(dequantize(rows), dequantize(q))
    assert has_meta_by_row(rows) and not has_meta_by_row(q) and not has_meta_by_row(with_meta_by_output(q))
    view = rows.scale.codes
    alike = torch.empty_strided(view.shape, view.stride(), dtype=view.dtype).copy_(view)  # strides and all, elsewhere
    scale = rows.scale
    copied = Quantized(rows.codes, Quantized(alike, scale.scale, scale.zero, scale.shape, scale.spec), rows.zero,
                       rows.shape, rows.spec)  # fmt: skip
    assert torch.equal(dequantize(copied), dequantize(q)) and not has_meta_by_row(copied)

    def held(view, dtype):  # the whole tensor a view is of
        return torch.empty(0, dtype=dtype).set_(view.untyped_storage(), 0, (view.untyped_storage().nbytes()
                                                                             // dtype.itemsize,))  # fmt: skip

    codes, meta = held(rows.scale.codes, torch.uint8), held(rows.scale.scale, torch.float16)
    step = q.codes.shape[0]  # packed rows: 16 outputs of 128 groups
    for s, p in ((0, 0), (1, 5), (3, step - 1), (2, 1000)):
        r = s * step + p
        assert codes[p * 8 + s] == q.scale.codes.reshape(-1)[r] and codes[p * 8 + 4 + s] == q.zero.codes.reshape(-1)[r]
        for k, grid in enumerate((q.scale.scale, q.scale.zero, q.zero.scale, q.zero.zero)):
            assert meta[(p // 128 * 4 + k) * 4 + s] == grid.reshape(-1)[r // 128]
    with pytest.raises(ValueError, match=r"^a weight \(64, 2048\) at 4-bit g64 has no meta by packed row$"):
        with_meta_by_row(random_quantized((64, WIDE), EXPERT_PRESETS["4"], generator))
    narrow = random_quantized((64, 256), EXPERT_PRESETS["2"], generator)  # 16 groups an output: no meta group whole
    assert not by_row(narrow.shape, narrow.spec) and not has_meta_by_row(narrow)


def test_a_format_by_packed_row_holds_the_same_weights_as_the_kernel_reads_them():
    """in_order("row"), as a load with meta_rows holds experts for the GPU's kernel: w1 and w3 [256, 2048] and w2
    [2048, 256] at 2-bit g16 (G 128 and 16: w2's has no meta group whole and stays in grid order) lie by packed row,
    with_meta_by_row's tensors in their place. Grid, output and row formats read each other's experts and pack them
    back byte for byte; the unpacked weights are the kernel's (has_meta_by_row) and dequantize as grid order's, bit
    for bit. Orders a weight cannot hold give the grid order's format itself; no format but grid's is written."""
    spec = EXPERT_PRESETS["2"]
    grid = ExpertFormat.build(WIDE, 256, spec, torch.float32)
    rows = grid.in_order("row")
    assert rows.meta_order == "row" and rows.in_order("row") is rows and rows.in_order("grid") == grid
    assert rows.meta_by_row((256, WIDE)) and not rows.meta_by_row((WIDE, 256)) and not grid.meta_by_row((256, WIDE))
    shapes = {entry.name: (entry.shape, entry.dtype) for entry in rows.layout.entries}
    assert [name for name in shapes if name.startswith("w1.")] == ["w1.codes", "w1.meta.codes", "w1.meta.meta"]
    assert shapes["w1.meta.codes"] == ((64, 128, 2, 4), "uint8")  # 64 packed rows, 128 groups, 4 slots
    assert shapes["w1.meta.meta"] == ((64, 1, 4, 4), "float16")
    assert "w2.meta.codes" not in shapes and "w2.scale.codes" in shapes and rows.nbytes == grid.nbytes
    weights = [torch.randn(shape, generator=torch.Generator().manual_seed(9)) * 0.02
               for shape in ((256, WIDE), (WIDE, 256), (256, WIDE))]  # fmt: skip
    cpu = grid.on_cpu()
    packed = {fmt.meta_order: fmt.pack(*weights) for fmt in (grid, cpu, rows)}
    assert not torch.equal(packed["row"], packed["grid"]) and not torch.equal(packed["row"], packed["output"])
    for to in (grid, cpu, rows):
        for source in (grid, cpu, rows):
            row = torch.full((to.nbytes,), 0xA5, dtype=torch.uint8)  # a used cache row, as load fills
            assert torch.equal(to.pack(**source.unpack(packed[source.meta_order]), out=row), packed[to.meta_order])
    ours, theirs = rows.unpack(packed["row"]), grid.unpack(packed["grid"])
    assert has_meta_by_row(ours["w1"]) and has_meta_by_row(ours["w3"]) and not has_meta_by_row(ours["w2"])
    for key in ("w1", "w2", "w3"):
        assert torch.equal(dequantize(ours[key]), dequantize(theirs[key]))
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(rows.random(generator), rows.pack(**grid.unpack(grid.random(torch.Generator().manual_seed(3)))))
    with pytest.raises(ValueError, match="^an expert format with its meta by row is not written to a file$"):
        rows.to_dict()
    for narrow in (ExpertFormat.build(64, 128, spec, torch.float32), ExpertFormat.build(WIDE, 256, EXPERT_PRESETS["3"],
                                                                                      torch.float32)):  # fmt: skip
        assert narrow.in_order("row") is narrow and narrow.in_order("output") is narrow
    with pytest.raises(ValueError, match=r"^unknown meta order 'column'; the orders are grid, output, row$"):
        grid.in_order("column")
