"""How many device kernels a decode step's resident part launches, counted on the CPU.

    python benchmarks/decode_launches.py [--layers 32] [--steps 3] [--out benchmarks/results/decode_launches.json]

A decode step on a GPU is mostly small kernels, each worth 1 to 4 us of device time whatever it does (the H100
profile at 9d0bc23), so their count is a cost of its own. This runs the static decode path (the pieces CUDA graphs
capture, offload/decoder.py) eagerly on the CPU, on a Mixtral of Mixtral-8x7B's layers, experts and top-k and a
tiny width, and counts what each piece dispatches: every aten operator that does work (views and allocations
launch nothing) and every Triton launch (the one-kernel norm, RoPE and routing, interpreted). Counts are split by
piece (attention, guess, head; the experts' are left out, since the CPU's expert kernel is not the GPU's), with
the MoE block's routing (`route_into`) and the late guess (`guess_into`) apart. It counts each one-kernel path off
and on: on the GPU an aten operator is at least one kernel, so the differences are the launches a path saves;
the totals are the CPU's (its attention and projections differ from CUDA's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["TRITON_INTERPRET"] = "1"  # the kernels run on CPU tensors, interpreted: read when they are defined

import offload  # noqa: E402
from benchmarks import run_script  # noqa: E402
from offload import norm, rope, router  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.demo import write_random_mixtral  # noqa: E402
from offload.graphs import DecodeGraphs  # noqa: E402

# a path's kernels on, as a CUDA device's first try finds them: the decoder's norm and RoPE, the MoE block's routing
PATHS = {"torch's steps": (), "norm, rope": (norm, rope), "norm, rope, routing": (norm, rope, router)}
KERNELS = ((norm, "_rms_norm_kernel"), (rope, "_rope_kernel"), (router, "_route_kernel"))
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "set_", "resize_"}  # allocate or alias


class Sections:
    """Counts device work by the innermost section it runs in (a piece's kind, or the MoE block's route_into and
    guess_into); outside every section nothing is counted (the host's work between the pieces)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.counts: Counter = Counter()

    @contextlib.contextmanager
    def section(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    def count(self) -> None:
        if self.stack:
            self.counts[self.stack[-1]] += 1


class CountOps(TorchDispatchMode):
    def __init__(self, sections: Sections) -> None:
        super().__init__()
        self.sections = sections

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.sections.count()
        return func(*args, **(kwargs or {}))


class CountedLaunches:
    """Stands in for a Triton kernel: each launch is counted, then runs."""

    def __init__(self, kernel, sections: Sections) -> None:
        self.kernel, self.sections = kernel, sections

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.sections.count()
            with _disable_current_modes():  # the interpreter's own tensor work is not the kernel's
                return self.kernel[grid](*args, **keywords)

        return run


class SectionGraphs(DecodeGraphs):
    """The static path's pieces run eagerly, each inside a section of its kind."""

    def __init__(self, sections: Sections) -> None:
        super().__init__(capture=False)
        self.sections = sections

    def run(self, key, fn) -> None:
        with self.sections.section(key[0]):
            fn()


def count(path: Path, kernels: tuple, prefetch: str, steps: int) -> dict[str, float]:
    """Device work a decode step, by section, with `kernels`' modules taken as their first tries would find."""
    sections = Sections()
    with contextlib.ExitStack() as undo:
        for module in (norm, rope, router):
            works = module.works
            undo.callback(setattr, module, "works", works)
            why_not = None if module in kernels else norm.NOT_CUDA  # off as on the CPU: no warning
            module.works = lambda device, dtype, why_not=why_not: why_not
        for module, name in KERNELS:
            kernel = getattr(module, name)
            undo.callback(setattr, module, name, kernel)
            setattr(module, name, CountedLaunches(kernel, sections))
        model = offload.load(str(path), device="cpu", slots=4, prefetch=prefetch)
        model.decoder.graphs = SectionGraphs(sections)
        for method in ("route_into", "guess_into"):
            inner = getattr(model.moe, method)
            setattr(model.moe, method, lambda *a, inner=inner, method=method: _in(sections, method, inner, a))
        model.reset()
        model.forward(torch.tensor([5, 6, 7]), 0)
        model.forward(torch.tensor([8]), 3)  # a first step: anything made once
        sections.counts.clear()
        with CountOps(sections):
            for pos in range(4, 4 + steps):
                model.forward(torch.tensor([9]), pos)
    per_step = {name: n / steps for name, n in sorted(sections.counts.items()) if name != "expert"}
    return per_step | {"total": sum(per_step.values())}


def _in(sections: Sections, name: str, fn, args) -> None:
    with sections.section(name):
        fn(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="layers (Mixtral-8x7B's 32)")
    parser.add_argument("--steps", type=int, default=3, help="decode steps counted")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode_launches.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = write_random_mixtral(Path(folder) / "m", layers=args.layers, experts=8, top_k=2, seed=0)
        for prefetch in ("none", "late", "both"):
            results[prefetch] = {name: count(path, kernels, prefetch, args.steps) for name, kernels in PATHS.items()}
    sections = sorted({s for by_path in results.values() for counts in by_path.values() for s in counts})
    print(f"device work a decode step, {args.layers} layers, by section (aten operators and Triton launches)")
    print(f"{'prefetch':<9}{'paths':<22}" + "".join(f"{s:>12}" for s in sections))
    for prefetch, by_path in results.items():
        for name, counts in by_path.items():
            print(f"{prefetch:<9}{name:<22}" + "".join(f"{counts.get(s, 0):>12.0f}" for s in sections))
    record = {
        **environment(torch.device("cpu"), "benchmarks/decode_launches.py"),
        "model": f"random Mixtral, {args.layers} layers, 8 experts, top 2, hidden 64",
        "counted": "aten operators that do work and Triton launches, a decode step, experts' pieces left out",
        "per_step": results,
    }
    write_json(args.out, record, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
