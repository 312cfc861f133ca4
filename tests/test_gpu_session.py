"""benchmarks/gpu_session.sh runs only on a lent GPU, a few scarce minutes a session: a misspelt option
there would cost a call. Every command it runs is parsed here, without running, by the parser the GPU
machine will use (the CLI's click commands, each benchmark script's argparse)."""

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from cli.app import app

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
TEXT = SCRIPT.read_text()


def step_bodies() -> dict[str, str]:
    """Each `case` arm's body by step name, continuation lines joined."""
    body = TEXT[TEXT.index("case $step in") :]
    joined = re.sub(r"\\\n\s*", " ", body)
    arms = re.split(r"^\s{4}([a-z-]+|\*)\)", joined, flags=re.M)[1:]
    return dict(zip(arms[::2], arms[1::2], strict=True))


STEPS = step_bodies()
# the script's bench() and profile(): what each runs before the arguments it is given
BENCH = re.search(r'^bench\(\) \{.*?^\s+moe (.+?) "\$@"$', TEXT, flags=re.M | re.S)[1]
PROFILE = re.search(r'^profile\(\) \{.*?^\s+python3 (benchmarks/.+?) "\$@"$', TEXT, flags=re.M | re.S)[1]


def expand(line: str, values: dict[str, str]) -> list[str]:
    for name, value in values.items():
        line = line.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in line, f"unexpanded variable in: {line}"
    return shlex.split(line)


def commands(body: str, values: dict[str, str]) -> list[tuple[str, list[str]]]:
    """('moe', argv) for each `moe`/`bench`/`python3 -m cli.app` call, (script name, argv) for each
    `python3 benchmarks/X.py`."""
    found = []
    for raw in body.splitlines():
        line = raw.strip().split(" >", 1)[0].split(" 2>&1", 1)[0].split(" ||", 1)[0]
        line = line.split("; ", 1)[-1] if line.startswith("for ") else line
        line = line.removeprefix("if ").removesuffix("; then").removeprefix("attempt ")
        line = re.sub(r"^(timeout (-k \d+ )?|limited )\d+ ", "", line)  # a script run under a time limit
        if line.startswith("bench "):
            found.append(("moe", expand(BENCH + line[len("bench") :], values)))
        elif line.startswith("profile "):
            script, *args = expand(PROFILE + line[len("profile") :], values)
            found.append((Path(script).stem, args))
        elif cli := re.search(r"python3 -m cli\.app ([^>&;}|]+)", raw):  # the console script, under a timeout
            found.append(("moe", expand(cli[1], values)))
        elif moe := re.search(r"(?:^|\s)moe ([^>&;}|]+)", raw):
            found.append(("moe", expand(moe[1], values)))
        elif line.startswith("python3 benchmarks/"):
            script, *args = expand(line[len("python3 ") :], values)
            found.append((Path(script).stem, args))
    return found


@pytest.fixture
def values(tmp_path):
    (tmp_path / "model").mkdir()
    trace = tmp_path / "trace.jsonl"
    trace.write_text("")
    # tuned: "" or "_tuned" (launches installed); the longer name, in case a quoting mistake shows only there
    return {"model": str(tmp_path / "model"), "trace": str(trace), "results": str(tmp_path), "gpu": "h100",
            "tuned": "_tuned"}  # fmt: skip


def parse_cli(argv: list[str]) -> None:
    """Parses and converts every option as `moe-offload ARGV` would, and runs nothing."""
    group = typer.main.get_command(app)
    name, *rest = argv
    command = group.get_command(click.Context(group, info_name="moe-offload"), name)
    assert command is not None, f"no command {name}"
    command.make_context(name, rest)


class Parsed(Exception):
    pass


