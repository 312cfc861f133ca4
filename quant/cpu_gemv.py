"""Fused dequantize + GEMV for HQQ weights on the CPU: quant/gemv.py's kernel, written in C.

A decode step on the CPU multiplies one token by each active expert's three matrices. Dequantizing a tile
first (quant.hqq.dequantize_tiles) makes five float32 passes over every weight (shift, mask, convert,
subtract the zero, scale) before the product reads it; this reads each packed element once and makes all
of its codes' products from it (quant/cpu_gemv.c). A 2-bit Mixtral-8x7B expert matrix times one token on
2 threads: 2.1 ms against 11.8 dequantized in tiles (benchmarks/results/expert_mlp_cpu.json).

The C file is built on first use with the machine's compiler (cc, gcc or clang), for the machine's own
vector units (-march=native), and kept in ~/.cache/moe-offload (or $XDG_CACHE_HOME/moe-offload) under a
name that hashes the source, the compiler and the CPU. Without a compiler, decode dequantizes as before.
Calls over OPENMP_PARALLEL_WEIGHTS weights are split across torch.get_num_threads() threads of torch's own
OpenMP team (built with -fopenmp; see _openmp), or over PARALLEL_WEIGHTS across a pool's threads where the
build has no OpenMP; ctypes lets go of the GIL while the C runs.

Where the CPU has VNNI (AVX-512 VNNI: Intel since Cascade Lake, AMD since Zen 4; AVX-VNNI: Intel's laptop chips
since Alder Lake), tokens are rounded to int8, each 64 inputs by a scale of their own, and multiplied by the
codes in integers, as llama.cpp does: fewer instructions a weight (benchmarks/results/cpu_gemv_int8_*.json), at
a cost benchmarks/quality_tiny.py measures on the trained tiny model. MOE_OFFLOAD_INT8_TOKENS=0 keeps them
float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
from torch import Tensor

from quant.files import cache_dir
from quant.hqq import _ROWS_PER_ELEMENT, Quantized, QuantSpec, Workspace

SOURCE = Path(__file__).with_suffix(".c")
HEADER_NAMES = ("cpu_gemv_int8.h",)  # what SOURCE includes, from its folder: a build's key hashes them too
# More tokens (a prefill) multiply faster dequantized in tiles, through BLAS. Except at 2-bit g16, which the
# C takes four tokens at a time: one 14336x4096 matrix, 2 threads, C against tiles: 17 against 28 ms at 16
# tokens, 29 against 73 at 32, 50 against 55 at 64; at 4-bit, 31 against 25 ms at 16 already
MAX_TOKENS = 8
MAX_TOKENS_BLOCKED = 32
# With int8 tokens both presets' loops take four tokens at a time and serve any number: they beat the tiles at
# every count measured, 1 to 1024, by 1.7-2.5x from 64 up (2-bit 194 ms against 330 at 512 tokens, 4-bit 181
# against 382; benchmarks/results/cpu_gemv_tokens_int8_*.json). Both grow by the token, the loop ~0.4 ms a token
# and the tiles ~0.7, so no count turns it round
INT8_BLOCKED = ((2, 16), (4, 64))  # (bits, g) whose int8 loop is compiled for blocks of four tokens
# 3-bit g64's loop (packed rows, a tile at a time) against the tiles, which dequantize 3-bit's padded grid whole:
# 15 against 59 ms at 16 tokens, 30 against 66 at 32, 73 against 81 at 64, with weights from memory
# (benchmarks/results/cpu_gemv_3bit_after_27a22b2.json)
MAX_TOKENS_3BIT = 32
WIDE_DTYPES = (torch.bfloat16, torch.float16)  # the tables multiply_wide reads, widening each weight
MAX_GROUP = 256  # the C keeps PER x g/16 partial-sum vectors a token on the stack: keep them few
# A smaller weight runs on the calling thread: handing a share to the pool costs 30-50 us, which a 1M-weight
# 4-bit matrix does not win back (65 us on 1 thread, 94 on 2); 32-layer mixtral-small decoded 66-78 ms a token
# at this threshold against 84-89 at 2^20
PARALLEL_WEIGHTS = 1 << 22
# OpenMP's team hands out a share in microseconds: from 2^20 weights (1024 x 1024) a call is split. 32-layer
# mixtral-small, 4 slots, oracle: 15.3 tok/s on the pool at 2^22, where its 3.7M-weight experts ran on one thread
# (benchmarks/results/bench_cpu_mixtral-small-32l_oracle_pool.json), 23.1 at 2^20 (..._oracle_44a69f8.json);
# 2^18 and 2^16 were no faster
OPENMP_PARALLEL_WEIGHTS = 1 << 20
# Reassociation lets the compiler vectorize the sums; not -ffast-math, whose start-up code (crtfastmath) would
# flush denormals to zero in the whole process. -march=native first, then without it for compilers that refuse it
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
# -fopenmp too, where the compiler has it: see _openmp
TUNINGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())


class _Meta(ctypes.Structure):
    _fields_ = [("half", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("group", ctypes.c_int64), ("slot_stride", ctypes.c_int64),
                ("output_stride", ctypes.c_int64), ("group_slot_stride", ctypes.c_int64),
                ("group_output_stride", ctypes.c_int64)]  # fmt: skip


class _Problem(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_sums", ctypes.c_void_p), ("xq", ctypes.c_void_p),
                ("x_scales", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scale", _Meta), ("zero", _Meta), ("tokens", ctypes.c_int64), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("step", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("group_size", ctypes.c_int32), ("vnni", ctypes.c_int32)]  # fmt: skip


class KernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded here; the message says why."""


