"""How long `synth` takes and how much RAM it peaks at, per preset (the folder is deleted afterwards).

    python benchmarks/synth_time.py [--presets mixtral-small,mixtral-8x7b] [--dir /tmp]

Writes benchmarks/results/synth_time.json.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from offload.synth import synthesize  # noqa: E402
from quant.files import check_writable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="mixtral-small,mixtral-8x7b")
    parser.add_argument("--dir", default="/tmp", help="where the folders are written (and deleted)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "synth_time.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it
    rows = []
    for preset in args.presets.split(","):
        workdir = Path(tempfile.mkdtemp(prefix="synth-", dir=args.dir))
        try:
            begin = time.perf_counter()
            folder = synthesize(workdir / preset, preset, expert_bits="2", attn_bits="4")
            seconds = time.perf_counter() - begin
            size = sum(p.stat().st_size for p in folder.iterdir())
        finally:
            shutil.rmtree(workdir)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append({"preset": preset, "expert_bits": "2", "attn_bits": "4", "seconds": round(seconds, 1),
                     "bytes": size, "peak_rss_bytes_so_far": peak})  # fmt: skip
        print(f"{preset}: {size / 1e9:.2f} GB in {seconds:.1f} s")
    note = "writing, fsync and sha256 included; peak RSS is the process's, cumulative over presets"
    report = {**environment(torch.device("cpu"), program=f"python {sys.argv[0]}"), "results": rows, "note": note}
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
