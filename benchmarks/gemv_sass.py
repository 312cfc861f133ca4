"""What the fused GEMV kernel compiles to for a GPU, on a machine with none: registers, and its K loop's instructions.

    python benchmarks/gemv_sass.py [--arch 90|75] [--out benchmarks/results/gemv_sass.json]

Compiles quant/gemv.py's packed-row kernel, which Mixtral's expert matrices take at 2 and 4 bits, at gemv's default
launch, in each variant benchmarks/gemv_kernel.py times on a GPU (late_sum, fast_codes, stages, mantissa_codes; and
the default with early_meta flipped; and as gemv.gated's w1 and w3 pair, at gated's early_meta and flipped; then, for
8-bit meta, the default alone and gated with the meta by packed row, gemv's META_ROWS). It uses Triton's own
ptxas, then reads the cubin back with the cuobjdump and nvdisasm that Triton ships. For each it gives the registers a
thread, the shared memory a program (the cubin's, and the pipeliner's stages'), how many programs an SM holds by those
two (GPUS: an H100 for sm_90, a T4 for sm_75, the free Colab's), how many waves w1 and w2 then take on its SMs, and the
instructions of the K loop's body (one step: a thread's share of block_n x block_k codes), by kind, with where in it
the loads to registers are issued.
These are counts, not times: a kernel that waits on memory runs no faster for fewer instructions. Runs without
TRITON_INTERPRET (which makes kernels interpreted). Writes benchmarks/results/gemv_sass.json.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import gemv  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.gemv_tune import KEYWORDS, VARIANTS  # noqa: E402

# name: (x and out dtype, codes dtype, scale/zero codes dtype, bits, rows per element, group, meta group)
CASES = {
    "2-bit, 8-bit meta, bf16": ("bf16", "u8", "u8", 2, 4, 16, 128),
    "3-bit, fp16": ("fp16", "i32", "fp16", 3, 10, 64, None),
    "4-bit, fp32": ("fp32", "u8", "fp16", 4, 2, 64, None),
    "8-bit, bf16": ("bf16", "u8", "fp16", 8, 1, 64, None),
}
SHAPES = {"w1": (14336, 4096), "w2": (4096, 14336)}  # Mixtral-8x7B's expert matrices
# The GPU a compute capability stands for here, and what an SM of it holds (CUDA's occupancy tables)
GPUS = {
    75: {"name": "T4", "sms": 40, "registers": 65536, "shared": 64 * 1024, "warps": 32, "programs": 16},
    90: {"name": "H100", "sms": 132, "registers": 65536, "shared": 227 * 1024, "warps": 64, "programs": 32},
}


def compile_case(case: tuple, arch: int, packed: bool = False, **variant):
    """Triton's compiled kernel: _gemv_kernel, or with `packed` _gemv_packed_kernel, at gemv's default launch for
    it, in gemv's default variant or `variant`'s (late_sum, fast_codes, stages, mantissa_codes: the last only for
    byte codes, as gemv.reads_bytes; split_k; early_meta; and even, False for a matrix the launch does not tile
    exactly, whose loads are masked). Pointers and sizes are declared 16-byte aligned, as Triton specializes them
    at launch for Mixtral's shapes."""
    from triton.backends.compiler import GPUTarget  # here: CPU builds of torch may come without Triton
    from triton.compiler import ASTSource

    triton = gemv.triton

    act, codes, meta_codes, bits, per, group, meta_group = case
    block_n, block_k, warps = gemv.PACKED_LAUNCH[bits] if packed else (gemv.BLOCK_N, gemv.BLOCK_K, 4)
    pointers = {"x_ptr": act, "codes_ptr": codes, "scale_codes": meta_codes, "scale_scale": "fp16",
                "scale_zero": "fp16", "zero_codes": meta_codes, "zero_scale": "fp16", "zero_zero": "fp16"}  # fmt: skip
    pointers |= {"up_" + name.removesuffix("_ptr"): dtype for name, dtype in list(pointers.items())[1:]}  # w3's
    pointers |= {"out_ptr": act, "partial_ptr": "fp32"}  # fmt: skip
    constants = {"BITS": bits, "PER": per, "GROUP": group, "QUANTIZED_META": meta_group is not None,
                 "META_GROUP": meta_group or 1, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "GB": block_k // group, "SPLIT_K": variant.get("split_k", gemv.SPLIT_K),
                 "EVEN": variant.get("even", True),  # Mixtral's shapes: whole programs and steps at every launch
                 "LATE_SUM": variant.get("late_sum", gemv.LATE_SUM),
                 "FAST_CODES": variant.get("fast_codes", gemv.FAST_CODES),
                 "STAGES": variant.get("stages", gemv.PACKED_STAGES if packed else 1),
                 "EARLY_META": variant.get("early_meta", gemv.EARLY_META),
                 "GATED": variant.get("gated", False)}  # fmt: skip
    if packed:
        constants["PER_P2"] = triton.next_power_of_2(per)
        constants["MANTISSA_CODES"] = codes == "u8" and variant.get("mantissa_codes", gemv.MANTISSA_CODES)
        constants["META_ROWS"] = variant.get("meta_rows", False)
    signature = {name: "*" + dtype for name, dtype in pointers.items()}
    signature |= {"N": "i32", "K": "i32", "STEP": "i32"} | {name: "constexpr" for name in constants}
    aligned = [i for i, name in enumerate(signature) if name not in constants]  # every pointer and size
    kernel = gemv._gemv_packed_kernel if packed else gemv._gemv_kernel
    source = ASTSource(kernel, signature, constants, {(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def triton_tool(name: str) -> str:
    """A program Triton ships beside its ptxas: cuobjdump, nvdisasm."""
    return str(Path(gemv.triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def loop_body(sass: str) -> list[str]:
    """The opcodes of the longest backward branch's body in nvdisasm's listing: the kernel's K loop."""
    lines, labels, best = sass.splitlines(), {}, []
    for at, line in enumerate(lines):
        if re.match(r"^\s*\.L_x_\d+:", line):
            labels[line.strip()[:-1]] = at
        branch = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if branch and labels.get(branch.group(1), at) < at:
            body = [m.group(1) for m in map(INSTRUCTION.match, lines[labels[branch.group(1)] : at + 1]) if m]
            best = max(best, body, key=len)
    return best


def occupancy(registers: int, shared: int, warps: int, gpu: dict) -> int:
    """Programs of `warps` warps an SM of `gpu` holds: registers are allocated 256 a warp at a time."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = gpu["registers"] // per_warp // warps
    by_shared = gpu["shared"] // shared if shared else gpu["programs"]
    return min(by_registers, by_shared, gpu["warps"] // warps, gpu["programs"])


def analyse(case: tuple, arch: int, **variant) -> dict:
    """One variant of the packed-row kernel: registers, shared memory, occupancy, waves and its loop."""
    kernel = compile_case(case, arch, packed=True, **variant)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([triton_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout  # fmt: skip
        sass = subprocess.run([triton_tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout  # fmt: skip
    registers, static = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "SHARED"))
    shared = static + kernel.metadata.shared  # the pipeliner's stages are dynamic shared memory, which the cubin omits
    bits, per = case[3], case[4]
    block_n, block_k, warps = gemv.PACKED_LAUNCH[bits]
    gpu = GPUS[arch]
    programs = occupancy(registers, shared, warps, gpu)
    body = loop_body(sass)
    return {
        **variant, "registers": registers, "shared_bytes": shared, "programs_per_sm": programs,
        "waves": {name: round(math.ceil(n // per / block_n) / (programs * gpu["sms"]), 2)
                  for name, (n, _) in SHAPES.items()},
        "loop_instructions": len(body),  # gated: both matrices' codes
        "codes_a_thread_a_step": (1 + variant.get("gated", False)) * block_n * block_k * per // (32 * warps),
        # where in the loop its loads to registers (the scales' and zeros'; the tiles' go by cp.async) are issued
        "global_loads_at": [at for at, opcode in enumerate(body) if opcode == "LDG"],
        "loop_by_kind": dict(collections.Counter(body).most_common(12)),
    }  # fmt: skip


def _span(positions: list[int]) -> str:
    return f"{positions[0]}-{positions[-1]}" if positions else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=sorted(GPUS),
        help="the GPU's compute capability, as a number: 90 for an H100, 75 for a T4",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gemv_sass.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    if gemv.triton is None:
        raise MoEOffloadError("Triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET"):
        raise MoEOffloadError("TRITON_INTERPRET is set: unset it, since interpreted kernels are never compiled")
    rows = []
    for name in ("2-bit, 8-bit meta, bf16", "4-bit, fp32"):
        case = CASES[name]
        if args.arch < 80 and case[0] == "bf16":  # no bfloat16 before sm_80: a T4 computes in float16 (auto's dtype)
            name, case = name.replace("bf16", "fp16"), ("fp16", *case[1:])
        default = (gemv.LATE_SUM, gemv.FAST_CODES, gemv.PACKED_STAGES, gemv.MANTISSA_CODES)
        # every variant with the default early_meta, then the default with it flipped; then gemv.gated's pair, at its
        # own default early_meta and flipped
        runs = [(v, gemv.EARLY_META, False) for v in VARIANTS] + [(default, not gemv.EARLY_META, False)]
        runs += [(default, early_meta, True) for early_meta in (gemv.GATED_EARLY_META, not gemv.GATED_EARLY_META)]
        runs = [(*run, False) for run in runs]
        if case[6] is not None and case[3] != 3:  # 8-bit meta: by packed row too (META_ROWS), alone and gated
            runs += [(default, gemv.EARLY_META, False, True)]
            runs += [(default, early_meta, True, True) for early_meta in (gemv.GATED_EARLY_META,
                                                                          not gemv.GATED_EARLY_META)]  # fmt: skip
        for variant, early_meta, gated, meta_rows in runs:
            late_sum, fast_codes, stages, mantissa_codes = variant
            keywords = {**dict(zip(KEYWORDS, variant)), "early_meta": early_meta, "gated": gated,
                        "meta_rows": meta_rows}  # fmt: skip
            row = {"case": name, **analyse(case, args.arch, **keywords)}
            rows.append(row)
            is_default = (
                not meta_rows
                and variant == default
                and early_meta == (gemv.GATED_EARLY_META if gated else gemv.EARLY_META)
            )
            print(f"{name:24} late_sum={late_sum!s:5} fast_codes={fast_codes!s:5} stages={stages} "
                  f"mantissa_codes={mantissa_codes!s:5} early_meta={early_meta!s:5}{' gated' * gated}"
                  f"{' meta by row' * meta_rows}: {row['registers']:3} registers, {row['shared_bytes']} B shared, "
                  f"{row['programs_per_sm']:2} programs an SM, w1 in {row['waves']['w1']} waves; loop "
                  f"{row['loop_instructions']} instructions for {row['codes_a_thread_a_step']} codes, loads at "
                  f"{_span(row['global_loads_at'])}" + (" (default)" if is_default else ""))  # fmt: skip
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "arch": f"sm_{args.arch}", "gpu": GPUS[args.arch]["name"], "triton": gemv.triton.__version__,
        "launch": {bits: list(launch) for bits, launch in gemv.PACKED_LAUNCH.items()}, "variants": rows,
    }  # fmt: skip
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
