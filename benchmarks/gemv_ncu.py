"""The fused GEMV under Nsight Compute's hardware counters (CUDA, with `ncu`): what its kernels wait on.

    python benchmarks/gemv_ncu.py [--out benchmarks/results/gemv_ncu.json] [--ncu PATH] [--set full] [--case LABEL]

At 9d0bc23 a 2-bit Mixtral expert matrix (22 MB) took about 70 us of device time in a decode step
(h100_9d0bc23/profile_decode_h100_graphs.json), where an H100's memory moves it in about 7 and its issue rate allows
about 19 (benchmarks/gemv_sass.py): the kernel waits, and static counts cannot say on what. This runs each of CASES
once under `ncu --set full` (kernel replay, caches flushed before each pass, clocks left alone) and keeps, for each
kernel: its duration, DRAM bytes and throughput, occupancy (achieved, and what limits it), issue-slot use, how long
a warp waits per issued instruction by stall reason, and the instructions where the sampled warps stalled most,
with their SASS.

The script runs twice. This command starts `ncu ... python benchmarks/gemv_ncu.py --launch FILE`; that inner run
builds the matrices, compiles each launch, then runs each case once between cudaProfilerStart and cudaProfilerStop
(ncu's --profile-from-start off), and writes what it launched to FILE. This one then reads ncu's report through
Nsight Compute's Python interface (extras/python/ncu_report.py, beside ncu) and writes the JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_script  # noqa: E402
from benchmarks.gemv_kernel import HIDDEN, INTERMEDIATE  # noqa: E402
from offload.bench import environment, write_json  # noqa: E402
from quant import gemv  # noqa: E402
from quant.errors import MoEOffloadError  # noqa: E402
from quant.files import check_writable  # noqa: E402
from quant.gemv_tune import multiply  # noqa: E402
from quant.hqq import ATTN_PRESETS, EXPERT_PRESETS, QuantSpec, Workspace, quantized_nbytes, random_quantized  # noqa: E402

NCU_HOME = Path("/opt/nvidia/nsight-compute")  # Nsight Compute's installs, one folder a version


@dataclass(frozen=True)
class Case:
    """One launch to profile: x [1, K] times a random matrix [N, K] of `spec`, or with `gated` an expert's w1 and w3
    (gemv.gated), at the launch gemv picks (tuned for the GPU, else the defaults) changed by `launch`."""

    label: str
    shape: tuple[int, int]
    spec: QuantSpec
    gated: bool = False
    launch: tuple[tuple[str, object], ...] = ()  # gemv's keywords, as (name, value) pairs


# A decode step's expert matrices, the w1 one again without the pipelined K loop (what cp.async's stages change in
# the counters), and attention's largest (4 a layer with k, v and o)
CASES = (
    Case("w1 2-bit", (INTERMEDIATE, HIDDEN), EXPERT_PRESETS["2"]),
    Case("w2 2-bit", (HIDDEN, INTERMEDIATE), EXPERT_PRESETS["2"]),
    Case("w1+w3 2-bit gated", (INTERMEDIATE, HIDDEN), EXPERT_PRESETS["2"], gated=True),
    Case("w1 2-bit, one stage", (INTERMEDIATE, HIDDEN), EXPERT_PRESETS["2"], launch=(("stages", 1),)),
    Case("q_proj 4-bit", (HIDDEN, HIDDEN), ATTN_PRESETS["4"]),
)

# Counters kept whole for every kernel, beside every one whose name says "issue_stalled" (the warp-state breakdown)
KEEP = (
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct", "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum", "smsp__warps_eligible.avg.per_cycle_active", "smsp__warps_active.avg.per_cycle_active",
    "smsp__thread_inst_executed_per_inst_executed.ratio", "lts__t_sector_hit_rate.pct", "l1tex__t_sector_hit_rate.pct",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "sm__cycles_elapsed.avg.per_second",
    "launch__registers_per_thread", "launch__shared_mem_per_block_static", "launch__shared_mem_per_block_dynamic",
    "launch__grid_size", "launch__block_size", "launch__waves_per_multiprocessor", "launch__occupancy_limit_registers",
    "launch__occupancy_limit_shared_mem", "launch__occupancy_limit_warps", "launch__occupancy_limit_blocks",
)  # fmt: skip
# A warp's cycles waiting per issued instruction, by reason (the WarpStateStats section's breakdown)
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
# Per instruction (correlated by PC): warps sampled stalled there, by reason (SourceCounters), and executions
PC_STALL = re.compile(r"smsp__pcsamp_warps_issue_stalled_(\w+)")
TOP_PCS = 40  # the instructions kept, most sampled first


def chosen_cases(labels: list[str] | None) -> tuple[Case, ...]:
    """The CASES of these labels (--case), in CASES' order; all of them for None; a one-line error for another."""
    if labels is None:
        return CASES
    known = [case.label for case in CASES]
    if unknown := [label for label in labels if label not in known]:
        raise MoEOffloadError(f"--case {unknown[0]!r} is not a case; choose among {', '.join(map(repr, known))}")
    return tuple(case for case in CASES if case.label in labels)