def available() -> bool:
    """Whether the kernel is built (building it on the first call, about a second)."""
    try:
        library()
    except KernelUnavailable:
        return False
    return True


@functools.cache
def library() -> ctypes.CDLL:
    """The kernel, built into cache_dir() on the first call; raises KernelUnavailable with the reason."""
    return load(build(find_compiler(), cache_dir()))


def find_compiler() -> str:
    compiler = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if compiler is None:
        raise KernelUnavailable("no C compiler found (looked for cc, gcc and clang)")
    return compiler


def build(compiler: str, folder: Path, source_file: Path = SOURCE) -> Path:
    """The shared library of SOURCE (or of `source_file`, with HEADER_NAMES beside it: another revision's, for
    benchmarks/cpu_gemv_ab.py) for this CPU, compiled into `folder` unless a build is already there. Written under
    a temporary name and renamed, so that another process never loads half a file."""
    source = b"\0".join(path.read_bytes() for path in (source_file, *map(source_file.with_name, HEADER_NAMES)))
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu().encode()]))
    path = folder / f"cpu_gemv-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=path.name + ".", suffix=".tmp")
    except OSError as error:
        raise KernelUnavailable(f"cannot write in {folder}: {error.strerror}") from None
    os.close(fd)
    try:
        for tuning in TUNINGS:
            try:
                done = subprocess.run([compiler, *FLAGS, *tuning, str(source_file), "-o", temporary],
                                      capture_output=True, text=True, timeout=120)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as error:
                raise KernelUnavailable(f"{compiler} could not build {source_file.name}: {error}") from None
            if done.returncode == 0:
                os.chmod(temporary, 0o755)  # mkstemp's 0600 would keep a shared cache's build from other users
                os.replace(temporary, path)
                return path
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise KernelUnavailable(f"{compiler} could not build {source_file.name}: {lines[-1]}")
    finally:
        Path(temporary).unlink(missing_ok=True)


# /proc/cpuinfo's lines that name what -march=native compiles for: x86's, then ARM's
CPU_LINES = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")


