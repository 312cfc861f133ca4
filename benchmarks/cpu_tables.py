"""A table kept at its checkpoint's width on the CPU: Mixtral-8x7B's lm_head, by tokens.

    python benchmarks/cpu_tables.py [--dtypes bfloat16,float16] [--tokens 1,2,4,8] [--rounds 3]

A decode step on the CPU multiplies each token by the lm_head, 32000 x 4096. Kept at the checkpoint's width
(offload/decoder.py's NARROW_TABLES), the C kernel widens each weight as it reads it (cpu_gemv.multiply_wide),
and the fallback without it widens a tile of rows at a time (quant/linear.py's _widened). Widened to float32
at load, as it was before, the table is twice the RAM and twice the bytes a step reads, through F.linear.
The three take turns, `--rounds` times; each figure is the fastest round. Writes
benchmarks/results/cpu_tables.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import ms_per_call, run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import cpu_gemv  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.hqq import Workspace  # noqa: E402
from quant.linear import CPU, linear  # noqa: E402

SHAPE = (32000, 4096)  # Mixtral-8x7B's lm_head (and embedding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_tables.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    cpu_gemv.library()  # built (or found) before anything is timed
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        table = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
        widened = table.float()
        kernel, tiles = Workspace(CPU), Workspace()
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, SHAPE[1], generator=torch.Generator().manual_seed(1))
            if not cpu_gemv.supports_wide(x, table):
                raise SystemExit(f"--tokens {tokens}: the kernel serves 1 to {cpu_gemv.MAX_TOKENS} tokens")
            calls = {
                "c_ms": functools.partial(linear, x, table, workspace=kernel),
                "tiles_ms": functools.partial(linear, x, table, workspace=tiles),
                "float32_table_ms": functools.partial(F.linear, x, widened),
            }
            rounds = {key: [] for key in calls}
            for _ in range(args.rounds):
                for key, call in calls.items():
                    rounds[key].append(ms_per_call(call, 5))
            row = {"dtype": name, "tokens": tokens, **{k: round(min(v), 2) for k, v in rounds.items()}}
            rows.append(row)
            print(f"{name:>8}, {tokens} tokens: C {row['c_ms']:6.2f} ms, tiles {row['tiles_ms']:6.2f} ms, "
                  f"float32 table {row['float32_table_ms']:6.2f} ms")  # fmt: skip
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "table": f"{SHAPE[0]} x {SHAPE[1]}",
        "table_bytes": {"bfloat16": SHAPE[0] * SHAPE[1] * 2, "float32": SHAPE[0] * SHAPE[1] * 4},
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
