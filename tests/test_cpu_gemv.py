"""The CPU's fused dequantize+GEMV (quant/cpu_gemv.py, .c) against dequantize-then-multiply in float64, its
threads, what it serves, and its build."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import offload
from quant import cpu_gemv
from quant.hqq import EXPERT_PRESETS, Quantized, QuantSpec, Workspace, dequantize, random_quantized
from quant.linear import CPU, DEQUANTIZE, linear
from quant.packing import with_meta_by_output
from tests.tiny import make_tiny_mixtral, prefill_then_decode

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build quant/cpu_gemv.c")

CASES = {  # name: (spec, shape); N % PER picks the loop: whole outputs a thread, or packed rows a thread
    "2-bit g16, 8-bit meta": (EXPERT_PRESETS["2"], (96, 256)),
    "3-bit g64 (padded grid)": (EXPERT_PRESETS["3"], (96, 256)),
    "4-bit g64": (EXPERT_PRESETS["4"], (96, 256)),
    "8-bit g32": (QuantSpec(8, 32), (96, 256)),
    "2-bit g32, float meta": (QuantSpec(2, 32), (96, 256)),
    "2-bit g16, N % 4 = 2": (QuantSpec(2, 16), (66, 64)),
    "4-bit g256": (QuantSpec(4, 256), (64, 512)),
}


def with_random_meta(q: Quantized, generator: torch.Generator) -> Quantized:
    """q with every float scale and zero drawn at random: random_quantized makes them constant, under which a
    kernel reading another group's scale or zero would still be right."""

    def around(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=generator) * (high - low) + low).to(t.dtype)

    levels = (1 << q.spec.bits) - 1
    if isinstance(q.scale, Quantized):  # 8-bit codes already random; their own scale and zero constant
        scale = Quantized(q.scale.codes, around(q.scale.scale, 0.5e-4, 1.5e-4), around(q.scale.zero, 0, 16),
                          q.scale.shape, q.scale.spec)  # fmt: skip
        zero = Quantized(q.zero.codes, around(q.zero.scale, 0.5 * levels / 255, 1.5 * levels / 255),
                         around(q.zero.zero, 0, 16), q.zero.shape, q.zero.spec)  # fmt: skip
    else:
        scale, zero = around(q.scale, 0.02 / levels, 0.06 / levels), around(q.zero, 0, levels)
    return Quantized(q.codes, scale, zero, q.shape, q.spec)


def reference(x: torch.Tensor, q) -> torch.Tensor:
    return (x.double() @ dequantize(q, torch.float64).T).float()


