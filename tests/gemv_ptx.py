"""Compile quant/gemv.py's kernels, and offload/embedding.py's, ahead of time for GPU architectures, on a
machine with no GPU.

Run by tests/test_gemv.py in a subprocess without TRITON_INTERPRET (which makes kernels interpreted).
Prints one JSON object: {"<kernel> <case> sm_<arch>": {"<load instruction>": count, ...}} (cp.async, the
pipeliner's copy to shared memory, counted as a load), for
_gemv_kernel on every case, _gemv_packed_kernel on those with more than one code per element, each alone and gated
("<kernel> gated <case> sm_<arch>": an expert's w1 and w3 at once), _sum_splits_kernel adding 4 partials alone and
gated, _gather_rows_kernel on a bfloat16 and a float16 table, offload/norm.py's _rms_norm_kernel on a Mixtral row
of each, alone and with the residual add, offload/rope.py's _rope_kernel on Mixtral's queries and keys, and
offload/router.py's _route_kernel on Mixtral's router, routing a layer and guessing one. The
pointers and sizes are declared 16-byte aligned, as Triton specializes them at launch for Mixtral's shapes.
"""

import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.gemv_sass import CASES, compile_case  # noqa: E402
from offload import embedding, norm, rope, router  # noqa: E402
from quant import gemv  # noqa: E402

GLOBAL_LOAD = r"ld\.global[\w.]*|cp\.async\.c[ag]\.shared\.global"  # to registers, and cp.async to shared


def compile_gather(arch: int, dtype: str = "bf16") -> str:
    """PTX of _gather_rows_kernel for a table of `dtype`, as gather_rows launches it."""
    signature = {"ids_ptr": "*i64", "table_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "V": "i32", "D": "i32"}
    signature["BLOCK"] = "constexpr"
    source = ASTSource(embedding._gather_rows_kernel, signature, {"BLOCK": embedding.BLOCK},
                       {(i,): [["tt.divisibility", 16]] for i in range(5)})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


def compile_sum(arch: int, halves: int) -> str:
    """PTX of _sum_splits_kernel adding 4 float32 partials into bfloat16 (halves 2: gated's two products)."""
    signature = {"partial_ptr": "*fp32", "out_ptr": "*bf16", "SIZE": "i32"}
    constants = {"SPLIT_K": 4, "HALVES": halves, "BLOCK": gemv.SUM_BLOCK}
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(
        gemv._sum_splits_kernel, signature, constants, {(i,): [["tt.divisibility", 16]] for i in range(3)}
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


def compile_norm(arch: int, dtype: str, add: bool) -> str:
    """PTX of _rms_norm_kernel on a 4096-wide row of `dtype`, as fused_rms_norm launches it."""
    signature = {"x_ptr": f"*{dtype}", "add_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                 "D": "i32", "eps": "fp32", "BLOCK": "constexpr", "ADD": "constexpr"}  # fmt: skip
    source = ASTSource(norm._rms_norm_kernel, signature, {"BLOCK": 4096, "ADD": add},
                       {(i,): [["tt.divisibility", 16]] for i in range(5)})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8}).asm["ptx"]


def compile_rope(arch: int, dtype: str, heads: int) -> str:
    """PTX of _rope_kernel on Mixtral's `heads` heads of 128, as the decoder launches it: the queries' 32 by rotate,
    the keys' 8 by rotate_into_cache (into the key cache at the position, the values copied into theirs)."""
    signature = {"x_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}", "pos_ptr": "*i64",
                 "out_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "v_out_ptr": f"*{dtype}", "H": "i32", "S": "i32",
                 "OUT_HEAD": "i32", "HEADS": "constexpr", "HALF": "constexpr", "CACHE": "constexpr"}  # fmt: skip
    source = ASTSource(rope._rope_kernel, signature, {"HEADS": heads, "HALF": 64, "CACHE": heads == 8},
                       {(i,): [["tt.divisibility", 16]] for i in range(10)})  # fmt: skip
    warps = min(8, max(1, heads * 64 // 256))  # as rotate
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm["ptx"]


def compile_route(arch: int, dtype: str, guess: bool) -> str:
    """PTX of _route_kernel on Mixtral's router (8 experts of 4096, top 2), in the forms decode launches: a layer's
    routing (ids and weights), or with `guess` a late guess (the residual stream plus the MoE output, normed; ids)."""
    signature = {"x_ptr": f"*{dtype}", "add_ptr": f"*{dtype}", "router_ptr": f"*{dtype}", "norm_ptr": f"*{dtype}",
                 "ids_ptr": "*fp32", "weights_ptr": "*fp32", "D": "i32", "E": "i32", "eps": "fp32"}  # fmt: skip
    columns = min(router.TILE // 8, 4096)
    constants = {"K": 2, "K_TILE": 2, "EXPERTS": 8, "COLUMNS": columns, "ADD": guess, "NORM": guess,
                 "WEIGHTS": not guess}  # fmt: skip
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(router._route_kernel, signature, constants, {(i,): [["tt.divisibility", 16]] for i in range(7)})
    options = {"num_warps": router.warps(8, columns)}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def counted(ptx: str) -> dict[str, int]:
    return dict(collections.Counter(re.findall(GLOBAL_LOAD, ptx)))


if __name__ == "__main__":
    loads = {}
    for name, case in CASES.items():
        for kernel, packed in (("_gemv_kernel", False), ("_gemv_packed_kernel", True)):
            if packed and case[4] == 1:  # one code per byte: gemv never takes the packed kernel
                continue
            for arch in map(int, sys.argv[1:]):
                loads[f"{kernel} {name} sm_{arch}"] = counted(compile_case(case, arch, packed).asm["ptx"])
                gated = compile_case(case, arch, packed, gated=True).asm["ptx"]
                loads[f"{kernel} gated {name} sm_{arch}"] = counted(gated)
                if packed and case[6] is not None and case[3] != 3:  # 8-bit meta by packed row (META_ROWS), too
                    for gated in (False, True):
                        rows = compile_case(case, arch, packed, gated=gated, meta_rows=True).asm["ptx"]
                        loads[f"{kernel}{' gated' * gated} rows {name} sm_{arch}"] = counted(rows)
    for arch in map(int, sys.argv[1:]):
        for halves in (1, 2):
            loads[f"_sum_splits_kernel {'gated' if halves == 2 else 'alone'} sm_{arch}"] = counted(
                compile_sum(arch, halves)
            )
    for arch in map(int, sys.argv[1:]):
        # bfloat16 (sm_80 and later) and float16, the dtype auto picks on a T4 (sm_75)
        for dtype in ("bf16", "fp16"):
            loads[f"_gather_rows_kernel {dtype} sm_{arch}"] = counted(compile_gather(arch, dtype))
            for add in (False, True):
                loads[f"_rms_norm_kernel {dtype}{' add' * add} sm_{arch}"] = counted(compile_norm(arch, dtype, add))
            for heads in (32, 8):  # Mixtral's queries and keys
                loads[f"_rope_kernel {dtype} {heads} heads sm_{arch}"] = counted(compile_rope(arch, dtype, heads))
            for guess in (False, True):
                route = compile_route(arch, dtype, guess)
                loads[f"_route_kernel {dtype}{' guess' * guess} sm_{arch}"] = counted(route)
    print(json.dumps(loads))
