"""Every benchmark script imports: most of them run only on a GPU, where a stale import would cost a
session's scarce minutes (tests/test_bench.py and others run the CPU ones' functions)."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = sorted(p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_has_a_main(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"


def test_every_result_names_its_device_commit_and_command():
    """The project's rule for a figure; and a commit git knows, where the history is here (one result named a
    39-digit hash, a digit lost when it was written by hand)."""
    repo = Path(__file__).parents[1]
    results = sorted((repo / "benchmarks" / "results").rglob("*.json"))
    assert results
    commits = set()
    for path in results:
        data = json.loads(path.read_text())
        assert {"device", "commit", "command"} <= set(data), path
        assert re.fullmatch(r"[0-9a-f]{7,40}", data["commit"]), (path, data["commit"])
        commits.add(data["commit"])
    git = ["git", "-C", str(repo)]
    shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True).stdout
    if shallow.strip() == "false":  # the whole history is here (not a tarball, not a shallow clone)
        known = subprocess.run([*git, "cat-file", "--batch-check"], input="\n".join(commits),
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "missing" not in known, known


def test_a_scripts_user_error_is_one_line_before_the_work(tmp_path):
    """As the CLI's: exit code 2 and one line, where a missing trace was a traceback and an unwritable --out
    was found after the whole run."""
    repo = Path(__file__).parents[1]
    script = [sys.executable, str(repo / "benchmarks" / "bench_simulate.py")]
    for args, message in [
        (["--trace", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r.json")],
         f"error: trace {tmp_path / 'none.jsonl'} does not exist: give the path of a .jsonl routing trace"),
        (["--out", str(tmp_path)], f"error: --out {tmp_path} is a folder; give a file name"),
    ]:  # fmt: skip
        done = subprocess.run([*script, *args], capture_output=True, text=True)
        assert (done.returncode, done.stderr.strip(), done.stdout) == (2, message, "")


def test_meta_order_takes_turns_in_one_model_and_refuses_a_model_without_it(tmp_path):
    """benchmarks/meta_order.py repacks the arena in place each round; a model whose experts keep grid order on the
    CPU (hidden 64: no output is a whole meta group) is refused in one line."""
    from tests.tiny import make_tiny_mixtral

    script = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "meta_order.py")]
    wide = make_tiny_mixtral(tmp_path / "wide", hidden=2048, intermediate=64, layers=1, experts=4, seed=3)
    out = tmp_path / "order.json"
    args = ["--expert-bits", "2", "--tokens", "2", "--prompt-tokens", "2", "--rounds", "2", "--out", str(out)]
    done = subprocess.run([*script, str(wide), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(run["round"], run["order"]) for run in runs] == [(1, "grid"), (1, "output"), (2, "grid"), (2, "output")]
    narrow = make_tiny_mixtral(tmp_path / "narrow", hidden=64, intermediate=128, layers=1, experts=4, seed=3)
    done = subprocess.run([*script, str(narrow), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {narrow}: no expert has scales and zeros by output")


def test_meta_repack_times_each_order_and_says_which_the_kernel_reads(tmp_path):
    """benchmarks/meta_repack.py at hidden 2048: w1 is held by output and by packed row (not by 3-bit, whose experts
    keep grid order in every order), the Triton kernel reads grid order and rows, not the CPU's order; --rounds 0 is
    refused in one line."""
    script = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "meta_repack.py")]
    out = tmp_path / "repack.json"
    for bits, held, reads in (("2", ["grid", "output", "row"], [True, False, True]), ("3", ["grid"] * 3, [True] * 3)):
        args = ["--hidden", "2048", "--intermediate", "256", "--expert-bits", bits, "--rounds", "1", "--out", str(out)]
        done = subprocess.run([*script, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows = json.loads(out.read_text())["results"]
        assert [row["order"] for row in rows] == ["grid", "output", "row"] and [row["held_as"] for row in rows] == held
        assert [row["kernel_reads_it"] for row in rows] == reads and all(row["ms_per_expert"] > 0 for row in rows)
    done = subprocess.run([*script, "--rounds", "0", "--out", str(out)], capture_output=True, text=True)
    assert (done.returncode, done.stderr.strip()) == (2, "error: --rounds must be at least 1, got 0")


def test_decode_attention_measures_both_ways_alike_and_the_grouped_one_holds_no_repeated_keys():
    """benchmarks/decode_attention.py's rows: the two ways give one attention (to float32's rounding against float64),
    and under the static step's mask the per-head call holds the keys and values repeated for every head in float32
    (256 keys: 32 heads x 256 x 128 x 4 bytes, twice, 8 MiB), the grouped one nothing of that size."""
    from benchmarks.decode_attention import measure

    for masked in (False, True):
        rows = {row["way"]: row for row in measure(torch.device("cpu"), torch.float32, 256, masked, calls=1)}
        assert set(rows) == {"heads", "grouped"}
        assert all(row["max_abs_error"] < 1e-5 for row in rows.values())
        assert rows["grouped"]["peak_bytes"] < 1 << 20
        if masked:
            assert rows["heads"]["peak_bytes"] >= 2 * 32 * 256 * 128 * 4