def kernel_names(q, chosen: dict) -> list[str]:
    """The Triton kernels one gemv call on q launches at the launch `chosen` (gemv.launch's), in order."""
    first = "_gemv_packed_kernel" if gemv._rows_together(q) > 1 else "_gemv_kernel"
    return [first] + ["_sum_splits_kernel"] * (chosen["split_k"] > 1)


def launch_cases(path: Path | str, cases=CASES, device: torch.device | None = None, dtype=torch.bfloat16) -> list:
    """The inner run: each case built, compiled by a first call, then called once more, on CUDA between
    cudaProfilerStart and Stop; what ran (the launch, its kernels, the bytes it reads) written to `path`."""
    device = device or torch.device("cuda")
    runs = []
    for case in cases:
        generator = torch.Generator(device).manual_seed(0)
        matrices = [random_quantized(case.shape, case.spec, generator) for _ in range(1 + case.gated)]
        x = torch.randn(1, case.shape[1], generator=generator, device=device).to(dtype)
        out = torch.empty(1, case.shape[0], device=device, dtype=dtype)
        launch = dict(case.launch)
        m = tuple(matrices) if case.gated else matrices[0]  # gemv_tune.multiply's pair, or the matrix
        call = functools.partial(multiply, x, m, out, Workspace(), **launch)
        call()  # compiled here, outside what ncu profiles
        chosen = gemv.launch(x, matrices[0], gated=case.gated, **launch)
        runs.append((call, {
            "label": case.label, "shape": list(case.shape), "spec": case.spec.describe(), "gated": case.gated,
            "launch": chosen, "kernels": kernel_names(matrices[0], chosen),
            "quantized_bytes": quantized_nbytes(case.shape, case.spec) * len(matrices),
        }))  # fmt: skip
    profiled = device.type == "cuda"
    if profiled:
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()
    for call, _ in runs:
        call()
    if profiled:
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()
    launched = [record for _, record in runs]
    Path(path).write_text(json.dumps(launched))
    return launched


def find_ncu(given: str | None) -> Path:
    """ncu: `given`, else on the PATH, else the newest under NCU_HOME."""
    if given is not None:
        if not Path(given).is_file():
            raise MoEOffloadError(f"--ncu {given} is not a file; give the path of Nsight Compute's ncu")
        return Path(given)
    found = shutil.which("ncu") or next(iter(sorted(NCU_HOME.glob("*/ncu"), reverse=True)), None)
    if found is None:
        raise MoEOffloadError(f"no ncu on the PATH or under {NCU_HOME}: install Nsight Compute, or give its path "
                              "with --ncu")  # fmt: skip
    return Path(found)


def report_module(ncu: Path):
    """Nsight Compute's Python interface to its reports, from the extras/python beside `ncu` (or in any install)."""
    folders = [ncu.resolve().parent / "extras" / "python", *sorted(NCU_HOME.glob("*/extras/python"), reverse=True)]
    for folder in folders:
        if (folder / "ncu_report.py").is_file():
            sys.path.insert(0, str(folder))
            try:
                return importlib.import_module("ncu_report")
            except ImportError as error:  # its compiled half, built for another Python, say
                raise MoEOffloadError(f"cannot import {folder / 'ncu_report.py'}: {error}") from None
    raise MoEOffloadError(f"no ncu_report.py (Nsight Compute's Python interface) in {', '.join(map(str, folders))}")


def _number(metric, instance: int | None = None) -> float | None:
    """A metric's value (of one instance) as a number, or None where it is not one (a name, a string)."""
    try:
        value = metric.as_double() if instance is None else metric.as_double(instance)
    except Exception:  # noqa: BLE001 -- a metric of another kind: not a figure this keeps
        return None
    return value if isinstance(value, int | float) else None


