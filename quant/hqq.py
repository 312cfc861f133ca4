"""HQQ quantization as two pure functions: `quantize(weight, spec) -> Quantized` and `dequantize(q)`.

hqq's `Quantizer.quantize` does the math (half-quadratic optimisation of the zero point). We keep
its packed code layout exactly, so our dequantize is bit-exact against hqq's, and add what hqq 0.2.8
dropped: quantized scales and zeros (the 2-bit scheme of mixtral-offloading, Eliseev & Mazur 2023).

Layout, for a weight [N, K] and group size g (hqq axis=1: a group is g consecutive inputs of a row):
    R = N*K/g groups; codes are the [R, g] integer grid packed along R the hqq way
    (4-bit: rows r and r+R/2 share a byte; 2-bit: four rows; 3-bit: ten rows per int32; 8-bit: none);
    scale, zero: [R, 1], one pair per group. weight ~= (code - zero) * scale.
With meta_bits, scale and zero are themselves Quantized [R, 1] tensors (8-bit in groups of 128). Their codes,
scales and zeros may also come as views of other shapes whose row-major order is the grid's: [PER, N / PER, G]
and [PER, N / PER, G / 128], as experts computed on the CPU hold them (by output: quant/packing.py).

Float meta is stored as float16: at 2-bit g16 a float32 scale+zero pair per group would cost 4 bits
per weight, more than the codes; float16 halves that and is what hqq itself keeps (compute dtype).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from quant.errors import MoEOffloadError

if TYPE_CHECKING:
    from quant.linear import Kernel

SUPPORTED_BITS = (2, 3, 4, 8)
META_DTYPE = torch.float16  # float scales and zeros on disk and in the packed expert (see module doc)

# How many rows of the [R, g] code grid share one packed element, and that element's dtype.
_ROWS_PER_ELEMENT = {8: 1, 4: 2, 2: 4, 3: 10}
_CODE_DTYPE = {8: torch.uint8, 4: torch.uint8, 2: torch.uint8, 3: torch.int32}


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 2, 3, 4 or 8
    group_size: int  # weights per (scale, zero) pair, along the input dim (hqq axis=1)
    meta_bits: int | None = None  # also quantize scale and zero (the paper's 2-bit scheme: 8-bit)
    meta_group_size: int = 128  # scales (zeros) per meta (scale, zero) pair when meta_bits is set

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.meta_bits is not None and self.meta_bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.meta_bits must be None or one of {SUPPORTED_BITS}")
        if self.group_size < 1 or self.meta_group_size < 1:
            raise ValueError("QuantSpec group sizes must be positive")

    def describe(self) -> str:
        """E.g. "2-bit g16, 8-bit meta g128": how the README and error messages name a spec."""
        meta = "" if self.meta_bits is None else f", {self.meta_bits}-bit meta g{self.meta_group_size}"
        return f"{self.bits}-bit g{self.group_size}{meta}"

    @property
    def meta_spec(self) -> QuantSpec | None:
        """How scale and zero are quantized, or None when they stay float16."""
        if self.meta_bits is None:
            return None
        return QuantSpec(bits=self.meta_bits, group_size=self.meta_group_size)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "meta_bits": self.meta_bits,
            "meta_group_size": self.meta_group_size,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantSpec:
        return cls(
            bits=int(d["bits"]),
            group_size=int(d["group_size"]),
            meta_bits=None if d.get("meta_bits") is None else int(d["meta_bits"]),
            meta_group_size=int(d.get("meta_group_size", 128)),
        )


EXPERT_PRESETS: dict[str, QuantSpec | None] = {
    "2": QuantSpec(bits=2, group_size=16, meta_bits=8, meta_group_size=128),  # mixtral-offloading's
    "3": QuantSpec(bits=3, group_size=64),
    "4": QuantSpec(bits=4, group_size=64),
    "none": None,
}
ATTN_PRESETS: dict[str, QuantSpec | None] = {
    "4": QuantSpec(bits=4, group_size=64),
    "8": QuantSpec(bits=8, group_size=64),
    "none": None,
}


def preset(presets: Mapping[str, QuantSpec | None], name: str, option: str) -> QuantSpec | None:
    """Look a preset up by name; `option` (e.g. "--expert-bits") names it in the error."""
    if name not in presets:
        raise MoEOffloadError(f"unknown {option} {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


@dataclass
class Quantized:
    codes: Tensor  # packed codes, hqq layout (see module doc)
    scale: Tensor | Quantized  # [R, 1] float16, or quantized itself when spec.meta_bits is set
    zero: Tensor | Quantized  # [R, 1] float16, or quantized itself
    shape: tuple[int, ...]  # the original weight's shape [N, K]
    spec: QuantSpec


# ---------------------------------------------------------------------------------------------------
# shapes


def _check_shape(shape: tuple[int, ...], spec: QuantSpec) -> None:
    """Raise if a weight of `shape` cannot be quantized with `spec` (a user's choice of group size)."""
    if len(shape) != 2:
        raise ValueError(f"quantize takes a 2-D weight [out, in], got shape {tuple(shape)}")
    if bad := shape_problem(shape, spec):
        # Only experts get here from the CLI (convert.check_resident refuses attention first, with its own advice).
        # An expert holds [I, D] and [D, I]: a preset fits it when it fits the shape both ways round.
        fit = [name for name, other in EXPERT_PRESETS.items() if other is not None
               and not shape_problem(shape, other) and not shape_problem(shape[::-1], other)]  # fmt: skip
        if fit:
            raise MoEOffloadError(f"{bad}; pass --expert-bits {' or '.join(fit)} or none (none: unquantized)")
        raise MoEOffloadError(f"{bad}; pass --expert-bits none (unquantized): no other preset takes this shape")


def shape_problem(shape: tuple[int, int], spec: QuantSpec) -> str | None:
    """Why a 2-D weight of `shape` cannot be quantized with `spec`, or None where it can."""
    out_features, in_features = shape
    bad = None
    if in_features % spec.group_size:
        bad = f"its input size {in_features} is not a multiple of group size {spec.group_size}"
    else:
        groups = out_features * in_features // spec.group_size
        if groups % _ROWS_PER_ELEMENT[spec.bits] and spec.bits != 3:
            bad = f"its {groups} groups do not pack {_ROWS_PER_ELEMENT[spec.bits]} to a byte"
        elif spec.meta_bits is not None:
            if groups % spec.meta_group_size:
                bad = f"its {groups} groups are not a multiple of meta group size {spec.meta_group_size}"
            elif spec.meta_bits != 3 and (groups // spec.meta_group_size) % _ROWS_PER_ELEMENT[spec.meta_bits]:
                bad = f"its {groups // spec.meta_group_size} meta groups do not pack evenly"
    return bad and f"cannot quantize a weight of shape {tuple(shape)} at {spec.describe()}: {bad}"


def _codes_shape(groups: int, group_size: int, bits: int) -> tuple[int, int]:
    return (math.ceil(groups / _ROWS_PER_ELEMENT[bits]), group_size)


def tensor_shapes(shape: tuple[int, ...], spec: QuantSpec, prefix: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """The flat tensors `to_tensors` makes for a weight of `shape`: {name: (shape, dtype)}, no math."""
    _check_shape(shape, spec)
    groups = shape[0] * shape[1] // spec.group_size
    out = {f"{prefix}.codes": (_codes_shape(groups, spec.group_size, spec.bits), _CODE_DTYPE[spec.bits])}
    meta = spec.meta_spec
    for part in ("scale", "zero"):
        if meta is None:
            out[f"{prefix}.{part}"] = ((groups, 1), META_DTYPE)
        else:
            meta_groups = groups // meta.group_size
            out[f"{prefix}.{part}.codes"] = (
                _codes_shape(meta_groups, meta.group_size, meta.bits),
                _CODE_DTYPE[meta.bits],
            )
            out[f"{prefix}.{part}.scale"] = ((meta_groups, 1), META_DTYPE)
            out[f"{prefix}.{part}.zero"] = ((meta_groups, 1), META_DTYPE)
    return out


def quantized_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes of a quantized weight (codes and meta, no alignment padding)."""
    return sum(math.prod(s) * dtype.itemsize for s, dtype in tensor_shapes(shape, spec, "w").values())


# ---------------------------------------------------------------------------------------------------
# quantize / dequantize


def _hqq_quantize(weight: Tensor, spec: QuantSpec, optimize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """hqq's quantizer on weight's own device: (codes, scale float32, zero float32)."""
    from hqq.core.quantize import Quantizer  # imported here: it pulls in torch._dynamo (about 1.3 s)

    codes, meta = Quantizer.quantize(
        weight,
        nbits=spec.bits,
        channel_wise=True,
        group_size=spec.group_size,
        optimize=optimize,
        round_zero=False,
        axis=1,
        bitpack=True,
        view_as_float=False,
        device=str(weight.device),  # hqq 0.2.8 defaults to "cuda"
    )
    # hqq's optimiser runs under inference_mode; clone so callers get ordinary tensors.
    return codes.clone(), meta["scale"].float().clone(), meta["zero"].float().clone()


@torch.no_grad()
def quantize(weight: Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a 2-D weight [out, in] on its own device. Deterministic: same input, same bytes.

    Same bytes holds on one device kind (hqq optimises in float16 on CUDA, float32 on CPU), whatever
    the thread count. hqq calls torch.cuda.empty_cache() inside (a no-op until CUDA is initialised).
    """
    shape = tuple(weight.shape)
    _check_shape(shape, spec)
    codes, scale, zero = _hqq_quantize(weight, spec, optimize=True)
    meta = spec.meta_spec
    if meta is None:
        return Quantized(codes, scale.to(META_DTYPE), zero.to(META_DTYPE), shape, spec)
    # Scales and zeros are smooth enough for plain min-max 8-bit (no optimiser), as in mixtral-offloading.
    scale_q = _quantize_meta(scale, meta)
    zero_q = _quantize_meta(zero, meta)
    return Quantized(codes, scale_q, zero_q, shape, spec)


def _quantize_meta(values: Tensor, meta: QuantSpec) -> Quantized:
    codes, scale, zero = _hqq_quantize(values, meta, optimize=False)
    return Quantized(codes, scale.to(META_DTYPE), zero.to(META_DTYPE), tuple(values.shape), meta)


class Workspace:
    """Buffers that dequantization writes into, made on first use and reused after: a decode step that
    dequantizes through a workspace allocates no weight-sized tensor (on the CPU, no page faults; on
    CUDA, no allocator traffic). One workspace serves one stream of work: a buffer is reused by the
    next call of the same shape, so use each result before the next dequantize of that shape.

    `kernel` (quant.linear.TRITON on CUDA, quant.linear.CPU on the CPU) multiplies a few tokens by an HQQ
    weight without dequantizing it: a fused dequantize+GEMV, which needs no weight-sized buffer at all.
    """

    def __init__(self, kernel: Kernel | None = None) -> None:
        self.kernel = kernel
        self._buffers: dict[tuple, Tensor] = {}

    def buffer(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tag, tuple(shape), dtype, _device(device))
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=key[-1])
        return self._buffers[key]

    def constant(self, tag: str, device: torch.device, make: Callable[[torch.device], Tensor]) -> Tensor:
        """A tensor made once by `make(device)` and kept under `tag`: a lookup table, say."""
        key = (tag, _device(device))
        if key not in self._buffers:
            self._buffers[key] = make(key[-1])
        return self._buffers[key]

    def shifts(self, bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.constant(f"shifts.{bits}.{dtype}", device, functools.partial(_shifts, bits, dtype))


def _device(device: torch.device | str) -> torch.device:
    """A bare "cuda" and "cuda:0" must find the same buffer."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _shifts(bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Element row i holds grid rows i, i+step, ..., highest bits first: the shift of each."""
    per = _ROWS_PER_ELEMENT[bits]
    return (torch.arange(per - 1, -1, -1, device=device, dtype=dtype) * bits).view(per, 1, 1)


def _unpack(
    codes: Tensor, bits: int, groups: int, dtype: torch.dtype, workspace: Workspace | None = None, tag: str = ""
) -> Tensor:
    """Packed codes -> the [groups, g] integer grid in `dtype` (same values as hqq's BitPack.unpack)."""
    if bits == 8:  # in any shape whose row-major order is the grid's (module doc)
        shape = (groups, codes.numel() // groups)
        if workspace is None:
            return codes.reshape(shape).to(dtype)
        grid = workspace.buffer(tag + "grid", shape, dtype, codes.device)
        grid.view(codes.shape).copy_(codes)
        return grid
    per = _ROWS_PER_ELEMENT[bits]
    mask = (1 << bits) - 1
    if workspace is None:
        grid = (codes.unsqueeze(0) >> _shifts(bits, codes.dtype, codes.device)) & mask  # [per, step, g]
        grid = grid.reshape(per * codes.shape[0], codes.shape[1])
        return grid[:groups].to(dtype)  # 3-bit pads the grid to a multiple of 10 rows
    shifted = workspace.buffer(tag + "codes", (per, *codes.shape), codes.dtype, codes.device)
    torch.bitwise_right_shift(codes.unsqueeze(0), workspace.shifts(bits, codes.dtype, codes.device), out=shifted)
    shifted.bitwise_and_(mask)
    grid = shifted.view(per * codes.shape[0], codes.shape[1])[:groups]
    return workspace.buffer(tag + "grid", tuple(grid.shape), dtype, codes.device).copy_(grid)


def dequantize(
    q: Quantized, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None, tag: str = ""
) -> Tensor:
    """(codes - zero) * scale in `dtype`, reshaped to q.shape. Works on views into a packed buffer.

    With a workspace the result is one of its buffers (the same values, bit for bit), valid until the
    next dequantize of that shape through it.
    """
    groups = math.prod(q.shape) // q.spec.group_size
    if workspace is None:
        scale = dequantize(q.scale, dtype) if isinstance(q.scale, Quantized) else q.scale.reshape(-1, 1).to(dtype)
        zero = dequantize(q.zero, dtype) if isinstance(q.zero, Quantized) else q.zero.reshape(-1, 1).to(dtype)
        grid = _unpack(q.codes, q.spec.bits, groups, dtype)  # [R, g]
        return ((grid - zero) * scale).reshape(q.shape)
    # the meta first: it goes through the same workspace, and must be read before the grid reuses it
    scale = _meta(q.scale, dtype, workspace, tag + "scale.")
    zero = _meta(q.zero, dtype, workspace, tag + "zero.")
    grid = _unpack(q.codes, q.spec.bits, groups, dtype, workspace, tag)  # [R, g], a workspace buffer
    return grid.sub_(zero).mul_(scale).view(q.shape)


# Weights dequantized at once when a weight is multiplied without the fused kernel (quant/linear.py): on the
# CPU, a tile that stays in cache (8 MB in float32: a 2-bit Mixtral-8x7B expert MLP times one token takes
# 42 ms against 138 ms dequantized whole on 2 threads, benchmarks/results/expert_mlp_cpu.json); on CUDA, one
# bit slot of a 2-bit Mixtral expert matrix (14.7M weights, 4 tiles a matrix), few launches
TILE_WEIGHTS = {"cpu": 1 << 21, "cuda": 1 << 24}


def tile_weights(device: torch.device | str) -> int:
    return TILE_WEIGHTS.get(torch.device(device).type, TILE_WEIGHTS["cuda"])


def dequantize_tiles(
    q: Quantized, dtype: torch.dtype, workspace: Workspace, max_weights: int
) -> Iterator[tuple[int, Tensor]]:
    """dequantize(q) a block of whole output rows at a time: yields (first row n0, weight rows [m, K]),
    each tile at most `max_weights` weights (or one output row), a view of one workspace buffer that the
    next tile overwrites. The same values as dequantize, bit for bit.

    Tiles follow the packed layout (module doc): packed rows [p0, p1) at bit slot s hold grid rows
    s*step + [p0, p1), which are outputs s*N/PER + [p0, p1) / (K/g) when N % PER == 0 (every 2-, 4- and
    8-bit Mixtral shape). A weight whose slots split an output row (N % PER, as 3-bit's on Mixtral's shapes)
    comes whole."""
    (n, k), bits, g = q.shape, q.spec.bits, q.spec.group_size
    per = _ROWS_PER_ELEMENT[bits]
    if n % per:
        yield 0, dequantize(q, dtype, workspace)
        return
    groups_per_row, rows_per_slot, step = k // g, n // per, q.codes.shape[0]
    capacity = min(max_weights, rows_per_slot * k) // g  # grid rows a tile holds; one buffer per capacity
    tile = max(1, capacity // groups_per_row)  # whole output rows a tile
    capacity = max(capacity, groups_per_row)
    device = q.codes.device
    # the meta, read by grid row: a tile's rows of it where its own groups line up with the tiles (8-bit meta
    # in groups of 128, as 2-bit Mixtral's: a sixth of the workspace), else whole (2/g of the grid's size)
    if all(_tiles_align(meta, tile * groups_per_row, step) for meta in (q.scale, q.zero)):
        scale = _MetaRows(q.scale, dtype, workspace, "scale.", capacity)
        zero = _MetaRows(q.zero, dtype, workspace, "zero.", capacity)
    else:
        scale, zero = _meta(q.scale, dtype, workspace, "scale."), _meta(q.zero, dtype, workspace, "zero.")
    grid = workspace.buffer("tile.grid", (capacity, g), dtype, device)
    if bits != 8:
        codes = workspace.buffer("tile.codes", (capacity, g), q.codes.dtype, device)
    mask = (1 << bits) - 1
    for slot in range(per):
        shift = (per - 1 - slot) * bits  # highest bits first
        for first in range(0, rows_per_slot, tile):
            p0, p1 = first * groups_per_row, min(first + tile, rows_per_slot) * groups_per_row
            r0, r1 = slot * step + p0, slot * step + p1
            part = q.codes[p0:p1]
            if bits != 8:
                part = torch.bitwise_right_shift(part, shift, out=codes[: p1 - p0]).bitwise_and_(mask)
            weight = grid[: p1 - p0].copy_(part).sub_(zero[r0:r1]).mul_(scale[r0:r1])
            yield slot * rows_per_slot + first, weight.view(-1, k)


def _tiles_align(meta: Tensor | Quantized, tile_rows: int, step: int) -> bool:
    """Whether tiles of `tile_rows` grid rows, in bit slots `step` rows apart, start on whole groups of an 8-bit
    meta (one code a byte), so that a tile's rows of it are rows of its codes."""
    if not isinstance(meta, Quantized) or meta.spec.bits != 8 or isinstance(meta.scale, Quantized):
        return False
    return tile_rows % meta.spec.group_size == 0 and step % meta.spec.group_size == 0


class _MetaRows:
    """An 8-bit meta dequantized a tile's rows at a time, into one buffer of `capacity` rows: `rows[r0:r1]` is
    dequantize(meta)[r0:r1], bit for bit (the same copy, sub_ and mul_ in `dtype`), when r0 and r1 are whole
    groups of it (_tiles_align). Each slice overwrites the one before."""

    def __init__(self, meta: Quantized, dtype: torch.dtype, workspace: Workspace, tag: str, capacity: int) -> None:
        self.meta, self.group = meta, meta.spec.group_size
        self.scale = _meta(meta.scale, dtype, workspace, tag + "scale.")  # [groups / 128, 1], whole: small
        self.zero = _meta(meta.zero, dtype, workspace, tag + "zero.")
        self.out = workspace.buffer("tile." + tag + "rows", (capacity, 1), dtype, meta.codes.device)

    def __getitem__(self, rows: slice) -> Tensor:
        a, b = rows.start // self.group, rows.stop // self.group
        codes = _grid_rows(self.meta.codes, rows.start, rows.stop)
        values = self.out[: rows.stop - rows.start]
        values.view(codes.shape).copy_(codes)
        return values.view(b - a, self.group).sub_(self.zero[a:b]).mul_(self.scale[a:b]).view(-1, 1)


def _grid_rows(codes: Tensor, first: int, last: int) -> Tensor:
    """Codes [first, last) of an 8-bit meta, in its grid's order, as a view: of grid-ordered codes, or of codes by
    output ([PER, N / PER, G]: module doc), where they must be whole outputs of one bit slot."""
    if codes.is_contiguous():
        return codes.view(-1)[first:last]
    _, outputs, groups = codes.shape
    slot, start = divmod(first, outputs * groups)
    if start % groups or (last - first) % groups or start + last - first > outputs * groups:
        raise ValueError(f"codes [{first}, {last}) by output: not whole outputs of one bit slot")
    return codes[slot, start // groups : (start + last - first) // groups]


def _meta(meta: Tensor | Quantized, dtype: torch.dtype, workspace: Workspace, tag: str) -> Tensor:
    """A scale or zero in `dtype`. `tag` (its path, e.g. "scale.") gives it buffers of its own, apart from
    the weight's grid and from a quantized meta's own meta."""
    if isinstance(meta, Quantized):
        return dequantize(meta, dtype, workspace, tag)
    if meta.dtype == dtype and meta.is_contiguous():
        return meta.view(-1, 1)
    values = workspace.buffer(tag + "values", (meta.numel(), 1), dtype, meta.device)
    values.view(meta.shape).copy_(meta)  # in grid order, from either order (module doc)
    return values


# ---------------------------------------------------------------------------------------------------
# flat tensors (safetensors names)


def to_tensors(q: Quantized, prefix: str) -> dict[str, Tensor]:
    """Flat names: prefix.codes, prefix.scale, prefix.zero (or prefix.scale.codes, ... when quantized)."""
    out = {f"{prefix}.codes": q.codes}
    for part in ("scale", "zero"):
        value = getattr(q, part)
        if isinstance(value, Quantized):
            out.update(to_tensors(value, f"{prefix}.{part}"))
        else:
            out[f"{prefix}.{part}"] = value
    return out


def from_tensors(tensors: Mapping[str, Tensor], prefix: str, spec: QuantSpec, shape) -> Quantized:
    """Inverse of `to_tensors`; the tensors are used as they are (views stay views)."""
    shape = tuple(shape)
    meta = spec.meta_spec
    parts = {}
    for part in ("scale", "zero"):
        if meta is None:
            parts[part] = tensors[f"{prefix}.{part}"]
        else:
            groups = math.prod(shape) // spec.group_size
            parts[part] = from_tensors(tensors, f"{prefix}.{part}", meta, (groups, 1))
    return Quantized(tensors[f"{prefix}.codes"], parts["scale"], parts["zero"], shape, spec)


def synthetic_meta(name: str, spec: QuantSpec) -> float:
    """The value of a synthetic weight's scale or zero tensor `name` ("w.scale", or "w.scale.zero" when the
    meta is quantized): (code - zero) * scale spans about +-0.02, and quantized meta dequantizes to [0, 2x]
    the float value."""
    levels = (1 << spec.bits) - 1
    target = {"scale": 0.04 / levels, "zero": levels / 2}
    parts = name.split(".")
    if len(parts) == 2:
        return target[parts[1]]
    meta_levels = (1 << spec.meta_bits) - 1
    return 2 * target[parts[1]] / meta_levels if parts[2] == "scale" else 0.0


def code_high(dtype: torch.dtype) -> int:
    """One past the largest synthetic code: any bit pattern is a valid code, but 3-bit's int32 keeps to its
    30 bits."""
    return 1 << 30 if dtype == torch.int32 else 256


def random_quantized(shape: tuple[int, ...], spec: QuantSpec, generator: torch.Generator | None = None) -> Quantized:
    """A synthetic quantized weight for speed tests: random codes, sane scales and zeros, no hqq run.

    Codes are uniform over every level; the float scale and zero put (code - zero) * scale in about
    +-0.02 (std near 0.01, like a trained model's weights). Quantized scales and zeros get random codes
    too, with meta that spans [0, 2x] the float value. Same idea as quant/packing.py's
    `ExpertFormat.random`. Deterministic for a seeded `generator`, on whose device the tensors are made.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    tensors: dict[str, Tensor] = {}
    for name, (part_shape, dtype) in tensor_shapes(shape, spec, "w").items():
        if name.endswith(".codes"):  # "w.codes", or "w.scale.codes" with meta_bits
            tensors[name] = torch.randint(0, code_high(dtype), part_shape, generator=generator, device=device,
                                          dtype=dtype)  # fmt: skip
        else:
            tensors[name] = torch.full(part_shape, synthetic_meta(name, spec), dtype=dtype, device=device)
    return from_tensors(tensors, "w", spec, shape)