def _cpu() -> str:
    """What -march=native compiles for: a build is kept per CPU, since a home folder may be shared."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = sorted({line for line in info if line.startswith(CPU_LINES)})
    except OSError:
        lines = []
    return "".join([platform.machine(), " ", platform.processor(), "\n", *lines])


def load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise KernelUnavailable(f"cannot load {path}: {error}") from None
    problem, i64, pointer = ctypes.POINTER(_Problem), ctypes.c_int64, ctypes.c_void_p
    lib.moe_offload_gemv_outputs.argtypes = [problem, i64, i64, pointer, pointer]
    lib.moe_offload_gemv_packed_rows.argtypes = [problem, i64, i64, pointer]
    lib.moe_offload_gemv_outputs.restype = lib.moe_offload_gemv_packed_rows.restype = None
    lib.moe_offload_gemv_outputs_parallel.argtypes = [problem, i64, i64, pointer, i64, pointer]
    lib.moe_offload_gemv_packed_rows_parallel.argtypes = [problem, i64, i64, pointer, i64]
    lib.moe_offload_gemv_outputs_parallel.restype = lib.moe_offload_gemv_packed_rows_parallel.restype = None
    lib.moe_offload_openmp.restype = ctypes.c_int
    lib.moe_offload_quantize_tokens.argtypes = [pointer, i64, i64, i64, pointer, pointer, pointer]
    lib.moe_offload_quantize_tokens.restype = None
    lib.moe_offload_vnni.restype = ctypes.c_int
    i32 = ctypes.c_int32
    lib.moe_offload_gemv_wide.argtypes = [pointer, i64, i64, pointer, i32, i64, i64, pointer, i64]
    lib.moe_offload_gemv_wide_parallel.argtypes = [pointer, i64, i64, pointer, i32, i64, pointer, i64]
    lib.moe_offload_gemv_wide.restype = lib.moe_offload_gemv_wide_parallel.restype = None
    return lib


def openmp_entry(handle: ctypes.CDLL) -> int | None:
    """Where `handle`'s omp_get_max_threads is, searched in it and what it links: which OpenMP runtime it uses
    (None: none)."""
    try:
        return ctypes.cast(handle.omp_get_max_threads, ctypes.c_void_p).value
    except AttributeError:
        return None


def torch_openmp() -> int | None:
    """openmp_entry of torch's CPU library, which runs torch's parallel operators (None: not found)."""
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (folder / name).exists():
            try:
                return openmp_entry(ctypes.CDLL(str(folder / name)))  # loaded already: its handle
            except OSError:
                return None
    return None


@functools.cache
def _openmp(lib: ctypes.CDLL) -> bool:
    """Whether to split a call across OpenMP threads rather than the pool's: when the library was built with
    -fopenmp and uses torch's OpenMP runtime (torch's libgomp.so.1 is loaded first, so ours binds to it).
    torch's workers spin for a while after each parallel operator (libgomp's default wait policy); the pool's
    threads ran beside them, three threads on two cores, where OpenMP's team is those same workers. A runtime
    of its own (torch built with another) would be a second team: the pool, then."""
    entry = openmp_entry(lib)
    return bool(lib.moe_offload_openmp()) and entry is not None and entry == torch_openmp()


# Round tokens to int8 and multiply in integers, where the CPU has VNNI (see int8_width);
# MOE_OFFLOAD_INT8_TOKENS=0 keeps them float32
INT8_TOKENS = os.environ.get("MOE_OFFLOAD_INT8_TOKENS", "1").strip() != "0"


@functools.cache
def vnni_widths(lib: ctypes.CDLL) -> tuple[int, ...]:
    """The VNNI widths this CPU has, in bits, widest first: 512 (AVX-512 VNNI), 256 (AVX-VNNI, which Intel's
    laptop chips since Alder Lake have without AVX-512)."""
    flags = lib.moe_offload_vnni()
    return tuple(width for width, flag in ((512, 2), (256, 1)) if flags & flag)


def vnni(lib: ctypes.CDLL) -> int:
    """The width the int8 loops run at: the widest this CPU has, 0 for none."""
    return max(vnni_widths(lib), default=0)


def int8_width() -> int:
    """The width in bits at which calls multiply int8 tokens (each 64 inputs rounded by a scale of their own)
    in integers, where the layout allows (int8_layout): the CPU's VNNI, or 0 where INT8_TOKENS is off or the CPU
    has none, and tokens stay float32."""
    try:
        return vnni(library()) if INT8_TOKENS else 0
    except KernelUnavailable:
        return 0


def int8_tokens() -> bool:
    return int8_width() > 0


def int8_layout(q: Quantized) -> bool:
    """Whether the int8 loop reads this layout: whole outputs a thread (not 3-bit's padded grid), inputs in
    blocks of 64, and groups that tile them (16 or 32 inputs, or whole multiples of 64)."""
    return int8_reads(q.shape, q.spec)


def int8_reads(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """int8_layout for a weight of `shape` quantized as `spec`, before it exists (what `info` and `bench` name)."""
    k, g = shape[1], spec.group_size
    return _whole_outputs(shape, spec) and k % 64 == 0 and (g in (16, 32) or g % 64 == 0)


def _whole_outputs(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """Whether each packed row's slots hold whole outputs (step = N / PER * G), so a thread makes whole outputs."""
    return spec.bits != 3 and shape[0] % _ROWS_PER_ELEMENT[spec.bits] == 0


# the C computes in float32; tokens of the others are converted on the way in and out (a few thousand values)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def max_tokens(bits: int, group_size: int) -> int:
    """The most tokens the float32 loops serve at this preset: beyond them the tiles are faster."""
    return {(2, 16): MAX_TOKENS_BLOCKED, (3, 64): MAX_TOKENS_3BIT}.get((bits, group_size), MAX_TOKENS)


def supports(x: Tensor, q: Quantized) -> bool:
    """Whether `gemv` serves this call: a few tokens on the CPU, in a dtype of DTYPES, and a layout it reads
    (float16 or 8-bit scales and zeros; groups of 16 lanes at a time, up to MAX_GROUP), every part contiguous."""
    g = q.spec.group_size
    most = max_tokens(q.spec.bits, g)
    if (q.spec.bits, g) in INT8_BLOCKED and int8_tokens() and int8_layout(q):
        most = x.shape[0]  # any number (above)
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.dim() != 2 or not 1 <= x.shape[0] <= most:
        return False
    if x.shape[1] != q.shape[1] or g % 16 or g > MAX_GROUP:
        return False
    parts, halves = [x, q.codes], []
    for meta in (q.scale, q.zero):
        if not isinstance(meta, Quantized):
            halves.append(meta)
        elif meta.spec.bits == 8 and not isinstance(meta.scale, Quantized) and not isinstance(meta.zero, Quantized):
            if not _by_output(meta, q):  # else the strides say where each output's lie
                parts.append(meta.codes)
                halves += [meta.scale, meta.zero]
            elif meta.scale.dtype != torch.float16 or meta.zero.dtype != torch.float16:
                return False
        else:
            return False
    if any(t.dtype != torch.float16 for t in halves) or q.codes.data_ptr() % q.codes.element_size():
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in parts + halves)


