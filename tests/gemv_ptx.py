"""Compile quant/gemv.py's kernels, and offload/embedding.py's, ahead of time for GPU architectures, on a
machine with no GPU.

Run by tests/test_gemv.py in a subprocess without TRITON_INTERPRET (which makes kernels interpreted).
Prints one JSON object: {"<kernel> <case> sm_<arch>": {"<load instruction>": count, ...}} (cp.async, the
pipeliner's copy to shared memory, counted as a load), for
_gemv_kernel on every case, _gemv_packed_kernel on those with more than one code per element, and
_gather_rows_kernel on a bfloat16 and a float16 table. The pointers and sizes are declared 16-byte aligned, as Triton
specializes them at launch for Mixtral's shapes.
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

from offload import embedding  # noqa: E402
from quant import gemv  # noqa: E402

CASES = {  # name: (x and out dtype, codes dtype, scale/zero codes dtype, bits, rows per element, group, meta group)
    "2-bit, 8-bit meta, bf16": ("bf16", "u8", "u8", 2, 4, 16, 128),
    "3-bit, fp16": ("fp16", "i32", "fp16", 3, 10, 64, None),
    "4-bit, fp32": ("fp32", "u8", "fp16", 4, 2, 64, None),
    "8-bit, bf16": ("bf16", "u8", "fp16", 8, 1, 64, None),
}


GLOBAL_LOAD = r"ld\.global[\w.]*|cp\.async\.c[ag]\.shared\.global"  # to registers, and cp.async to shared


def compile_case(case: tuple, arch: int, packed: bool = False) -> str:
    """PTX of _gemv_kernel, or with `packed` of _gemv_packed_kernel at gemv's default launch for it."""
    act, codes, meta_codes, bits, per, group, meta_group = case
    block_n, block_k, warps = gemv.PACKED_LAUNCH[bits] if packed else (gemv.BLOCK_N, gemv.BLOCK_K, 4)
    pointers = {"x_ptr": act, "codes_ptr": codes, "scale_codes": meta_codes, "scale_scale": "fp16",
                "scale_zero": "fp16", "zero_codes": meta_codes, "zero_scale": "fp16", "zero_zero": "fp16",
                "out_ptr": act}  # fmt: skip
    constants = {"BITS": bits, "PER": per, "GROUP": group, "QUANTIZED_META": meta_group is not None,
                 "META_GROUP": meta_group or 1, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "GB": block_k // group, "LATE_SUM": gemv.LATE_SUM, "FAST_CODES": gemv.FAST_CODES,
                 "STAGES": gemv.PACKED_STAGES if packed else 1}  # fmt: skip
    if packed:
        constants["PER_P2"] = triton.next_power_of_2(per)
    signature = {name: "*" + dtype for name, dtype in pointers.items()}
    signature |= {"N": "i32", "K": "i32", "STEP": "i32"} | {name: "constexpr" for name in constants}
    aligned = [i for i, name in enumerate(signature) if name not in constants]  # every pointer and size
    kernel = gemv._gemv_packed_kernel if packed else gemv._gemv_kernel
    source = ASTSource(kernel, signature, constants, {(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm["ptx"]


def compile_gather(arch: int, dtype: str = "bf16") -> str:
    """PTX of _gather_rows_kernel for a table of `dtype`, as gather_rows launches it."""
    signature = {"ids_ptr": "*i64", "table_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "V": "i32", "D": "i32"}
    signature["BLOCK"] = "constexpr"
    source = ASTSource(embedding._gather_rows_kernel, signature, {"BLOCK": embedding.BLOCK},
                       {(i,): [["tt.divisibility", 16]] for i in range(5)})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


if __name__ == "__main__":
    loads = {}
    for name, case in CASES.items():
        for kernel, packed in (("_gemv_kernel", False), ("_gemv_packed_kernel", True)):
            if packed and case[4] == 1:  # one code per byte: gemv never takes the packed kernel
                continue
            for arch in map(int, sys.argv[1:]):
                ptx = compile_case(case, arch, packed)
                loads[f"{kernel} {name} sm_{arch}"] = dict(collections.Counter(re.findall(GLOBAL_LOAD, ptx)))
    for arch in map(int, sys.argv[1:]):
        # bfloat16 (sm_80 and later) and float16, the dtype auto picks on a T4 (sm_75)
        for dtype in ("bf16", "fp16"):
            ptx = compile_gather(arch, dtype)
            loads[f"_gather_rows_kernel {dtype} sm_{arch}"] = dict(collections.Counter(re.findall(GLOBAL_LOAD, ptx)))
    print(json.dumps(loads))