def _instances(metric) -> int:
    """How many per-instruction instances a metric has: 0 for a plain one."""
    try:
        count = metric.num_instances()
    except Exception:  # noqa: BLE001 -- an interface without instances: a plain metric
        return 0
    try:
        correlated = metric.has_correlation_ids()
    except AttributeError:
        correlated = count > 0
    return count if correlated else 0


def read_action(action) -> dict:
    """One profiled kernel: its name, the kept counters (value and unit), and its most stalled instructions."""
    metrics, per_pc = {}, {}
    for name in action.metric_names():
        metric = action.metric_by_name(name)
        if metric is None:
            continue
        if count := _instances(metric):
            if PC_STALL.fullmatch(name) or name in ("inst_executed", "smsp__pcsamp_sample_count"):
                pcs = metric.correlation_ids()
                per_pc[name] = {int(pcs.as_uint64(i)): _number(metric, i) or 0.0 for i in range(count)}
        elif name in KEEP or "issue_stalled" in name:
            value = _number(metric)
            if value is not None:
                metrics[name] = [value, metric.unit()]
    return {"name": action.name(), "metrics": metrics, "instructions": top_instructions(action, per_pc)}


def top_instructions(action, per_pc: dict[str, dict[int, float]]) -> list[dict]:
    """The TOP_PCS instructions the sampled warps stalled at most (all reasons but the _not_issued counts, which
    repeat them), each with its SASS, executions and three largest reasons."""
    reasons = {PC_STALL.fullmatch(name)[1]: samples for name, samples in per_pc.items()
               if PC_STALL.fullmatch(name) and not name.endswith("_not_issued")}  # fmt: skip
    totals: dict[int, float] = {}
    for samples in reasons.values():
        for pc, value in samples.items():
            totals[pc] = totals.get(pc, 0.0) + value
    top = []
    for pc in sorted(totals, key=lambda pc: (-totals[pc], pc))[:TOP_PCS]:
        by_reason = sorted(((samples.get(pc, 0.0), reason) for reason, samples in reasons.items()), reverse=True)
        try:
            sass = action.sass_by_pc(pc)
        except Exception:  # noqa: BLE001 -- the samples still say where, by address
            sass = None
        top.append({"pc": pc, "sass": sass, "samples": totals[pc],
                    "executed": per_pc.get("inst_executed", {}).get(pc),
                    "reasons": {reason: value for value, reason in by_reason[:3] if value}})  # fmt: skip
    return top


def read_report(path: Path, module) -> list[dict]:
    """Every profiled kernel of the report at `path`, in launch order (read_action)."""
    report = module.load_report(str(path))
    if report is None:
        raise MoEOffloadError(f"ncu_report could not read {path}")
    return [read_action(found.action_by_idx(a)) for r in range(report.num_ranges())
            for found in [report.range_by_idx(r)] for a in range(found.num_actions())]  # fmt: skip


def pair(launched: list[dict], kernels: list[dict]) -> list[dict]:
    """Each launched case with its profiled kernels (launch_cases' order), or a one-line error where ncu's kernels
    are not those the cases launched."""
    names = [name for case in launched for name in case["kernels"]]
    found = [re.split(r"[(<\s]", kernel["name"], maxsplit=1)[0] for kernel in kernels]  # a name without its arguments
    if found != names:
        raise MoEOffloadError(f"ncu profiled {[k['name'] for k in kernels]}, not the cases' kernels {names}")
    kernels = iter(kernels)
    return [{**case, "kernels": [summarize(next(kernels), case["quantized_bytes"] if i == 0 else None)
                                 for i in range(len(case["kernels"]))]} for case in launched]  # fmt: skip


def summarize(kernel: dict, quantized_bytes: int | None) -> dict:
    """kernel plus `summary`: the figures the table prints, from its counters; `quantized_bytes` are those the case
    must read, for the kernel that reads them (not split-K's sum of the partials)."""
    metrics = {name: value for name, (value, _) in kernel["metrics"].items()}
    seconds = metrics.get("gpu__time_duration.sum", 0.0) / 1e9  # ns
    stalls = sorted(((value, STALL.fullmatch(name)[1]) for name, value in metrics.items() if STALL.fullmatch(name)),
                    reverse=True)  # fmt: skip

    def rate(nbytes: float | None) -> float | None:
        return None if nbytes is None or not seconds else round(nbytes / seconds / 1e9, 1)

    summary = {
        "us": round(seconds * 1e6, 2),
        "quantized_gb_per_s": rate(quantized_bytes),  # the bytes the call must read, over its time
        "dram_read_gb_per_s": rate(metrics.get("dram__bytes_read.sum")),
        "dram_pct_of_peak": metrics.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
        "issue_active_pct": metrics.get("smsp__issue_active.avg.pct_of_peak_sustained_active"),
        "occupancy_pct": metrics.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
        "registers": metrics.get("launch__registers_per_thread"),
        "stalls": {reason: round(value, 2) for value, reason in stalls[:4]},  # cycles per issued instruction
    }
    return {**kernel, "summary": summary}


