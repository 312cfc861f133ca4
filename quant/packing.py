"""The packed expert: one contiguous uint8 buffer; its tensors are views into it.

A `PackedLayout` records where each tensor lives (offset, shape, dtype). Every expert of a model
shares one layout (`ExpertFormat`), so loading an expert is one copy of `nbytes` bytes into a slot,
and `views(slot)` turns the slot back into tensors without copying.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from quant.hqq import Quantized, QuantSpec, code_high, from_tensors, quantize, synthetic_meta, tensor_shapes, to_tensors

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
        if out is None:
            out = torch.zeros(self.nbytes, dtype=torch.uint8, device=next(iter(tensors.values())).device)
        if out.dtype != torch.uint8 or tuple(out.shape) != (self.nbytes,):
            raise ValueError(f"pack needs a uint8 buffer of shape ({self.nbytes},), got {out.dtype} {out.shape}")
        end = 0
        for entry in self.entries:
            tensor = tensors[entry.name]
            if tuple(tensor.shape) != entry.shape or dtype_name(tensor.dtype) != entry.dtype:
                raise ValueError(
                    f"{entry.name}: expected {entry.shape} {entry.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
                )
            out[end : entry.offset].zero_()  # deterministic bytes whatever `out` held before
            out[entry.offset : entry.offset + entry.nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
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

    @classmethod
    def build(
        cls, hidden_size: int, intermediate_size: int, spec: QuantSpec | None, dtype: torch.dtype
    ) -> ExpertFormat:
        """Derive the layout analytically from the shapes (nothing is quantized)."""
        shapes: dict[str, tuple[tuple, torch.dtype]] = {}
        for name, shape in cls._weight_shapes(hidden_size, intermediate_size).items():
            if spec is None:
                shapes[name] = (shape, dtype)
            else:
                shapes.update(tensor_shapes(shape, spec, name))
        return cls(hidden_size, intermediate_size, spec, dtype, PackedLayout.of(shapes))

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

    def pack(self, w1: Tensor, w2: Tensor, w3: Tensor, out: Tensor | None = None) -> Tensor:
        """Quantize (when spec is set) and pack one expert into a uint8 buffer [nbytes]."""
        weights = {"w1": w1, "w2": w2, "w3": w3}
        tensors: dict[str, Tensor] = {}
        for name, shape in self._weight_shapes(self.hidden_size, self.intermediate_size).items():
            weight = weights[name]
            if tuple(weight.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(weight.shape)}")
            if self.spec is None:
                tensors[name] = weight.to(self.dtype)
            else:
                tensors.update(to_tensors(quantize(weight, self.spec), name))
        return self.layout.pack(tensors, out)

    def random(self, generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
        """A synthetic expert for speed tests (no quantization): random codes, sane scales and zeros.

        Dequantized weights are finite, |w| < 0.1 with a standard deviation near 0.01-0.02, like a
        trained model's, so a synthetic model computes sane numbers. Deterministic for a seeded
        `generator` (which must live on out's device).
        """
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
        return {name: from_tensors(views, name, self.spec, shape) for name, shape in shapes.items()}

    def to_dict(self) -> dict:
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
