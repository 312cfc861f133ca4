"""Where to make the prefetch guess: recall, hit rate and wasted loads on the trained tiny model.

Teacher-forced decode (one token at a time, as generation runs) over windows of real Python source,
through K CPU slots per layer that count exactly as GPU slots would, for each guess point:
none, early (after layer l's attention), late (at layer l's output), both (early, corrected late),
and the output guess reaching 2 and 3 layers ahead (late+2, late+3: offload/prefetch.py).
On the CPU every load lands at once, so a guess made earlier shows only its cost here (wasted
loads, bytes), not the copy time it hides: that needs a GPU.

    python benchmarks/prefetch_points.py [--model ../shared/models/tiny-mixtral-code] [--windows 4]

Prints a table and writes benchmarks/results/prefetch_points_tiny.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from benchmarks import run_script  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant.files import check_writable  # noqa: E402

SOURCES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py")  # modules of the standard library


def windows(tokenizer, count: int, length: int) -> list[list[int]]:
    import textwrap

    stdlib = Path(textwrap.__file__)
    out = []
    for name in SOURCES[:count]:
        ids = tokenizer((stdlib.parent / name).read_text())["input_ids"]
        out.append(ids[:length])
    return out


POINTS = (("none", 1), ("early", 1), ("late", 1), ("both", 1), ("late", 2), ("late", 3))  # (prefetch, ahead)


def run(model_dir: str, slots: int, prefetch: str, ahead: int, texts: list[list[int]]) -> dict:
    model = offload.load(model_dir, device="cpu", slots=slots, prefetch=prefetch, prefetch_ahead=ahead)
    start = time.perf_counter()
    for ids in texts:
        model.reset()
        for pos, token in enumerate(ids):
            model.forward(torch.tensor([token]), pos)
    seconds = time.perf_counter() - start
    total = model.stats.total
    return {
        "slots": slots,
        "prefetch": prefetch,
        "ahead": ahead,
        "hit_rate": round(total.hit_rate, 4),
        "recall": None if total.recall is None else round(total.recall, 4),
        "prefetches_issued": total.prefetches_issued,
        "prefetches_used": total.prefetches_used,
        "prefetches_wasted": total.prefetches_wasted,
        "h2d_bytes": total.h2d_bytes,
        "tokens": sum(len(t) for t in texts),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "tiny-mixtral-code"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--slots", default="2,3,4")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prefetch_points_tiny.json"))
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    torch.set_num_threads(1)
    tokenizer = offload.load(args.model, device="cpu").tokenizer
    texts = windows(tokenizer, args.windows, args.length)
    rows = [
        run(args.model, int(slots), prefetch, ahead, texts)
        for slots in args.slots.split(",")
        for prefetch, ahead in POINTS
    ]
    header = ("slots", "prefetch", "hit rate", "recall", "issued", "used", "wasted", "MiB in")
    print(" ".join(f"{h:>8}" for h in header))
    for r in rows:
        recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        point = r["prefetch"] if r["ahead"] == 1 else f"{r['prefetch']}+{r['ahead']}"
        cells = (r["slots"], point, f"{r['hit_rate']:.3f}", recall, r["prefetches_issued"],
                 r["prefetches_used"], r["prefetches_wasted"], f"{r['h2d_bytes'] / 2**20:.1f}")  # fmt: skip
        print(" ".join(f"{c:>8}" for c in cells))
    report = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "model": "tiny-mixtral-code (trained, 6 layers, 8 experts, top 2), unquantized",
        "routing": "model",
        "text": f"{len(texts)} windows of {args.length} tokens of: {', '.join(SOURCES[: len(texts)])}",
        "results": rows,
    }
    write_json(args.out, report, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