def assert_close(got: torch.Tensor, x: torch.Tensor, q) -> None:
    """Within float32 rounding of the sum's terms: |x| @ |W|.T bounds each output's error scale."""
    scale = (x.double().abs() @ dequantize(q, torch.float64).abs().T).max().item()
    error = (got.double() - reference(x, q).double()).abs().max().item()
    assert error <= 1e-5 * scale, f"max error {error:.3g} against a scale of {scale:.3g}"


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 loop multiplies it: each 64 inputs of a token rounded to int8 by max |x| / 127, in
    float32 as moe_offload_quantize_tokens does (round half to even)."""
    blocks = x.view(x.shape[0], -1, 64)
    most = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(most > 0, torch.full_like(most, 127) / most, 0)  # 127 / most is 127 * (1 / most)
    return ((blocks * inverse).round() * (most / 127)).view_as(x)


def multiplied(x: torch.Tensor, q) -> torch.Tensor:
    """The tokens gemv multiplies by q: int8_rounded where it rounds them, else x itself."""
    return int8_rounded(x) if cpu_gemv.int8_tokens() and cpu_gemv.int8_layout(q) else x


@pytest.fixture(params=[0, 512, 256], ids=["float32 tokens", "int8 tokens, 512-bit", "int8 tokens, 256-bit"])
def tokens_in(request, monkeypatch) -> str:
    """Each test that takes it runs with tokens kept float32, then rounded to int8 at each VNNI width the CPU has
    (AVX-512 VNNI's loop, AVX-VNNI's): "float32 tokens" or "int8 tokens"."""
    width = request.param
    if width and width not in cpu_gemv.vnni_widths(cpu_gemv.library()):
        pytest.skip(f"this CPU has no {width}-bit VNNI")
    monkeypatch.setattr(cpu_gemv, "INT8_TOKENS", width > 0)
    monkeypatch.setattr(cpu_gemv, "vnni", lambda lib: width)
    return "int8 tokens" if width else "float32 tokens"


def most_tokens(spec: QuantSpec) -> int:
    """2-bit g16's loop takes tokens in blocks, and 3-bit g64's a tile of packed rows at a time: both serve more."""
    return cpu_gemv.max_tokens(spec.bits, spec.group_size)


@pytest.mark.parametrize(
    ("case", "tokens"), [(case, t) for case in CASES for t in sorted({1, 3, 8, most_tokens(CASES[case][0])})]
)
def test_gemv_matches_dequantize_then_multiply(case, tokens, tokens_in):
    """Against float64 products of the tokens it multiplies: int8 tokens are rounded as the C rounds them, so the
    int8 loop is held to float32 rounding too (and must differ from the float32 loop: it did run)."""
    spec, shape = CASES[case]
    generator = torch.Generator().manual_seed(len(case) + tokens)
    q = with_random_meta(random_quantized(shape, spec, generator), generator)
    x = torch.randn(tokens, shape[1], generator=generator)
    assert cpu_gemv.supports(x, q)
    got = cpu_gemv.gemv(x, q)
    assert_close(got, multiplied(x, q), q)
    assert cpu_gemv.int8_layout(q) == (spec.bits != 3 and case != "2-bit g16, N % 4 = 2")  # the loop reads
    int8 = tokens_in == "int8 tokens" and cpu_gemv.int8_layout(q)
    cpu_gemv.INT8_TOKENS = False
    assert torch.equal(got, cpu_gemv.gemv(x, q)) != int8


@pytest.mark.parametrize("shape", [(64, 2048), (1024, 4096)], ids=["one thread", "split, two meta groups an output"])
def test_meta_by_output_multiplies_as_grid_order(shape, tokens_in):
    """Scales and zeros by output (as load holds experts on the CPU: quant/packing.py) give the products of grid
    order bit for bit, through the strides the C reads them by; their own scales and zeros are random, so that a
    wrong one would show."""
    generator = torch.Generator().manual_seed(11)
    grid = with_random_meta(random_quantized(shape, EXPERT_PRESETS["2"], generator), generator)
    by_output = with_meta_by_output(grid)
    codes = by_output.scale.codes
    assert codes.shape == (4, shape[0] // 4, shape[1] // 16) and not codes.is_contiguous()
    for tokens in (1, 3, 4, most_tokens(grid.spec)):
        x = torch.randn(tokens, shape[1], generator=generator)
        assert cpu_gemv.supports(x, by_output)
        got = cpu_gemv.gemv(x, by_output)
        assert torch.equal(got, cpu_gemv.gemv(x, grid))
    assert_close(got, multiplied(x, grid), grid)


def test_int8_tokens_round_each_64_inputs_on_their_own_and_carry_nan(monkeypatch):
    """A block's scale is its own largest |x| / 127: a block of large values beside one of small ones leaves the
    small ones their precision. A block with inf or nan makes every output nan, as float products would (an inf
    token times a weight of both signs)."""
    monkeypatch.setattr(cpu_gemv, "INT8_TOKENS", True)
    if not cpu_gemv.int8_tokens():
        pytest.skip("this CPU has no VNNI")
    generator = torch.Generator().manual_seed(9)
    q = with_random_meta(random_quantized((64, 256), EXPERT_PRESETS["4"], generator), generator)
    x = torch.randn(2, 256, generator=generator) * torch.tensor([1e-3, 1e3, 1, 0]).repeat_interleave(64)
    x[1, 64:] = 0  # whole blocks of zeros: scale 0
    assert_close(cpu_gemv.gemv(x, q), int8_rounded(x), q)
    small = torch.zeros_like(x)
    small[:, :64] = x[:, :64]  # the first block alone, at 1e-3: rounded by its own scale, not the 1e3 block's
    assert_close(cpu_gemv.gemv(small, q), int8_rounded(small), q)
    assert (cpu_gemv.gemv(small, q) - reference(small, q)).abs().max() < 1e-2 * reference(small, q).abs().max()
    for bad in (float("inf"), float("nan")):
        x[0, 70] = bad
        y = cpu_gemv.gemv(x, q)
        assert y[0].isnan().all() and y[1].isfinite().all()


@pytest.mark.parametrize("bits", ["2", "4"])
def test_int8_tokens_serve_a_prefill_of_any_length_at_the_presets(bits, tokens_in):
    """Their int8 loops take tokens four at a time and beat the tiles at every count measured, so they serve any
    number of tokens; float32 tokens keep the float loop's limits."""
    generator = torch.Generator().manual_seed(10)
    q = with_random_meta(random_quantized((64, 256), EXPERT_PRESETS[bits], generator), generator)
    if tokens_in == "int8 tokens":
        assert cpu_gemv.supports(torch.zeros(4099, 256), q)
        counts = (132, 131)  # whole blocks of four; then three over, one at a time
    else:
        most = most_tokens(q.spec)
        assert most == {"2": 32, "4": 8}[bits]
        assert cpu_gemv.supports(torch.zeros(most, 256), q) and not cpu_gemv.supports(torch.zeros(most + 1, 256), q)
        counts = (most, most - 1)
    odd = random_quantized((65, 256), EXPERT_PRESETS["4"], generator)  # slots split outputs: the float loop's limit
    assert not cpu_gemv.supports(torch.zeros(cpu_gemv.MAX_TOKENS + 1, 256), odd)
    for tokens in counts:
        x = torch.randn(tokens, 256, generator=generator)
        assert_close(cpu_gemv.gemv(x, q), multiplied(x, q), q)


