"""Every benchmark script imports: most of them run only on a GPU, where a stale import would cost a
session's scarce minutes (tests/test_bench.py and others run the CPU ones' functions)."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
