"""This checkout's C kernel against another revision's, in one process taking turns, on Mixtral-8x7B's matrices.

    python benchmarks/cpu_gemv_ab.py REV [--bits 2] [--tokens 1] [--matrices 6] [--rounds 6] [--seconds 5]
                                         [--out benchmarks/results/cpu_gemv_ab.json]

This shared 2-core machine's speed moves by 10-20% from one minute to the next, so separate processes cannot
tell a change of a few percent. This builds quant/cpu_gemv.c (and the header it includes) as git holds them at REV
beside this checkout's, loads both into this process, and times the same calls through each in turn: `--matrices`
synthetic 14336 x 4096 matrices (w1's shape; 6 are 132 MB, out of the cache, as a decode step reads them), the
next one each call, `--seconds` a library a round. 2-bit's 8-bit scales and zeros are by output, as load holds
them on the CPU. Each figure is a round's milliseconds a call. The Python around the calls is this checkout's, so
REV's C must take the same Problem struct. Writes benchmarks/results/cpu_gemv_ab.json.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.bench import commit, environment, write_json  # noqa: E402
from quant import cpu_gemv  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import EXPERT_PRESETS, Workspace, random_quantized  # noqa: E402
from quant.packing import by_output, with_meta_by_output  # noqa: E402

SHAPE = (14336, 4096)  # Mixtral-8x7B's w1


def revision_library(revision: str, folder: Path):
    """cpu_gemv.c and its header as git holds them at `revision`, built for this CPU and loaded; and the commit."""
    sources = []
    for name in (cpu_gemv.SOURCE.name, *cpu_gemv.HEADER_NAMES):
        shown = subprocess.run(["git", "show", f"{revision}:quant/{name}"], cwd=REPO, capture_output=True)
        if shown.returncode != 0:
            raise MoEOffloadError(f"git has no quant/{name} at {revision!r}: {shown.stderr.decode().strip()}")
        sources.append(folder / name)
        sources[-1].write_bytes(shown.stdout)
    full = subprocess.run(["git", "rev-parse", revision], cwd=REPO, capture_output=True, text=True).stdout.strip()
    path = cpu_gemv.build(cpu_gemv.find_compiler(), cpu_gemv.cache_dir(), sources[0])
    return cpu_gemv.load(path), full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare with (a commit, a tag, HEAD~1)")
    parser.add_argument("--bits", default="2", choices=sorted(set(EXPERT_PRESETS) - {"none"}))
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--matrices", type=int, default=6, help="matrices taken in turn (3 or more: out of cache)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="each library's time a round")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_gemv_ab.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    spec = EXPERT_PRESETS[args.bits]
    weights = [random_quantized(SHAPE, spec, torch.Generator().manual_seed(seed)) for seed in range(args.matrices)]
    if by_output(SHAPE, spec):
        weights = [with_meta_by_output(weight) for weight in weights]
    x = torch.randn(args.tokens, SHAPE[1], generator=torch.Generator().manual_seed(1))
    try:
        with tempfile.TemporaryDirectory() as folder:
            theirs, their_commit = revision_library(args.revision, Path(folder))
        libraries = {"revision": theirs, "checkout": cpu_gemv.library()}
    except cpu_gemv.KernelUnavailable as error:
        raise MoEOffloadError(f"the C kernel: {error}") from None
    built = cpu_gemv.library
    workspace, runs = Workspace(), []
    print(f"{'round':>5} {args.revision + ', ms':>14} {'checkout, ms':>14}")
    try:
        for round_ in range(1, args.rounds + 1):
            row = {"round": round_}
            for name, library in libraries.items():
                cpu_gemv.library = lambda library=library: library  # what gemv calls, looked up at each call
                turn = itertools.cycle(weights)
                for _ in range(2 * args.matrices):
                    cpu_gemv.gemv(x, next(turn), workspace=workspace)
                calls, begin = 0, time.perf_counter()
                while time.perf_counter() - begin < args.seconds:
                    cpu_gemv.gemv(x, next(turn), workspace=workspace)
                    calls += 1
                row[name] = round((time.perf_counter() - begin) / calls * 1000, 4)
            runs.append(row)
            print(f"{round_:>5} {row['revision']:>14.3f} {row['checkout']:>14.3f}")
    finally:
        cpu_gemv.library = built
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "revision": their_commit, "checkout": commit(),
        "weights": f"{args.matrices} x {SHAPE} at {spec.describe()}", "tokens": args.tokens,
        "threads": torch.get_num_threads(), "ms_per_call": runs,
    }  # fmt: skip
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
