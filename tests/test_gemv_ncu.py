"""benchmarks/gemv_ncu.py runs only on a GPU with Nsight Compute. Here: its inner run on small shapes, interpreted,
against the kernels that really launch (ncu's kernels are paired with the cases by those names); and its reading of
a report, through a stand-in for Nsight Compute's Python interface shaped as ncu_report's calls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gemv_ncu
from benchmarks.gemv_ncu import Case
from quant import gemv
from quant.errors import MoEOffloadError
from quant.hqq import EXPERT_PRESETS, quantized_nbytes

pytestmark = pytest.mark.skipif(gemv.triton is None, reason="needs Triton (its interpreter on the CPU)")


class Named:
    """Stands in for a Triton kernel in gemv's module: records each launch by the kernel's name, then runs it."""

    def __init__(self, kernel, name: str, launched: list) -> None:
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.launched.append(self.name)
            return self.kernel[grid](*args, **keywords)

        return run


def test_the_inner_run_records_the_kernels_each_case_launches(tmp_path, monkeypatch):
    launched = []
    for name in ("_gemv_packed_kernel", "_gemv_kernel", "_sum_splits_kernel"):
        monkeypatch.setattr(gemv, name, Named(getattr(gemv, name), name, launched))
    cases = (
        Case("2-bit", (64, 256), EXPERT_PRESETS["2"]),
        Case("2-bit gated, K split in 2", (64, 256), EXPERT_PRESETS["2"], gated=True, launch=(("split_k", 2),)),
        Case("3-bit", (16, 128), EXPERT_PRESETS["3"]),  # N % 10 != 0: _gemv_kernel
    )
    path = tmp_path / "launched.json"
    records = gemv_ncu.launch_cases(path, cases, torch.device("cpu"), torch.float32)
    assert json.loads(path.read_text()) == records
    kernels = [record["kernels"] for record in records]
    assert kernels == [["_gemv_packed_kernel"], ["_gemv_packed_kernel", "_sum_splits_kernel"], ["_gemv_kernel"]]
    # every case once to compile it, then every case once more (what ncu profiles): the kernels recorded, in order
    recorded = [name for names in kernels for name in names]
    assert launched == recorded + recorded
    assert [record["launch"]["split_k"] for record in records] == [1, 2, 1]
    assert records[1]["launch"]["early_meta"] is gemv.GATED_EARLY_META  # the gated pair's own default
    assert [record["quantized_bytes"] for record in records] == [
        quantized_nbytes((64, 256), EXPERT_PRESETS["2"]),
        2 * quantized_nbytes((64, 256), EXPERT_PRESETS["2"]),
        quantized_nbytes((16, 128), EXPERT_PRESETS["3"]),
    ]
    assert [record["spec"] for record in records] == [EXPERT_PRESETS["2"].describe()] * 2 + ["3-bit g64"]


class Metric:
    """ncu_report's IMetric, as gemv_ncu calls it: a value (or a string), a unit, and per-PC instances."""

    def __init__(self, value, unit="", pcs=None):
        self.value, self.unit_, self.pcs = value, unit, pcs  # pcs: {pc: value} for an instanced metric

    def unit(self):
        return self.unit_

    def as_double(self, instance=None):
        if isinstance(self.value, str):
            raise TypeError("a string metric")
        return self.value if instance is None else list(self.pcs.values())[instance]

    def has_correlation_ids(self):
        return self.pcs is not None

    def num_instances(self):
        return len(self.pcs or {})

    def correlation_ids(self):
        return Correlation(list(self.pcs))


class Correlation:
    def __init__(self, pcs):
        self.pcs = pcs

    def as_uint64(self, i):
        return self.pcs[i]


class Action:
    def __init__(self, name, metrics, sass):
        self.name_, self.metrics, self.sass = name, metrics, sass

    def name(self):
        return self.name_

    def metric_names(self):
        return list(self.metrics)

    def metric_by_name(self, name):
        return self.metrics.get(name)

    def sass_by_pc(self, pc):
        return self.sass[pc]


