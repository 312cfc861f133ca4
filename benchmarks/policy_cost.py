"""Host time of a cache policy's bookkeeping, per access and per eviction, on the shared Mixtral trace.

python benchmarks/policy_cost.py [--trace PATH] [--slots 5] [--repeats 7] [--before REV]
                                 [--out benchmarks/results/policy_cost_cpu.json]

On a GPU decode step this bookkeeping runs on the host between kernel launches, so it is on the
critical path. The trace is replayed as `cache.simulate.simulate` replays it without prefetch (one
SlotTable per layer, policies from `make_policies`), with each layer's policy wrapped in a timer:
`on_access` calls are the access figure (PathMatch's RoutingMemory.record included), `victim`
calls the eviction figure, and on_insert, on_evict and reset are summed as "other". Each figure is
the median over `--repeats` replays of the mean per call, and includes one perf_counter pair
(about 0.08 µs). `--before REV` also times cache/policies.py as it was at git revision REV, in the
same process with the replays interleaved, and checks that both choose the same victim every time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


import cache.policies  # noqa: E402
from benchmarks import run_script  # noqa: E402
from cache.policies import Policy  # noqa: E402
from cache.simulate import simulate  # noqa: E402
from cache.table import SlotTable  # noqa: E402
from cache.trace import Trace, read_trace  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant.files import check_writable  # noqa: E402

SHARED_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
POLICY_NAMES = ("path", "lru")
KINDS = ("access", "eviction", "other")


class Timed(Policy):
    """Passes every call to `inner`, adding up its host seconds by kind, and logs each victim."""

    def __init__(self, inner: Policy, layer: int, victims: list[tuple[int, int, int]]) -> None:
        self.inner = inner
        self.layer = layer
        self.victims = victims  # (layer, t, victim), shared by every layer's wrapper
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)

    def _add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.calls[kind] += 1

    def reset(self) -> None:
        start = time.perf_counter()
        self.inner.reset()
        self._add("other", time.perf_counter() - start)

    def on_access(self, expert: int, t: int, weight: float) -> None:
        start = time.perf_counter()
        self.inner.on_access(expert, t, weight)
        self._add("access", time.perf_counter() - start)

    def on_insert(self, expert: int, t: int, prefetch: bool) -> None:
        start = time.perf_counter()
        self.inner.on_insert(expert, t, prefetch)
        self._add("other", time.perf_counter() - start)

    def on_evict(self, expert: int) -> None:
        start = time.perf_counter()
        self.inner.on_evict(expert)
        self._add("other", time.perf_counter() - start)

    def victim(self, candidates: Sequence[int], t: int) -> int:
        start = time.perf_counter()
        victim = self.inner.victim(candidates, t)
        self._add("eviction", time.perf_counter() - start)
        self.victims.append((self.layer, t, victim))
        return victim


def policies_at(revision: str) -> types.ModuleType:
    """cache/policies.py as it was at git `revision`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:cache/policies.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"policies_at_{revision}")
    exec(compile(source, f"{revision}:cache/policies.py", "exec"), module.__dict__)
    return module


def replay(trace: Trace, policies_module: types.ModuleType, name: str, slots: int) -> tuple[dict, list]:
    """One timed replay: (seconds and calls by kind, summed over layers, plus hits; the victim log)."""
    victims: list[tuple[int, int, int]] = []
    policies = policies_module.make_policies(name, trace.num_layers, trace.num_experts)
    timed = [Timed(policy, layer, victims) for layer, policy in enumerate(policies)]
    tables = [SlotTable(slots, policy) for policy in timed]
    gc.disable()  # a collection landing inside one timed call would dwarf it
    try:
        for sequence in trace.sequences():
            for table in tables:
                table.reset()
            for token in sequence:
                for table, request in zip(tables, token.layers):
                    table.request(request.experts, request.weights)
    finally:
        gc.enable()
    run = {kind: sum(p.seconds[kind] for p in timed) for kind in KINDS}
    run |= {f"{kind}_calls": sum(p.calls[kind] for p in timed) for kind in KINDS}
    run["hits"] = sum(table.stats.hits for table in tables)
    return run, victims