def _by_output(meta: Quantized, q: Quantized) -> bool:
    """Whether q's 8-bit scales or zeros are by output (quant/packing.py): codes [PER, N / PER, G] and their scales
    and zeros [PER, N / PER, G / group] alike, an output's in a row. The outputs loop reads them through strides
    (packed_rows reads grid order alone)."""
    per, groups, group = _ROWS_PER_ELEMENT[q.spec.bits], q.shape[1] // q.spec.group_size, meta.spec.group_size
    rows = (per, q.shape[0] // per)
    return (
        _whole_outputs(q.shape, q.spec) and groups % group == 0
        and meta.codes.shape == (*rows, groups) and meta.codes.stride(2) == 1
        and meta.scale.shape == meta.zero.shape == (*rows, groups // group)
        and meta.scale.stride() == meta.zero.stride() and meta.scale.stride(2) == 1
        and all(t.device.type == "cpu" for t in (meta.codes, meta.scale, meta.zero))
    )  # fmt: skip


def _meta(meta: Tensor | Quantized) -> _Meta:
    """A scale or zero as the C reads it: float16, or 8-bit codes in grid order (2-D) or by output (3-D, which
    supports() let through only where _by_output holds)."""
    if not isinstance(meta, Quantized):
        return _Meta(meta.data_ptr(), None, None, None, 1, 0, 0, 0, 0)
    strides = (*meta.codes.stride()[:2], *meta.scale.stride()[:2]) if meta.codes.dim() == 3 else (0, 0, 0, 0)
    return _Meta(None, meta.codes.data_ptr(), meta.scale.data_ptr(), meta.zero.data_ptr(), meta.spec.group_size,
                 *strides)  # fmt: skip


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="moe-offload-gemv")


_forked = False  # in a forked child: libgomp's team does not survive a fork (torch's own operators hang there too)


def _after_fork_in_child() -> None:
    global _forked
    _forked = True  # OpenMP would wait for ever on the parent's team: the pool, started afresh
    _pool.cache_clear()  # a forked child has none of the pool's threads either


os.register_at_fork(after_in_child=_after_fork_in_child)


def _each_thread(threads: int, total: int, call) -> None:
    """call(i, first, last) over `threads` even shares of range(total), the first on this thread. Returns
    once every share is done, even when one raised: none may still be writing after the caller moves on."""
    if threads == 1:  # most small weights: no pool, no futures
        call(0, 0, total)
        return
    bounds = [total * i // threads for i in range(threads + 1)]
    others = [_pool(threads).submit(call, i, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    try:
        call(0, bounds[0], bounds[1])
    finally:
        wait(others)
    for future in others:
        future.result()


def _team(lib: ctypes.CDLL, weights: int) -> tuple[bool, int]:
    """Whether a call runs on torch's OpenMP team (else the pool), and on how many threads: one below the size
    at which splitting pays."""
    openmp = not _forked and _openmp(lib)
    split = weights >= (OPENMP_PARALLEL_WEIGHTS if openmp else PARALLEL_WEIGHTS)
    return openmp, torch.get_num_threads() if split else 1


def supports_wide(x: Tensor, w: Tensor) -> bool:
    """Whether multiply_wide serves x @ w.T: a few float32 tokens times a float16 or bfloat16 table (on the CPU,
    the lm_head at its checkpoint's width: offload/decoder.py), both contiguous on the CPU, K a multiple of 64."""
    return (
        x.device.type == w.device.type == "cpu" and x.dtype == torch.float32 and w.dtype in WIDE_DTYPES
        and x.dim() == w.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS and x.shape[1] == w.shape[1]
        and x.shape[1] % 64 == 0 and x.is_contiguous() and w.is_contiguous()
    )  # fmt: skip


def multiply_wide(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 @ w [N, K].T -> [M, N] float32, each weight widened exactly: F.linear(x, w.float())
    without the float32 copy of w, for a caller that asked supports_wide(x, w). Into `out` when it is
    contiguous, else through a new tensor."""
    lib = library()
    (tokens, k), n = x.shape, w.shape[0]
    y = out if out is not None and out.is_contiguous() else x.new_empty((tokens, n))
    bf16 = int(w.dtype == torch.bfloat16)
    openmp, threads = _team(lib, n * k)
    if openmp and threads > 1:
        lib.moe_offload_gemv_wide_parallel(x.data_ptr(), tokens, k, w.data_ptr(), bf16, threads, y.data_ptr(), n)
    else:
        _each_thread(threads, n, lambda i, first, last: lib.moe_offload_gemv_wide(
            x.data_ptr(), tokens, k, w.data_ptr(), bf16, first, last, y.data_ptr(), n))  # fmt: skip
    if out is not None and y is not out:
        out.copy_(y)
    return y if out is None else out


def gemv(x: Tensor, q: Quantized, out: Tensor | None = None, workspace: Workspace | None = None) -> Tensor:
    """x [M, K] @ dequantize(q).T -> [M, N] in x.dtype, computed in float32, into `out` when given. Its
    buffers (the groups' sums of x, per-thread scratch) are `workspace`'s, so a decode step allocates nothing."""
    if not supports(x, q):  # the C trusts its layout: a group of 8 or 24 lanes would read past its own
        weight = f"{q.spec.describe()} {tuple(q.shape)}"
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} times {weight}: not supported")
    return multiply(x, q, out, workspace)


def multiply(x: Tensor, q: Quantized, out: Tensor | None = None, workspace: Workspace | None = None) -> Tensor:
    """gemv without its check, for a caller that asked supports(x, q) already (quant.linear.CPU): a decode
    step makes 320 of these calls on a 32-layer model."""
    workspace = workspace if workspace is not None else Workspace()
    tokens, n = x.shape[0], q.shape[0]
    if out is not None and (out.shape != (tokens, n) or out.dtype != x.dtype):
        got = f"{tuple(out.shape)} {out.dtype}"
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} times a weight {tuple(q.shape)} into {got}")
    if x.dtype == torch.float32:
        return _multiply(x, q, out, workspace)
    # --dtype bfloat16 or float16 on the CPU: the products in float32, then rounded once
    x32 = workspace.buffer("gemv.x32", tuple(x.shape), torch.float32, x.device).copy_(x)
    y32 = _multiply(x32, q, workspace.buffer("gemv.y32", (tokens, n), torch.float32, x.device), workspace)
    return y32.to(x.dtype) if out is None else out.copy_(y32)


def _multiply(x: Tensor, q: Quantized, out: Tensor | None, workspace: Workspace) -> Tensor:
    """multiply, float32 tokens, `out` checked."""
    lib = library()
    # M = tokens, N = outputs, K = inputs, G = groups a row
    (n, k), g, bits, tokens = q.shape, q.spec.group_size, q.spec.bits, x.shape[0]
    groups_per_row, per = k // g, _ROWS_PER_ELEMENT[bits]
    width = int8_width() if int8_layout(q) else 0
    int8 = width > 0
    x_sums = workspace.buffer("gemv.x_sums", (tokens, groups_per_row), x.dtype, x.device)
    xq = x_scales = None
    if int8:
        xq = workspace.buffer("gemv.xq", (tokens, k), torch.int8, x.device)
        x_scales = workspace.buffer("gemv.x_scales", (tokens, k // 64), torch.float32, x.device)
        lib.moe_offload_quantize_tokens(x.data_ptr(), tokens, k, g, xq.data_ptr(), x_scales.data_ptr(),
                                        x_sums.data_ptr())  # fmt: skip
    else:
        torch.sum(x.view(tokens, groups_per_row, g), dim=-1, out=x_sums)
    if out is None:
        out = x.new_empty((tokens, n))
    y = out if out.is_contiguous() else workspace.buffer("gemv.y", (tokens, n), x.dtype, x.device)
    problem = _Problem(x.data_ptr(), x_sums.data_ptr(), xq.data_ptr() if int8 else None,
                       x_scales.data_ptr() if int8 else None, q.codes.data_ptr(), _meta(q.scale), _meta(q.zero),
                       tokens, n, k, q.codes.shape[0], bits, g, width)  # fmt: skip
    openmp, threads = _team(lib, n * k)
    if _whole_outputs(q.shape, q.spec):
        meta = workspace.buffer("gemv.meta", (threads, 2 * per * groups_per_row), torch.float32, x.device)
        if openmp and threads > 1:
            lib.moe_offload_gemv_outputs_parallel(problem, threads, n // per, meta.data_ptr(), meta.shape[1],
                                                  y.data_ptr())  # fmt: skip
        else:
            _each_thread(threads, n // per, lambda i, first, last: lib.moe_offload_gemv_outputs(
                problem, first, last, meta[i].data_ptr(), y.data_ptr()))  # fmt: skip
    else:  # slots split outputs: each thread adds its packed rows into outputs of its own
        partial = workspace.buffer("gemv.partial", (threads, tokens, n), x.dtype, x.device)
        if openmp and threads > 1:
            lib.moe_offload_gemv_packed_rows_parallel(problem, threads, q.codes.shape[0], partial.data_ptr(),
                                                      tokens * n)  # fmt: skip
        else:
            _each_thread(threads, q.codes.shape[0], lambda i, first, last: lib.moe_offload_gemv_packed_rows(
                problem, first, last, partial[i].data_ptr()))  # fmt: skip
        torch.sum(partial, dim=0, out=y)
    if y is not out:
        out.copy_(y)
    return out