class Report:
    """A report of one range (ncu's default: every kernel profiled in one process), loaded from any path."""

    def __init__(self, actions):
        self.actions = actions

    def load_report(self, path):
        return self

    def num_ranges(self):
        return 1

    def range_by_idx(self, i):
        return self

    def num_actions(self):
        return len(self.actions)

    def action_by_idx(self, i):
        return self.actions[i]


def gemv_action(name="_gemv_packed_kernel", ns=70_000.0):
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    metrics = {
        "gpu__time_duration.sum": Metric(ns, "nsecond"),
        "dram__bytes_read.sum": Metric(21_000_000.0, "byte"),
        "launch__registers_per_thread": Metric(64.0, "register/thread"),
        "sm__warps_active.avg.pct_of_peak_sustained_active": Metric(40.0, "%"),
        "smsp__issue_active.avg.pct_of_peak_sustained_active": Metric(25.0, "%"),
        "device__attribute_display_name": Metric("NVIDIA H100 80GB HBM3"),  # a string: not kept
        "sm__inst_executed_pipe_alu.sum": Metric(5.0),  # neither kept nor a stall: dropped
        stalled.format("long_scoreboard"): Metric(9.5),
        stalled.format("barrier"): Metric(3.25),
        stalled.format("wait"): Metric(1.0),
        stalled.format("math_pipe_throttle"): Metric(0.5),
        stalled.format("short_scoreboard"): Metric(2.0),
        "smsp__pcsamp_warps_issue_stalled_long_scoreboard": Metric(0.0, pcs={0x100: 50.0, 0x200: 5.0, 0x300: 0.0}),
        "smsp__pcsamp_warps_issue_stalled_barrier": Metric(0.0, pcs={0x100: 0.0, 0x200: 30.0, 0x300: 1.0}),
        "smsp__pcsamp_warps_issue_stalled_barrier_not_issued": Metric(0.0, pcs={0x100: 0.0, 0x200: 99.0, 0x300: 0.0}),
        "inst_executed": Metric(0.0, pcs={0x100: 64.0, 0x200: 128.0, 0x300: 8.0}),
    }
    sass = {0x100: "LDG.E.128 R4, desc[UR4][R2.64]", 0x200: "BAR.SYNC.DEFER_BLOCKING 0x0", 0x300: "FFMA R1, R2, R3, R1"}
    return Action(name, metrics, sass)


def test_a_report_is_read_into_each_cases_kernels_and_summarized(monkeypatch, capsys):
    monkeypatch.setattr(gemv_ncu, "TOP_PCS", 2)
    report = Report([gemv_action(), gemv_action("_gemv_packed_kernel(float*)", 35_000.0)])
    kernels = gemv_ncu.read_report(Path("unused"), report)
    first = kernels[0]
    assert first["name"] == "_gemv_packed_kernel"
    assert "device__attribute_display_name" not in first["metrics"]
    assert "sm__inst_executed_pipe_alu.sum" not in first["metrics"]
    assert first["metrics"]["gpu__time_duration.sum"] == [70_000.0, "nsecond"]
    assert first["instructions"] == [  # by samples, the _not_issued repeats left out; TOP_PCS of them
        {"pc": 0x100, "sass": "LDG.E.128 R4, desc[UR4][R2.64]", "samples": 50.0, "executed": 64.0,
         "reasons": {"long_scoreboard": 50.0}},
        {"pc": 0x200, "sass": "BAR.SYNC.DEFER_BLOCKING 0x0", "samples": 35.0, "executed": 128.0,
         "reasons": {"barrier": 30.0, "long_scoreboard": 5.0}},
    ]  # fmt: skip
    launched = [{"label": "w1", "kernels": ["_gemv_packed_kernel"], "quantized_bytes": 22_000_000},
                {"label": "w2", "kernels": ["_gemv_packed_kernel"], "quantized_bytes": 7_000_000}]  # fmt: skip
    cases = gemv_ncu.pair(launched, kernels)
    assert [case["label"] for case in cases] == ["w1", "w2"]
    assert cases[0]["kernels"][0]["summary"] == {
        "us": 70.0, "quantized_gb_per_s": 314.3, "dram_read_gb_per_s": 300.0, "dram_pct_of_peak": None,
        "issue_active_pct": 25.0, "occupancy_pct": 40.0, "registers": 64.0,
        "stalls": {"long_scoreboard": 9.5, "barrier": 3.25, "short_scoreboard": 2.0, "wait": 1.0},
    }  # fmt: skip
    assert cases[1]["kernels"][0]["summary"]["quantized_gb_per_s"] == 200.0  # 7 MB in 35 us
    gemv_ncu.print_table(cases)
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split() == ["w1", "_gemv_packed_kernel", "70.0", "314.3", "-", "25.0", "40.0", "64.0",
                                 "long_scoreboard", "9.5,", "barrier", "3.25,", "short_scoreboard", "2.0,", "wait",
                                 "1.0"]  # fmt: skip