def summary(runs: list[dict], tokens: int) -> dict:
    """Median over replays of µs per call, and of the policy's host ms per token."""
    first = runs[0]
    row = {
        "accesses": first["access_calls"],
        "evictions": first["eviction_calls"],
        "hits": first["hits"],
    }
    for kind in KINDS:
        calls = first[f"{kind}_calls"]
        row[f"{kind}_us"] = round(statistics.median(r[kind] / calls * 1e6 for r in runs), 3) if calls else None
    row["host_ms_per_token"] = round(statistics.median(sum(r[k] for k in KINDS) / tokens * 1e3 for r in runs), 4)
    return row


def git_revision(revision: str) -> str:
    done = subprocess.run(["git", "rev-parse", revision], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=SHARED_TRACE)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", metavar="REV", help="also time cache/policies.py at this git revision")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "policy_cost_cpu.json")
    args = parser.parse_args()
    check_writable(args.out, "--out")  # before the work, not after it

    trace = read_trace(args.trace)
    tokens = len(trace.tokens)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "cache/policies.py"], cwd=REPO).returncode != 0
    head = git_revision("HEAD")
    versions: dict[str, tuple[types.ModuleType, str]] = {}  # name -> (policies module, which code)
    if args.before:
        versions["before"] = (policies_at(args.before), git_revision(args.before))
    versions["after"] = (cache.policies, f"{head} with uncommitted changes" if dirty else head)

    runs: dict[tuple[str, str], list[dict]] = {(v, name): [] for v in versions for name in POLICY_NAMES}
    victim_logs: dict[str, list] = {}
    for _ in range(args.repeats):
        for version, (module, _) in versions.items():  # interleaved, so drift hits both alike
            for name in POLICY_NAMES:
                run, victims = replay(trace, module, name, args.slots)
                runs[version, name].append(run)
                if name == "path":
                    victim_logs[version] = victims
    for (_, name), version_runs in runs.items():
        # the wrapper changes nothing: the counts are simulate's
        assert version_runs[0]["hits"] == simulate(trace, name, args.slots).hits, name

    rows = {version: {name: summary(runs[version, name], tokens) for name in POLICY_NAMES} for version in versions}
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"policy host time, {args.slots} slots, {args.trace.name} ({tokens} tokens x {trace.num_layers} layers)",
    )
    for column in ("code", "policy", "µs/access", "µs/eviction", "µs/other", "evictions", "ms/token"):
        table.add_column(column, justify="left" if column in ("code", "policy") else "right", no_wrap=True)
    for version, by_name in rows.items():
        for name, row in by_name.items():
            table.add_row(
                version,
                name,
                f"{row['access_us']:.2f}",
                f"{row['eviction_us']:.2f}" if row["eviction_us"] is not None else "-",
                f"{row['other_us']:.2f}",
                str(row["evictions"]),
                f"{row['host_ms_per_token']:.3f}",
            )
    console = Console()
    console.print(table)

    record = {
        **environment(torch.device("cpu"), program=f"python {sys.argv[0]}"),
        "trace": args.trace.name,
        "tokens": tokens,
        "slots": args.slots,
        "repeats": args.repeats,
        "timing": "each policy call wrapped in time.perf_counter; median over replays of the mean µs per call",
    }
    for version, (_, label) in versions.items():
        record[version] = {"policies_file": f"cache/policies.py at {label}", **rows[version]}
    if "before" in versions:
        before, after = rows["before"]["path"], rows["after"]["path"]
        record["path_speedup"] = {
            kind: round(before[key] / after[key], 2)
            for kind, key in (("access", "access_us"), ("eviction", "eviction_us"), ("token", "host_ms_per_token"))
        }
        record["path_same_victims"] = victim_logs["before"] == victim_logs["after"]
        record["path_victims_compared"] = len(victim_logs["after"])
        console.print(
            f"path: {record['path_speedup']['access']}x less host time per access, "
            f"{record['path_speedup']['eviction']}x per eviction, {record['path_speedup']['token']}x per token; "
            f"same victims in all "
            f"{record['path_victims_compared']} evictions: {record['path_same_victims']}"
        )

    write_json(args.out, record, "--out")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