def test_int8_tokens_can_be_turned_off_from_the_environment():
    code = "from quant import cpu_gemv; print(cpu_gemv.INT8_TOKENS)"
    for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "MOE_OFFLOAD_INT8_TOKENS"}
        env |= {"MOE_OFFLOAD_INT8_TOKENS": value} if value is not None else {}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected


def test_every_float16_scale_converts_exactly():
    """The C's float16 conversion (branchless, so that it vectorizes) against torch's, for every bit pattern:
    one output a scale, every code 1, zero 0 and a one-hot token, so each output is its scale itself. Normals,
    subnormals and zeros come out equal (-0 as 0: the sum starts at 0); inf and nan as nan (inf times the token's
    zeros)."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    n = every.numel()
    codes = torch.full((n // 4, 16), 0b01010101, dtype=torch.uint8)  # four 2-bit codes of 1 a byte
    q = Quantized(codes, every[:, None].clone(), torch.zeros(n, 1, dtype=torch.float16), (n, 16), QuantSpec(2, 16))
    x = torch.zeros(1, 16)
    x[0, 0] = 1
    y = cpu_gemv.gemv(x, q)[0]
    finite = every.isfinite()
    assert torch.equal(y[finite], every[finite].float())
    assert y[~finite].isnan().all()


@pytest.mark.parametrize("threads_of", ["openmp", "pool"])
@pytest.mark.parametrize("bits", ["2", "3"])
def test_threads_split_a_large_weight(bits, threads_of, monkeypatch, tokens_in):
    """Over PARALLEL_WEIGHTS the call is split across torch's threads: OpenMP's where the build has it, else the
    pool's. Where each thread makes whole outputs (2-bit) the result does not depend on their number, bit for
    bit; where threads add into shared outputs (3-bit's padded grid) it is the same sum in another order."""
    if threads_of == "openmp":
        if not cpu_gemv._openmp(cpu_gemv.library()):
            pytest.skip("this build has no OpenMP, or the process holds two OpenMP runtimes")
        monkeypatch.setattr(cpu_gemv, "_pool", lambda threads: pytest.fail("the pool ran a share"))
    else:
        monkeypatch.setattr(cpu_gemv, "_openmp", lambda lib: False)
    generator = torch.Generator().manual_seed(3)
    q = with_random_meta(random_quantized((2048, 2048), EXPERT_PRESETS[bits], generator), generator)
    assert 2048 * 2048 >= cpu_gemv.PARALLEL_WEIGHTS
    x = torch.randn(2, 2048, generator=generator)
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 3):
            torch.set_num_threads(count)
            results[count] = cpu_gemv.gemv(x, q, workspace=Workspace())
    finally:
        torch.set_num_threads(threads)
    for got in results.values():
        assert_close(got, multiplied(x, q), q)
    if bits == "2":
        assert torch.equal(results[1], results[3])


