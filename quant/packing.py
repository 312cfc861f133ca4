"""The packed expert: one contiguous uint8 buffer; its tensors are views into it.

A `PackedLayout` records where each tensor lives (offset, shape, dtype). Every expert of a model
shares one layout (`ExpertFormat`), so loading an expert is one copy of `nbytes` bytes into a slot,
and `views(slot)` turns the slot back into tensors without copying.

Experts computed on the CPU keep their 8-bit scales and zeros by output (`meta_order` "output"): a packed row's
PER bit slots' scale codes and zero codes lie together, [N / PER, PER, 2, G], and so do their own float16 scales
and zeros, [N / PER, PER, 2, 2, G / 128]. The CPU's loop (quant/cpu_gemv.c) reads a packed row's codes and all
of their scales and zeros at once: in grid order, where each slot's scale codes, zero codes and their meta are
streams of their own, that is 2 PER streams of codes and 4 PER of float16 beside the weights' codes; by output, two.
The views come out [PER, N / PER, G] and [PER, N / PER, G / 128], in the grid's row-major order (quant/hqq.py reads
them so). Files, and the GPU's kernel, keep grid order.

The GPU's kernel also reads a third order (`meta_order` "row", quant/gemv.py's META_ROWS; load's `meta_rows`): a
packed row's PER bit slots' scale codes, then their zero codes, [N / PER * G, 2, PER], and for each meta group of
packed rows the float16 scales and zeros of those, [N / PER * G / 128, 4, PER]. A thread that makes a packed row's
PER outputs then reads all of their scales and zeros in two loads of PER bytes and four of PER float16, which
Triton's pipeliner copies ahead with the codes' tiles, where in grid order they are 6 PER loads of one value each.
Both orders are made at load (`ExpertFormat.in_order`), each expert repacked from its file's grid order as it is
read into the arena; a weight whose shape or meta allows neither keeps grid order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from quant.hqq import (
    _ROWS_PER_ELEMENT,
    META_DTYPE,
    Quantized,
    QuantSpec,
    code_high,
    from_tensors,
    quantize,
    synthetic_meta,
    tensor_shapes,
    to_tensors,
)

_DTYPES = {name: getattr(torch, name) for name in ("uint8", "int8", "int32", "int64", "float16", "bfloat16", "float32")}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling the manifest keeps)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be packed; supported: {', '.join(_DTYPES)}")
    return name


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for size in shape:
        n *= size
    return n


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class TensorEntry:
    name: str
    offset: int  # bytes from the buffer's start; a multiple of the layout's align
    shape: tuple[int, ...]
    dtype: str  # "uint8", "float16", ... (see dtype_name)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, dtype_of(self.dtype))


@dataclass(frozen=True)
class PackedLayout:
    entries: tuple[TensorEntry, ...]
    nbytes: int  # a multiple of align, so experts laid back to back in an arena stay aligned
    align: int = 64

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor | tuple[tuple, torch.dtype]], align: int = 64) -> PackedLayout:
        """The layout of `tensors` in their given order; values are tensors or (shape, dtype) pairs."""
        entries, offset = [], 0
        for name, value in tensors.items():
            shape, dtype = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value
            entries.append(TensorEntry(name, offset, tuple(shape), dtype_name(dtype)))
            offset = _align_up(offset + _nbytes(tuple(shape), dtype), align)
        return cls(tuple(entries), offset, align)

    def pack(self, tensors: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """Copy `tensors` into one uint8 buffer [nbytes] (new, or `out`); padding bytes are zero."""
        if set(tensors) != {e.name for e in self.entries}:
            raise ValueError(f"pack expects tensors {[e.name for e in self.entries]}, got {list(tensors)}")
        for entry in self.entries:
            tensor = tensors[entry.name]
            if tuple(tensor.shape) != entry.shape or dtype_name(tensor.dtype) != entry.dtype:
                raise ValueError(
                    f"{entry.name}: expected {entry.shape} {entry.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
                )
        out = self.blank(out, next(iter(tensors.values())).device)
        for entry in self.entries:
            out[entry.offset : entry.offset + entry.nbytes].copy_(
                tensors[entry.name].contiguous().reshape(-1).view(torch.uint8)
            )
        return out

    def blank(self, out: Tensor | None, device: torch.device) -> Tensor:
        """A buffer for the tensors to be copied into, its padding bytes zero: `out` (checked), or new zeros."""
        if out is None:
            return torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        if out.dtype != torch.uint8 or tuple(out.shape) != (self.nbytes,):
            raise ValueError(f"pack needs a uint8 buffer of shape ({self.nbytes},), got {out.dtype} {out.shape}")
        end = 0
        for entry in self.entries:  # deterministic bytes whatever `out` held before
            out[end : entry.offset].zero_()
            end = entry.offset + entry.nbytes
        out[end:].zero_()
        return out

    def views(self, buffer: Tensor) -> dict[str, Tensor]:
        """Zero-copy tensors over `buffer` (uint8 [nbytes], any device, start aligned to the dtypes)."""
        if buffer.dtype != torch.uint8 or tuple(buffer.shape) != (self.nbytes,):
            raise ValueError(f"views needs a uint8 buffer of shape ({self.nbytes},), got {buffer.dtype} {buffer.shape}")
        return {
            e.name: buffer[e.offset : e.offset + e.nbytes].view(dtype_of(e.dtype)).view(e.shape) for e in self.entries
        }

    def to_dict(self) -> dict:
        return {
            "nbytes": self.nbytes,
            "align": self.align,
            "entries": [
                {"name": e.name, "offset": e.offset, "shape": list(e.shape), "dtype": e.dtype} for e in self.entries
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PackedLayout:
        entries = tuple(
            TensorEntry(str(e["name"]), int(e["offset"]), tuple(int(s) for s in e["shape"]), str(e["dtype"]))
            for e in d["entries"]
        )
        return cls(entries, int(d["nbytes"]), int(d.get("align", 64)))


@dataclass(frozen=True)
class ExpertFormat:
    """How every expert of one model is stored: w1 = gate [I, D], w2 = down [D, I], w3 = up [I, D]."""

    hidden_size: int  # D
    intermediate_size: int  # I
    spec: QuantSpec | None  # None: raw weights of `dtype`, same layout mechanism
    dtype: torch.dtype  # dtype of unquantized weights (spec None); unused when quantized
    layout: PackedLayout
    # where 8-bit scale and zero codes lie (META_ORDERS): "grid", as files hold them; "output", for the CPU's loop;
    # "row", for the GPU's kernel (module doc). Those of a weight that cannot lie so stay in grid order
    meta_order: str = "grid"

    @classmethod
    def build(
        cls,
        hidden_size: int,
        intermediate_size: int,
        spec: QuantSpec | None,
        dtype: torch.dtype,
        meta_order: str = "grid",
    ) -> ExpertFormat:
        """Derive the layout analytically from the shapes (nothing is quantized)."""
        if meta_order not in META_ORDERS:
            raise ValueError(f"unknown meta order {meta_order!r}; the orders are {', '.join(META_ORDERS)}")
        shapes: dict[str, tuple[tuple, torch.dtype]] = {}
        for name, shape in cls._weight_shapes(hidden_size, intermediate_size).items():
            if spec is None:
                shapes[name] = (shape, dtype)
                continue
            tensors = tensor_shapes(shape, spec, name)
            if meta_order != "grid" and _ORDERS[meta_order].applies(shape, spec):
                tensors = _merged(tensors, name, _ORDERS[meta_order].shapes(shape, spec))
            shapes.update(tensors)
        return cls(hidden_size, intermediate_size, spec, dtype, PackedLayout.of(shapes), meta_order)

    def in_order(self, meta_order: str) -> ExpertFormat:
        """This format with its scales and zeros in `meta_order` where a weight's allow it; where none does, the
        grid order's format (this one, when it is), so that a load reads its files' experts as they are."""
        if self.spec is None or meta_order == self.meta_order:
            return self
        sizes = (self.hidden_size, self.intermediate_size, self.spec, self.dtype)
        grid = self if self.meta_order == "grid" else ExpertFormat.build(*sizes)
        if meta_order == "grid":
            return grid
        moved = ExpertFormat.build(*sizes, meta_order)
        return grid if moved.layout == grid.layout else moved

    def on_cpu(self) -> ExpertFormat:
        """This format as experts computed on the CPU hold it: scales and zeros by output where a weight's allow it
        (by_output), else this format itself."""
        return self.in_order("output")

    @property
    def meta_words(self) -> str | None:
        """Where this format's scales and zeros lie, in words ("packed row", as in "by packed row"); None in grid
        order."""
        return None if self.meta_order == "grid" else _ORDERS[self.meta_order].words

    def meta_by_row(self, shape: tuple[int, int]) -> bool:
        """Whether this format holds the scales and zeros of a weight of `shape` by packed row (META_ROWS)."""
        return self.meta_order == "row" and by_row(shape, self.spec)

    @staticmethod
    def _weight_shapes(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, int]]:
        return {
            "w1": (intermediate_size, hidden_size),
            "w2": (hidden_size, intermediate_size),
            "w3": (intermediate_size, hidden_size),
        }

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def pack(
        self, w1: Tensor | Quantized, w2: Tensor | Quantized, w3: Tensor | Quantized, out: Tensor | None = None
    ) -> Tensor:
        """Quantize (when spec is set) and pack one expert into a uint8 buffer [nbytes] (new, or `out`). Weights
        quantized already (another format's `unpack`, at this spec) are packed as they are. Each tensor is copied
        straight into its place, its scales and zeros from either order to this format's: a load repacks 17 GB
        this way, and a buffer between would cost it a page fault a page."""
        weights = {"w1": w1, "w2": w2, "w3": w3}
        shapes = self._weight_shapes(self.hidden_size, self.intermediate_size)
        for name, shape in shapes.items():  # every check before the first byte is written
            weight = weights[name]
            if tuple(weight.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(weight.shape)}")
            if self.spec is not None and isinstance(weight, Quantized) and weight.spec != self.spec:
                raise ValueError(f"{name}: quantized at {weight.spec.describe()}, not {self.spec.describe()}")
        if self.spec is not None:
            weights = {name: w if isinstance(w, Quantized) else quantize(w, self.spec) for name, w in weights.items()}
        device = w1.codes.device if isinstance(w1, Quantized) else w1.device
        out = self.layout.blank(out, device)
        places = self.unpack(out)
        for name in shapes:
            if self.spec is None:
                places[name].copy_(weights[name])  # to this format's dtype
                continue
            place = to_tensors(places[name], name)
            for key, tensor in to_tensors(weights[name], name).items():
                _copy_into(place[key], tensor, key)
        return out

    def random(self, generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
        """A synthetic expert for speed tests (no quantization): random codes, sane scales and zeros.

        Dequantized weights are finite, |w| < 0.1 with a standard deviation near 0.01-0.02, like a
        trained model's, so a synthetic model computes sane numbers. Deterministic for a seeded
        `generator` (which must live on out's device). By output, the same weights as in grid order.
        """
        if self.meta_order != "grid":
            grid = self.in_order("grid")
            return self.pack(**grid.unpack(grid.random(generator)), out=out)
        if out is None:
            out = torch.zeros(self.nbytes, dtype=torch.uint8)
        views = self.layout.views(out)
        out.zero_()
        for name, view in views.items():
            if self.spec is None:
                view.copy_(torch.randn(view.shape, generator=generator, device=view.device) * 0.01)
                continue
            if name.endswith(".codes"):
                # drawn in their own dtype: the same numbers as int64 draws cast (tests/test_synth.py), in half the time
                view.copy_(torch.randint(0, code_high(view.dtype), view.shape, generator=generator, device=view.device,
                                         dtype=view.dtype))  # fmt: skip
            else:  # "w1.scale", or "w1.scale.scale" when scale and zero are quantized
                view.fill_(synthetic_meta(name, self.spec))
        return out

    def meta_weights(self) -> dict[str, Tensor | Quantized]:
        """The weights of an expert in this format as shapes only, on the meta device: to count, not compute."""
        return self.unpack(torch.empty(self.nbytes, dtype=torch.uint8, device="meta"))

    def unpack(self, buffer: Tensor) -> dict[str, Tensor | Quantized]:
        """{"w1", "w2", "w3"}: tensors or Quantized whose tensors are views into `buffer`."""
        views = self.layout.views(buffer)
        shapes = self._weight_shapes(self.hidden_size, self.intermediate_size)
        if self.spec is None:
            return {name: views[name] for name in shapes}
        for name in shapes:
            if f"{name}.meta.codes" in views:
                held = {key: views.pop(f"{name}.{key}") for key in BY_OUTPUT}
                views.update((f"{name}.{part}", view) for part, view in _ORDERS[self.meta_order].views(held).items())
        return {name: from_tensors(views, name, self.spec, shape) for name, shape in shapes.items()}

    def to_dict(self) -> dict:
        if self.meta_order != "grid":  # made at load: files keep grid order (module doc)
            raise ValueError(f"an expert format with its meta by {self.meta_order} is not written to a file")
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "spec": None if self.spec is None else self.spec.to_dict(),
            "dtype": dtype_name(self.dtype),
            "layout": self.layout.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ExpertFormat:
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            spec=None if d["spec"] is None else QuantSpec.from_dict(d["spec"]),
            dtype=dtype_of(d["dtype"]),
            layout=PackedLayout.from_dict(d["layout"]),
        )


def by_output(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """Whether a weight of `shape` at `spec` has its meta laid out by output in an "output" format: 8-bit
    scale and zero codes with float meta of their own, in groups that tile an output's G, and bit slots that hold
    whole outputs (not 3-bit's)."""
    meta = spec.meta_spec
    return (
        meta is not None and meta.bits == 8 and meta.meta_bits is None and spec.bits != 3
        and shape[0] % _ROWS_PER_ELEMENT[spec.bits] == 0 and (shape[1] // spec.group_size) % meta.group_size == 0
    )  # fmt: skip


# The tensors a weight's scales and zeros make by output, and what each holds, as to_tensors names them
BY_OUTPUT = {"meta.codes": ("scale.codes", "zero.codes"),
             "meta.meta": ("scale.scale", "scale.zero", "zero.scale", "zero.zero")}  # fmt: skip


def _shapes_by_output(shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple, torch.dtype]]:
    """[N / PER, PER, 2, G] codes: a packed row's bit slots, each with its scales' codes, then its zeros'; and
    [N / PER, PER, 2, 2, G / group] float16: the scales and zeros of those, in the same order."""
    per = _ROWS_PER_ELEMENT[spec.bits]
    outputs, groups = shape[0] // per, shape[1] // spec.group_size
    return {"meta.codes": ((outputs, per, 2, groups), torch.uint8),
            "meta.meta": ((outputs, per, 2, 2, groups // spec.meta_group_size), META_DTYPE)}  # fmt: skip


def _copy_into(place: Tensor, tensor: Tensor, name: str) -> None:
    """A weight's tensor into its place in a buffer, in either order of scales and zeros (by output, a view
    [PER, N / PER, G]; in grid order, contiguous [N * G / 128, 128]): both hold the grid's row-major order."""
    if tensor.dtype != place.dtype or tensor.numel() != place.numel():
        raise ValueError(
            f"{name}: expected {tuple(place.shape)} {place.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
        )
    if tensor.shape == place.shape:
        place.copy_(tensor)
    elif tensor.is_contiguous():
        place.copy_(tensor.view(place.shape))
    else:
        place.view(tensor.shape).copy_(tensor)


def _views_by_output(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BY_OUTPUT's tensors back as to_tensors' names: views [PER, N / PER, G or G / group] (module doc)."""
    views = {}
    for key, parts in BY_OUTPUT.items():
        held = tensors[key].transpose(0, 1)  # [PER, N / PER, 2, G] or [PER, N / PER, 2, 2, G / group]
        held = held.flatten(2, -2) if held.dim() == 5 else held
        views.update(zip(parts, held.unbind(2), strict=True))
    return views


def _shapes_by_row(shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple, torch.dtype]]:
    """[N / PER, G, 2, PER] codes: a packed row's scale codes of its bit slots, then their zero codes; and
    [N / PER, G / group, 4, PER] float16: for each meta group of packed rows, their scales' scale and zero, then their
    zeros' scale and zero, of each bit slot (module doc)."""
    per = _ROWS_PER_ELEMENT[spec.bits]
    outputs, groups = shape[0] // per, shape[1] // spec.group_size
    return {"meta.codes": ((outputs, groups, 2, per), torch.uint8),
            "meta.meta": ((outputs, groups // spec.meta_group_size, 4, per), META_DTYPE)}  # fmt: skip


def _views_by_row(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """_shapes_by_row's tensors back as to_tensors' names: views [PER, N / PER, G or G / group], as _views_by_output
    gives its own."""
    views = {}
    for key, parts in BY_OUTPUT.items():
        views.update(zip(parts, _row_views(tensors[key]), strict=True))
    return views


def _row_views(held: Tensor) -> tuple[Tensor, ...]:
    """One of _shapes_by_row's tensors [N / PER, G, parts, PER] as its parts' views [PER, N / PER, G] in grid order."""
    return held.permute(2, 3, 0, 1).unbind(0)


@functools.lru_cache(maxsize=64)
def by_row(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """Whether a weight of `shape` at `spec` can hold its meta by packed row (with_meta_by_row): where it can by
    output, and its packed rows hold more than one output (not 8-bit's)."""
    return by_output(shape, spec) and _ROWS_PER_ELEMENT[spec.bits] > 1


def has_meta_by_row(q: Quantized) -> bool:
    """Whether q's scales and zeros are the views of a by-row pair of tensors (with_meta_by_row), which the GPU's
    kernel reads from the first element of its scale codes and of their scale. Cheap (a few microseconds): gemv asks
    at every call."""
    if not by_row(q.shape, q.spec) or not all(isinstance(meta, Quantized) for meta in (q.scale, q.zero)):
        return False
    per = _ROWS_PER_ELEMENT[q.spec.bits]
    for key, (shape, dtype) in _shapes_by_row(q.shape, q.spec).items():
        parts = [getattr(getattr(q, meta), part) for meta, part in (name.split(".") for name in BY_OUTPUT[key])]
        # _row_views' of [rows, groups, len(parts), PER]: part k at k * PER, [PER, rows, groups], strides below
        strides, first = (1, shape[1] * len(parts) * per, len(parts) * per), parts[0]
        for k, part in enumerate(parts):
            if (part.dtype != dtype or part.shape != (per, *shape[:2]) or part.stride() != strides
                    or part.data_ptr() != first.data_ptr() + k * per * dtype.itemsize
                    or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):  # fmt: skip
                return False
    return True


def with_meta_by_output(q: Quantized) -> Quantized:
    """q with its scales and zeros by output, as an "output" format holds them (new tensors; the codes are
    q's): one weight's, for benchmarks and tests."""
    return _with_meta(q, "output")


def with_meta_by_row(q: Quantized) -> Quantized:
    """q with its scales and zeros by packed row, as a "row" format holds them for the GPU's kernel (module doc; new
    tensors, the codes are q's): one weight's, for benchmarks and tests."""
    return _with_meta(q, "row")


def _with_meta(q: Quantized, meta_order: str) -> Quantized:
    """q with its scales and zeros copied into new tensors in `meta_order` (_ORDERS), whose views are in grid order."""
    order = _ORDERS[meta_order]
    if not order.applies(q.shape, q.spec):
        raise ValueError(f"a weight {q.shape} at {q.spec.describe()} has no meta by {order.words}")
    shapes = order.shapes(q.shape, q.spec)
    held = {key: torch.empty(shape, dtype=dtype, device=q.codes.device) for key, (shape, dtype) in shapes.items()}
    views = order.views(held)
    for key, tensor in to_tensors(q, "").items():
        if key != ".codes":
            _copy_into(views[key[1:]], tensor, key[1:])
    return from_tensors({**{f"w.{part}": view for part, view in views.items()}, "w.codes": q.codes}, "w", q.spec,
                        q.shape)  # fmt: skip


class _Order(NamedTuple):
    """A meta order other than grid's: where it applies, the tensors it lays a weight's scales and zeros in (BY_OUTPUT's
    keys), their views in grid order, and its name in words ("by packed row")."""

    applies: Callable[[tuple[int, int], QuantSpec], bool]
    shapes: Callable[[tuple[int, int], QuantSpec], dict[str, tuple[tuple, torch.dtype]]]
    views: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    words: str


_ORDERS = {"output": _Order(by_output, _shapes_by_output, _views_by_output, "output"),
           "row": _Order(by_row, _shapes_by_row, _views_by_row, "packed row")}  # fmt: skip
META_ORDERS = ("grid", *_ORDERS)


def _merged(tensors: dict, name: str, replacements: dict) -> dict:
    """A weight's tensor shapes (tensor_shapes) with its scales' and zeros' replaced by `replacements` (BY_OUTPUT's
    keys: an _Order's shapes), in their place."""
    held = {f"{name}.{part}" for parts in BY_OUTPUT.values() for part in parts}
    merged = {}
    for key, value in tensors.items():
        if key == f"{name}.scale.codes":
            merged.update((f"{name}.{k}", v) for k, v in replacements.items())
        elif key not in held:
            merged[key] = value
    return merged