def test_split_ks_sum_is_paired_without_the_matrixs_bytes():
    kernels = gemv_ncu.read_report(Path("unused"), Report([gemv_action(), gemv_action("_sum_splits_kernel")]))
    case = {"label": "w2", "kernels": ["_gemv_packed_kernel", "_sum_splits_kernel"], "quantized_bytes": 7_000_000}
    (paired,) = gemv_ncu.pair([case], kernels)
    assert [kernel["summary"]["quantized_gb_per_s"] for kernel in paired["kernels"]] == [100.0, None]


def test_kernels_other_than_the_cases_are_refused_in_one_line():
    kernels = gemv_ncu.read_report(Path("unused"), Report([gemv_action("_gemv_kernel")]))
    with pytest.raises(MoEOffloadError) as refused:
        gemv_ncu.pair([{"label": "w1", "kernels": ["_gemv_packed_kernel"], "quantized_bytes": 1}], kernels)
    assert str(refused.value) == "ncu profiled ['_gemv_kernel'], not the cases' kernels ['_gemv_packed_kernel']"


def test_no_ncu_is_one_line_and_exit_code_2(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "gemv_ncu.py"
    missing = tmp_path / "ncu"
    done = subprocess.run([sys.executable, str(script), "--ncu", str(missing), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stderr.strip(), done.stdout) == (
        2, f"error: --ncu {missing} is not a file; give the path of Nsight Compute's ncu", "")  # fmt: skip
    assert not (tmp_path / "r.json").exists()


def test_no_ncu_anywhere_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(gemv_ncu.shutil, "which", lambda name: None)
    monkeypatch.setattr(gemv_ncu, "NCU_HOME", tmp_path)  # no install there
    with pytest.raises(MoEOffloadError) as refused:
        gemv_ncu.find_ncu(None)
    assert str(refused.value) == (f"no ncu on the PATH or under {tmp_path}: install Nsight Compute, or give its path "
                                  "with --ncu")  # fmt: skip


FAKE_NCU = """#!/usr/bin/env bash
# ncu as gemv_ncu.py calls it: --version; a profile (--export REPORT ... --launch FILE), whose inner run this stands
# in for by writing FILE; --import REPORT --page details --csv
if [[ $1 == --version ]]; then echo "NVIDIA (R) Nsight Compute"; echo "Version 2025.3.1.0"; exit; fi
if [[ $1 == --import ]]; then echo '"ID","Kernel Name","Metric Name","Metric Value"'; exit; fi
echo "$*" >"$(dirname "$0")/profiled"  # what the inner run was asked
while [[ $# -gt 0 ]]; do case $1 in --export) report=$2;; --launch) launched=$2;; esac; shift; done
touch "$report.ncu-rep"
echo '[{"label": "w1", "kernels": ["_gemv_packed_kernel"], "quantized_bytes": 22000000}]' >"$launched"
"""


def run_main(tmp_path, monkeypatch, *, interface: bool, options=()):
    """gemv_ncu's main with a stand-in ncu (and, with `interface`, an ncu_report beside it that reads back
    gemv_action): its exit message, if any, and the JSON it wrote."""
    ncu = tmp_path / "nsight" / "ncu"
    ncu.parent.mkdir()
    ncu.write_text(FAKE_NCU)
    ncu.chmod(0o755)
    if interface:
        extras = ncu.parent / "extras" / "python"
        extras.mkdir(parents=True)
        interface = "from tests.test_gemv_ncu import Report, gemv_action\n\n\ndef load_report(path):\n"
        (extras / "ncu_report.py").write_text(interface + "    return Report([gemv_action()])\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # report_module adds the interface's folder
    monkeypatch.delitem(sys.modules, "ncu_report", raising=False)
    monkeypatch.setattr(gemv_ncu, "NCU_HOME", tmp_path / "none")
    monkeypatch.setattr(gemv_ncu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gemv_ncu, "environment", lambda device, program: {"device": "cuda: stand-in"})
    out = tmp_path / "ncu.json"
    monkeypatch.setattr(sys, "argv", ["benchmarks/gemv_ncu.py", "--ncu", str(ncu), "--out", str(out), *options])
    try:
        gemv_ncu.main()
        message = None
    except SystemExit as exit:
        message = str(exit.code)
    monkeypatch.delitem(sys.modules, "ncu_report", raising=False)
    return message, json.loads(out.read_text())


def test_main_reads_the_report_into_the_json(tmp_path, monkeypatch, capsys):
    message, record = run_main(
        tmp_path, monkeypatch, interface=True, options=["--case", "w2 2-bit", "--case", "w1 2-bit"]
    )
    assert (tmp_path / "nsight" / "profiled").read_text().endswith("--case=w2 2-bit --case=w1 2-bit\n")
    assert message is None
    assert record["ncu"] == "Version 2025.3.1.0"
    assert record["ncu_command"].endswith("--clock-control none --profile-from-start off --set full "
                                          f"--target-processes all --export {record['ncu_command'].split()[-2]} "
                                          "--force-overwrite")  # fmt: skip
    (case,) = record["cases"]
    assert case["kernels"][0]["summary"]["quantized_gb_per_s"] == 314.3  # 22 MB in the stand-in's 70 us
    assert "unread" not in record
    assert "w1                    _gemv_packed_kernel       70.0   314.3" in capsys.readouterr().out


def test_a_report_it_cannot_read_keeps_ncus_csv_and_exits_with_an_error(tmp_path, monkeypatch):
    message, record = run_main(tmp_path, monkeypatch, interface=False)
    why = f"no ncu_report.py (Nsight Compute's Python interface) in {tmp_path / 'nsight' / 'extras' / 'python'}"
    assert message == f"error: wrote {tmp_path / 'ncu.json'} with ncu's CSV only: {why}"
    assert record["unread"] == why
    assert record["details_csv"] == '"ID","Kernel Name","Metric Name","Metric Value"\n'
    assert record["cases"] == [{"label": "w1", "kernels": ["_gemv_packed_kernel"], "quantized_bytes": 22000000}]


def test_case_picks_cases_in_their_order_and_refuses_another_label():
    assert [case.label for case in gemv_ncu.chosen_cases(["q_proj 4-bit", "w1 2-bit"])] == ["w1 2-bit", "q_proj 4-bit"]
    assert gemv_ncu.chosen_cases(None) == gemv_ncu.CASES
    with pytest.raises(MoEOffloadError) as refused:
        gemv_ncu.chosen_cases(["w1 2-bit", "w3"])
    labels = "'w1 2-bit', 'w2 2-bit', 'w1+w3 2-bit gated', 'w1 2-bit, one stage', 'q_proj 4-bit'"
    assert str(refused.value) == f"--case 'w3' is not a case; choose among {labels}"