def print_table(cases: list[dict]) -> None:
    print("GB/s: the matrix's quantized bytes over the kernel's time; stalls: a warp's cycles per issued instruction")
    print(f"{'case':<22}{'kernel':<22}{'us':>8}{'GB/s':>8}{'DRAM %':>8}{'issue %':>8}{'occ %':>7}{'regs':>6}  stalls")
    for case in cases:
        for kernel in case["kernels"]:
            s = kernel["summary"]
            cells = [f"{s[key]:>{width}.1f}" if s[key] is not None else f"{'-':>{width}}"
                     for key, width in (("us", 8), ("quantized_gb_per_s", 8), ("dram_pct_of_peak", 8),
                                        ("issue_active_pct", 8), ("occupancy_pct", 7), ("registers", 6))]  # fmt: skip
            stalls = ", ".join(f"{reason} {value}" for reason, value in s["stalls"].items())
            print(f"{case['label']:<22}{kernel['name']:<22}{''.join(cells)}  {stalls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gemv_ncu.json"))
    parser.add_argument("--ncu", help="Nsight Compute's ncu (default: on the PATH, else /opt/nvidia/nsight-compute)")
    parser.add_argument("--set", default="full", help="ncu's section set (default: full; `ncu --list-sets`)")
    parser.add_argument(
        "--case",
        action="append",
        metavar="LABEL",
        help="profile only this case (repeatable; default: all): " + ", ".join(repr(c.label) for c in CASES),
    )
    parser.add_argument("--launch", help=argparse.SUPPRESS)  # the inner run, under ncu: where to write what ran
    args = parser.parse_args()
    chosen = chosen_cases(args.case)  # its one-line error before any work
    if args.launch is not None:
        launch_cases(args.launch, chosen)
        return
    check_writable(args.out, "--out")  # before the work, not after it
    ncu = find_ncu(args.ncu)
    if not torch.cuda.is_available() or gemv.triton is None:
        sys.exit("error: this benchmark needs a CUDA device and Triton")
    try:
        module, unread = report_module(ncu), None
    except MoEOffloadError as error:  # the counters are still kept, as ncu's own CSV
        module, unread = None, str(error)
    version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    with tempfile.TemporaryDirectory() as folder:
        report, launched = Path(folder) / "gemv", Path(folder) / "launched.json"  # ncu adds .ncu-rep
        command = [str(ncu), "--clock-control", "none", "--profile-from-start", "off", "--set", args.set,
                   "--target-processes", "all", "--export", str(report), "--force-overwrite",
                   sys.executable, str(Path(__file__).resolve()), "--launch", str(launched),
                   *(f"--case={label}" for label in args.case or ())]  # fmt: skip
        print(shlex.join(command), flush=True)
        if (code := subprocess.run(command).returncode) != 0:
            raise MoEOffloadError(f"ncu exited with code {code}: {shlex.join(command)}")
        cases = json.loads(launched.read_text())
        if module is not None:
            try:
                cases = pair(cases, read_report(report.with_suffix(".ncu-rep"), module))
            except Exception as error:  # noqa: BLE001 -- an interface unlike the one read_report knows
                unread = f"{type(error).__name__}: {error}"
        if unread is not None:  # ncu's details page as it prints it, so that the GPU's minutes are not lost
            print(f"warning: the report was not read ({unread}); keeping ncu's details page as CSV", file=sys.stderr)
            details = [str(ncu), "--import", str(report.with_suffix(".ncu-rep")), "--page", "details", "--csv"]
            csv = subprocess.run(details, capture_output=True, text=True).stdout
    record = {
        **environment(torch.device("cuda"), program=f"python {sys.argv[0]}"),
        "ncu": version[-1] if version else None,
        "ncu_command": shlex.join(command[: command.index(sys.executable)]),
        "cases": cases,
    }
    if unread is not None:
        record |= {"unread": unread, "details_csv": csv}
        write_json(args.out, record, "--out")
        sys.exit(f"error: wrote {args.out} with ncu's CSV only: {unread}")
    print_table(cases)
    write_json(args.out, record, "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