def test_gemv_writes_into_out_and_linear_dispatches_on_the_workspace():
    generator = torch.Generator().manual_seed(4)
    q = random_quantized((96, 256), EXPERT_PRESETS["2"], generator)
    x = torch.randn(1, 256, generator=generator)
    out = torch.full((1, 96), float("nan"))
    assert cpu_gemv.gemv(x, q, out) is out
    assert torch.equal(linear(x, q, Workspace(CPU)), out)
    wide = torch.full((1, 2, 96), float("nan"))  # a strided view: written through a buffer
    assert cpu_gemv.gemv(x, q, wide[:, 1]) is not None and torch.equal(wide[:, 1], out)
    assert wide[:, 0].isnan().all()
    with pytest.raises(ValueError, match=r"gemv: x \(1, 256\) torch.float32 times a weight \(96, 256\) into \(1, 95\)"):
        cpu_gemv.gemv(x, q, torch.empty(1, 95))


def test_gemv_supports_only_what_it_reads():
    generator = torch.Generator().manual_seed(5)
    q = random_quantized((64, 256), EXPERT_PRESETS["4"], generator)
    x = torch.randn(cpu_gemv.MAX_TOKENS, 256, generator=generator)
    assert cpu_gemv.supports(x, q)
    assert not cpu_gemv.supports(torch.zeros(cpu_gemv.MAX_TOKENS + 1, 256), q)  # a prefill: BLAS is faster
    two_bit = random_quantized((64, 256), EXPERT_PRESETS["2"], generator)  # tokens in blocks: faster up to 32
    assert cpu_gemv.supports(torch.zeros(cpu_gemv.MAX_TOKENS_BLOCKED, 256), two_bit)
    assert not cpu_gemv.supports(torch.zeros(cpu_gemv.MAX_TOKENS_BLOCKED + 1, 256), two_bit)
    three_bit = random_quantized((64, 256), EXPERT_PRESETS["3"], generator)  # its tiles dequantize the grid whole
    assert cpu_gemv.supports(torch.zeros(32, 256), three_bit) and not cpu_gemv.supports(torch.zeros(33, 256), three_bit)
    assert (cpu_gemv.MAX_TOKENS, cpu_gemv.MAX_TOKENS_BLOCKED, cpu_gemv.MAX_TOKENS_3BIT) == (8, 32, 32)
    assert not cpu_gemv.supports(x.double(), q)
    assert not cpu_gemv.supports(torch.zeros(256, 2).T, q)  # not contiguous
    assert not cpu_gemv.supports(torch.zeros(1, 128), q)
    assert not cpu_gemv.supports(torch.zeros(1, 256), random_quantized((64, 256), QuantSpec(4, 8), generator))
    assert not cpu_gemv.supports(torch.zeros(1, 256), random_quantized((64, 256), QuantSpec(2, 16, 4, 128), generator))
    # what it refuses still multiplies, through dequantization; called anyway, it says so
    wide = x[:1].double()
    got = linear(wide, q, Workspace(CPU))
    assert got.dtype == torch.float64 and torch.allclose(got, reference(wide, q).double())
    many = torch.randn(cpu_gemv.MAX_TOKENS + 1, 256, generator=generator)
    assert_close(linear(many, q, Workspace(CPU)), many, q)
    strided = torch.randn(256, 2, generator=generator).T
    assert_close(linear(strided, q, Workspace(CPU)), strided, q)
    with pytest.raises(ValueError, match=r"gemv: x \(1, 256\) torch.float64 times 4-bit g64 \(64, 256\)"):
        cpu_gemv.gemv(wide, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_tokens_multiply_in_float32_and_round_once(dtype):
    """--dtype bfloat16 or float16 on the CPU: the same float32 products as float32 tokens, rounded once at
    the end, through the workspace's buffers (a decode step allocates nothing)."""
    generator = torch.Generator().manual_seed(8)
    q = with_random_meta(random_quantized((96, 256), EXPERT_PRESETS["2"], generator), generator)
    x = torch.randn(2, 256, generator=generator).to(dtype)
    assert cpu_gemv.supports(x, q)
    expected = cpu_gemv.gemv(x.float(), q).to(dtype)
    workspace = Workspace(CPU)
    out = torch.full((2, 96), float("nan"), dtype=dtype)
    assert linear(x, q, workspace, out) is out and torch.equal(out, expected)
    buffers = dict(workspace._buffers)
    assert torch.equal(linear(x, q, workspace), expected) and workspace._buffers.keys() == buffers.keys()
    message = rf"gemv: x \(2, 256\) {dtype} times a weight \(96, 256\) into \(2, 96\) torch.float32"
    with pytest.raises(ValueError, match=message):
        cpu_gemv.gemv(x, q, torch.empty(2, 96))


def test_a_forked_child_gets_threads_of_its_own():
    """The pool's threads are not in a forked child: it must start its own, not wait on them for ever."""
    generator = torch.Generator().manual_seed(6)
    q = random_quantized((2048, 2048), EXPERT_PRESETS["2"], generator)
    assert 2048 * 2048 >= cpu_gemv.PARALLEL_WEIGHTS  # the pool takes part
    x = torch.randn(1, 2048, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = cpu_gemv.gemv(x, q)  # the parent's pool has its thread now
        pid = os.fork()
        if pid == 0:  # the child: exit 0 if it multiplies the same
            torch.set_num_threads(2)
            os._exit(0 if torch.equal(cpu_gemv.gemv(x, q), expected) else 1)
    finally:
        torch.set_num_threads(threads)
    for _ in range(600):  # up to a minute
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in gemv")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_picks_the_kernel_on_the_cpu_and_decodes_as_the_dequantizing_path(tmp_path, monkeypatch, dtype, tokens_in):
    """Float32 tokens: the same logits as dequantizing, to float32's rounding (bfloat16's). Int8 tokens: as near
    as bfloat16's rounding puts them (this random model's logits move 0.06 in 3; benchmarks/quality_tiny.py
    measures what it costs the trained model)."""
    tolerance = 1e-4 if (dtype, tokens_in) == ("float32", "float32 tokens") else 0.1
    calls = []  # the kernel must run, not only be chosen: in bfloat16 it once never served a call
    multiply = cpu_gemv.multiply
    monkeypatch.setattr(cpu_gemv, "multiply", lambda *args: calls.append(args[0].dtype) or multiply(*args))
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=2, experts=4, seed=7)
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fused in (None, False):
        model = offload.load(str(tiny), device="cpu", dtype=dtype, expert_bits="2", attn_bits="4", slots=2,
                             fused_gemv=fused)  # fmt: skip
        expected = CPU if fused is None else None
        assert model.moe.workspace.kernel is expected and model.decoder.workspace.kernel is expected
        named = {None: f"{CPU.name}, int8 tokens" if tokens_in == "int8 tokens" else CPU.name, False: DEQUANTIZE}
        assert model.info()["decode kernel"] == named[fused]
        logits[fused] = prefill_then_decode(model, tokens, 8).float()
        assert set(calls) == ({getattr(torch, dtype)} if fused is None else set())
        calls.clear()
    difference = (logits[None] - logits[False]).abs().max().item()
    assert difference < tolerance
    if tokens_in == "int8 tokens" and dtype == "float32":
        assert difference > 1e-3  # they were rounded


def test_load_on_the_cpu_holds_experts_by_output_and_decodes_as_grid_order(tmp_path, monkeypatch):
    """At hidden 2048 an output of w1 and w3 is 128 groups at 2-bit g16, a whole meta group: load lays out their
    scales and zeros by output (w2's stay in grid order), and the logits are grid order's, bit for bit."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=2048, intermediate=64, layers=1, experts=4, seed=3)
    tokens = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(0))
    logits = {}
    for order, slots in (("output", None), ("output", 2), ("grid", None), ("grid", 2)):
        if order == "grid":
            monkeypatch.setattr(offload.api, "meta_order", lambda meta_rows, device, fused: "grid")  # as on CUDA
        model = offload.load(str(tiny), device="cpu", expert_bits="2", attn_bits="4", slots=slots)
        experts = model.prepared.expert_format
        assert experts.meta_order == order
        by_output = ", scales and zeros by output" if order == "output" else ""
        assert model.info()["experts"] == "2-bit g16, 8-bit meta g128" + by_output
        names = {entry.name for entry in experts.layout.entries}
        assert ("w1.meta.codes" in names) == (order == "output") and "w2.scale.codes" in names
        logits[order, slots] = prefill_then_decode(model, tokens, 6)
    for slots in (None, 2):  # direct, and through slots: the same bytes, copied
        assert torch.equal(logits["output", slots], logits["grid", slots])


@pytest.mark.parametrize("bits", ["2", "3", "4"])
def test_info_names_int8_tokens_only_where_the_experts_take_them(tmp_path, tokens_in, bits):
    """3-bit's padded grid keeps its tokens float32 even where the CPU rounds the others: `info` and `bench`
    say int8 only where the experts' loop rounds them."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=1, experts=4, seed=7)
    prepared = offload.prepare(str(tiny), device="cpu", expert_bits=bits, slots=2)
    rounded = tokens_in == "int8 tokens" and bits != "3"
    assert offload.api.describe(prepared)["decode kernel"] == (f"{CPU.name}, int8 tokens" if rounded else CPU.name)


def test_a_build_is_made_once_and_kept(tmp_path, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    path = cpu_gemv.build(compiler, tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.name.startswith("cpu_gemv-") and path.suffix == ".so"
    assert os.listdir(tmp_path / "cache") == [path.name]  # no temporary left beside it
    monkeypatch.setattr(cpu_gemv.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert cpu_gemv.build(compiler, tmp_path / "cache") == path
    cpu_gemv.load(path)  # loads, with its entry points


def test_the_openmp_build_joins_torchs_runtime():
    """Built with -fopenmp (gcc and clang on Linux), the kernel's threads are torch's OpenMP team: it binds to
    torch's own runtime (torch/lib/libgomp.so.1 in the pip wheels), not a second whose threads would compete
    with torch's for the cores. (sentencepiece's private libgomp-*.so, loaded beside it, is neither.)"""
    lib = cpu_gemv.library()
    if not lib.moe_offload_openmp():
        pytest.skip("the compiler here builds without -fopenmp")
    assert cpu_gemv._openmp(lib) and cpu_gemv.openmp_entry(lib) == cpu_gemv.torch_openmp() is not None
    wheel = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if os.path.exists(wheel):
        assert cpu_gemv.openmp_entry(lib) == cpu_gemv.openmp_entry(cpu_gemv.ctypes.CDLL(wheel))


@pytest.mark.parametrize("refused", ["-march=native", "-fopenmp"])
def test_a_compiler_that_refuses_a_flag_builds_without_it(tmp_path, refused):
    """-march=native and -fopenmp are each dropped where the compiler refuses them (clang without libomp
    refuses -fopenmp): a build without OpenMP splits a call on the pool's threads."""
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    fussy = tmp_path / "fussy-cc"
    fussy.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = {refused} ] && exit 1; done\nexec {real} "$@"\n')
    fussy.chmod(fussy.stat().st_mode | stat.S_IXUSR)
    lib = cpu_gemv.load(cpu_gemv.build(str(fussy), tmp_path / "cache"))
    assert lib.moe_offload_openmp() == (refused != "-fopenmp") and not (refused == "-fopenmp" and cpu_gemv._openmp(lib))


def test_a_build_is_readable_by_others_and_an_unwritable_cache_is_refused(tmp_path, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cpu_gemv.build(compiler, tmp_path / "cache").stat().st_mode & 0o555 == 0o555  # a cache shared by users
    (tmp_path / "file").write_text("")
    with pytest.raises(cpu_gemv.KernelUnavailable, match=r"^cannot write in .*/file/cache: Not a directory$"):
        cpu_gemv.build(compiler, tmp_path / "file" / "cache")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(cpu_gemv.Path, "home", no_home)  # no HOME, no passwd entry: the temporary folder
    assert cpu_gemv.cache_dir() == cpu_gemv.Path(cpu_gemv.tempfile.gettempdir()) / "moe-offload"


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text('#!/bin/sh\necho "cpu_gemv.c:1: error: something is wrong" >&2\nexit 1\n')
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(cpu_gemv.KernelUnavailable) as raised:
        cpu_gemv.build(str(broken), tmp_path / "cache")
    assert str(raised.value) == f"{broken} could not build cpu_gemv.c: cpu_gemv.c:1: error: something is wrong"
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("threads_of", ["openmp", "pool"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_narrow_table_multiplies_as_its_float32_widening_does(dtype, threads_of, monkeypatch):
    """multiply_wide (the CPU's lm_head at its checkpoint's width): each weight widened exactly, the products and
    sums in float32, so F.linear(x, w.float()) but for the order of the sums; float16's subnormals, infinities
    and nan widen as torch widens them. The same at 1 and 3 threads of either kind, and at 1 token (widened on the
    way) and several (sharing a row widened once)."""
    if threads_of == "openmp" and not cpu_gemv._openmp(cpu_gemv.library()):
        pytest.skip("this build has no OpenMP, or the process holds two OpenMP runtimes")
    if threads_of == "pool":
        monkeypatch.setattr(cpu_gemv, "_openmp", lambda lib: False)
    generator = torch.Generator().manual_seed(12)
    w = torch.randn(1030, 1024, generator=generator).to(dtype)  # over 2^20 weights: split; 1030 rows: uneven shares
    if dtype == torch.float16:
        w[0, :4] = torch.tensor([6e-8, -3e-5, float("inf"), 65504.0])  # subnormals, inf, the largest
        w[1, 0] = float("nan")
    threads = torch.get_num_threads()
    for tokens in (1, 3, cpu_gemv.MAX_TOKENS):
        x = torch.randn(tokens, 1024, generator=generator)
        assert cpu_gemv.supports_wide(x, w)
        try:
            results = []
            for count in (1, 3):
                torch.set_num_threads(count)
                results.append(cpu_gemv.multiply_wide(x, w))
        finally:
            torch.set_num_threads(threads)
        expected = (x.double() @ w.double().T).float()
        for got in results:
            assert got.dtype == torch.float32 and got.shape == (tokens, 1030)
            finite, infinite = expected.isfinite(), expected.isinf()
            assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got[infinite], expected[infinite])
            assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-4)
        out = torch.full((tokens, 1030), float("nan"))
        assert cpu_gemv.multiply_wide(x, w, out) is out
        torch.testing.assert_close(out, results[0], rtol=0, atol=0, equal_nan=True)


def test_a_narrow_table_is_served_only_as_the_kernel_reads_it():
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    x = torch.zeros(1, 128)
    assert cpu_gemv.supports_wide(x, w) and cpu_gemv.supports_wide(x, w.half())
    assert not cpu_gemv.supports_wide(x, w.float())  # not narrow
    assert not cpu_gemv.supports_wide(x.bfloat16(), w)  # tokens not float32
    assert not cpu_gemv.supports_wide(torch.zeros(1, 96), torch.zeros(64, 96, dtype=torch.bfloat16))  # K % 64
    assert not cpu_gemv.supports_wide(torch.zeros(cpu_gemv.MAX_TOKENS + 1, 128), w)  # a prefill: BLAS, widened
    assert not cpu_gemv.supports_wide(x, torch.zeros(128, 64, dtype=torch.bfloat16).T)  # not contiguous
    assert not cpu_gemv.supports_wide(torch.zeros(1, 256), w)  # shapes that do not match


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("kernel", ["C", "none"])
def test_linear_widens_a_narrow_table(tokens, kernel, monkeypatch):
    """linear() takes a bfloat16 table against float32 tokens: through the C kernel where the workspace carries
    it and it serves the call, else widened a tile of rows at a time (a prefill, or --no-fused-gemv); 3-D tokens
    and `out` as for any weight."""
    generator = torch.Generator().manual_seed(13)
    w = torch.randn(300, 128, generator=generator).bfloat16()
    x = torch.randn(2, tokens, 128, generator=generator)
    workspace = Workspace(CPU if kernel == "C" else None)
    calls = []
    wide = cpu_gemv.multiply_wide
    monkeypatch.setattr(cpu_gemv, "multiply_wide", lambda *args: calls.append(args) or wide(*args))
    got = linear(x, w, workspace)
    out = torch.empty(2, tokens, 300)
    assert linear(x, w, workspace, out) is out
    assert len(calls) == (2 if kernel == "C" and 2 * tokens <= cpu_gemv.MAX_TOKENS else 0)
    expected = torch.nn.functional.linear(x, w.float())
    for result in (got, out, linear(x, w)):  # the last without a workspace: widened tiles of its own
        assert result.shape == (2, tokens, 300) and torch.allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_another_revisions_source_builds_beside_this_ones(tmp_path):
    """benchmarks/cpu_gemv_ab.py builds another revision's cpu_gemv.c, its header beside it: the same source keeps
    the same build, and a changed one (here its header) gets a build of its own, which loads."""
    for name in (cpu_gemv.SOURCE.name, *cpu_gemv.HEADER_NAMES):
        (tmp_path / name).write_bytes(cpu_gemv.SOURCE.with_name(name).read_bytes())
    compiler, folder = cpu_gemv.find_compiler(), cpu_gemv.cache_dir()
    ours = cpu_gemv.build(compiler, folder)
    assert cpu_gemv.build(compiler, folder, tmp_path / cpu_gemv.SOURCE.name) == ours
    header = tmp_path / cpu_gemv.HEADER_NAMES[0]
    header.write_text(header.read_text() + "\n/* another revision */\n")
    theirs = cpu_gemv.build(compiler, tmp_path, tmp_path / cpu_gemv.SOURCE.name)
    assert theirs != ours and theirs.parent == tmp_path
    assert cpu_gemv.load(theirs).moe_offload_vnni() == cpu_gemv.library().moe_offload_vnni()


def test_an_installed_package_carries_the_kernels_sources():
    """A wheel holds quant/'s non-Python files only where pyproject.toml's package-data names them: the C source
    and every header it includes (without cpu_gemv_int8.h a wheel's first CPU load failed), and tuned launches."""
    import ast
    import fnmatch
    import re

    pyproject = (cpu_gemv.SOURCE.parents[1] / "pyproject.toml").read_text()  # tomllib is Python 3.11's
    section = pyproject[pyproject.index("[tool.setuptools.package-data]") :]
    patterns = ast.literal_eval(re.search(r"^quant = (\[.*?\])", section, flags=re.M)[1])
    for name in (cpu_gemv.SOURCE.name, *cpu_gemv.HEADER_NAMES, "gemv_tuned/NVIDIA_H100_80GB_HBM3.json"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