def parse_script(name: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Runs the script's main() until its argparse has parsed ARGV (a bad option exits 2 there)."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv])
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(f"benchmarks.{name}").main()
    return parsed.value.args[0]


def test_every_step_is_listed_in_the_header_and_the_error():
    listed = [line.split("steps:", 1)[1] for line in TEXT.splitlines() if "steps:" in line]
    assert len(listed) == 2  # the header's and the unknown step's
    names = set(STEPS) - {"*"}
    for text in listed:
        assert set(re.findall(r"[a-z][a-z-]+", text.split(";")[0].split('"')[0])) == names


def loop_values(body: str) -> list[dict[str, str]]:
    """A step's loop variable at each of its values (`for place in a b; do`), or no variable."""
    loop = re.search(r"for (\w+) in ([^;]+); do", body)
    return [{loop[1]: value} for value in loop[2].split()] if loop else [{}]


def step_commands(step: str, values: dict[str, str]) -> list[tuple[str, list[str]]]:
    body = STEPS[step]
    return [found for loop in loop_values(body) for found in commands(body, {**values, **loop})]


def step_outputs(step: str) -> set[str]:
    """The files the step writes under $results, by name."""
    body = STEPS[step]
    names = set()
    for loop in loop_values(body):
        text = body
        for name, value in {**loop, "gpu": "h100", "tuned": "_tuned"}.items():
            text = text.replace("${" + name + "}", value).replace("$" + name, value)
        names |= set(re.findall(r'"\$results/([^"]+)"', text))
    return names


@pytest.mark.parametrize("step", sorted(set(STEPS) - {"*"}))
def test_every_command_of_the_step_parses(step, values, monkeypatch):
    found = step_commands(step, values)
    assert found or step == "tests", f"no command found in step {step}"  # tests runs pytest
    for kind, argv in found:
        if kind == "moe":
            parse_cli(argv)
        else:
            parse_script(kind, argv, monkeypatch)


def test_a_failed_run_does_not_stop_the_call():
    """Under `set -e`, a bench or script run that fails must not end the call and the steps after it: each
    goes through `attempt` (or, for copy-engine, an `if`)."""
    bare = [line.strip() for step, body in STEPS.items() for line in body.splitlines()
            if line.strip().startswith(("bench ", "python3 benchmarks/", "moe bench"))]  # fmt: skip
    assert bare == []


def test_a_misspelt_option_fails_to_parse(values, monkeypatch):
    """The check above can fail, for the CLI and for a script."""
    with pytest.raises(Exception, match="--gpu-memroy"):
        parse_cli(["bench", values["model"], "--gpu-memroy", "12GiB"])
    with pytest.raises(SystemExit):
        parse_script("gemv_kernel", ["--varients"], monkeypatch)


def test_each_planned_call_brings_back_at_most_8_files():
    """A call returns at most 8 files from $OUT: each call the README plans, its log included."""
    readme = (SCRIPT.parents[1] / "README.md").read_text()
    calls = re.findall(r"`(synth-start [a-z -]+)`", readme)
    assert len(calls) >= 3, calls
    for call in calls:
        outputs = {"gpu_session.log"}.union(*(step_outputs(step) for step in call.split()))
        assert len(outputs) <= 8, (call, sorted(outputs))


LONG_STEPS = ("tests", "kernel", "kernel-sweep", "ncu", "tune", "tune-rows")  # minutes, and their files come at the end


def test_a_long_step_ends_within_the_call():
    """The run tool kills a call at 600 s, before the EXIT trap: a step that may run for minutes is held to what is
    left of the call (`limited`), so that what it wrote still comes back."""
    for step in LONG_STEPS:
        runs = [line.strip().removeprefix("attempt ") for line in STEPS[step].splitlines()
                if re.search(r"\bpython3 (-m|benchmarks/)", line) and "-c" not in line.split()]  # fmt: skip
        assert runs and all(run.startswith("limited ") for run in runs), (step, runs)


def limited(call_seconds: int, command: str) -> subprocess.CompletedProcess:
    """The script's `limited` function, run with the call's seconds set to `call_seconds`."""
    function = re.search(r"^limited\(\) \{.*?^\}$", TEXT, flags=re.M | re.S)[0]
    script = f"set -euo pipefail\nCALL_SECONDS={call_seconds}\n{function}\n{command}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_limited_cuts_a_run_at_its_limit_or_at_the_calls_end():
    run = limited(570, "limited 1 sleep 30 || echo cut $?")  # its own limit
    assert run.stdout.strip() == "cut 124"
    run = limited(15, "limited 240 sleep 30 || echo cut $?")  # too little of the call left to start it
    assert run.stdout.splitlines() == ["== no time left in the call for: sleep 30", "cut 124"]
    run = limited(570, "limited 240 echo ran")
    assert run.stdout.strip() == "ran"
