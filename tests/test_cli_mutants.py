"""Edges of the command line that the other tests leave open: table cells, JSON keys, defaults, messages and
their streams, in cli/app.py and cli/lab.py (found by mutation testing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import offload
from tests.test_cli import assert_one_line_error, files_under, run

REPO = Path(__file__).resolve().parents[1]
TINY_TRACE = REPO / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl"  # 6 layers, 8 experts, top-2


def rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in `text` (box-drawn or not), as lists of stripped cells."""
    found = []
    for line in text.splitlines():
        if "│" in line:
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
        else:
            cells = line.split()
        if cells:
            found.append(cells)
    return found


# ---------------------------------------------------------------------------------------------------
# cli/app.py: generate, chat, info


def test_stats_table_cells_are_each_layers_own_counters(capsys, trained_model_dir):
    """generate --stats: each layer's row shows its hits, misses, prefetches used/issued and MiB copied,
    as --json reports them for the same greedy run; with --json the figures are in the JSON alone."""
    common = ["generate", trained_model_dir, "--prompt", "def f(x):", "--slots", "2", "--max-new-tokens", "4",
              "--temperature", "0", "--device", "cpu", "--stats"]  # fmt: skip
    code, out, err = run(capsys, *common, "--json")
    assert code == 0 and err == ""  # the figures are in the JSON: no table on stderr
    per_layer = json.loads(out)["stats"]["per_layer"]
    code, _, err = run(capsys, *common)
    assert code == 0
    table = [cells for cells in rows(err) if len(cells) == 8 and cells[0].isdigit()]
    expected = [
        [str(layer), str(s["requests"]), str(s["hits"]), str(s["misses"]), f"{s['hit_rate']:.3f}",
         f"{s['prefetches_used']}/{s['prefetches_issued']}", "-" if s["recall"] is None else f"{s['recall']:.3f}",
         f"{s['h2d_bytes'] / 2**20:.1f}"]
        for layer, s in enumerate(per_layer)
    ]  # fmt: skip
    assert table == expected
    assert any(s["hits"] != s["misses"] for s in per_layer)  # the columns can be told apart
    assert any(s["prefetches_used"] != s["prefetches_issued"] for s in per_layer)


def test_chat_reset_keeps_the_system_prompt_and_zeroes_the_figures(capsys, monkeypatch, trained_model_dir):
    """/reset starts the conversation over from the system prompt, with the figures at zero; /quit leaves
    as /exit does, and nothing typed after it is sent."""
    from offload.api import OffloadedModel

    asked, real = [], OffloadedModel.generate

    def generate(self, *args, messages, **kwargs):
        asked.append([(m["role"], m["content"]) for m in messages])
        return real(self, *args, messages=messages, **kwargs)

    monkeypatch.setattr(OffloadedModel, "generate", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("def f(x):\n/reset\n/stats\nimport os\n/quit\nnever sent\n"))
    code, _, err = run(capsys, "chat", trained_model_dir, "--system", "Be terse.", "--slots", "2",
                       "--max-new-tokens", "2", "--temperature", "0", "--device", "cpu")  # fmt: skip
    assert code == 0
    system = ("system", "Be terse.")
    assert asked == [[system, ("user", "def f(x):")], [system, ("user", "import os")]]
    lines = err.splitlines()
    after = lines[lines.index("(conversation and figures reset)") + 1]
    assert after.startswith("prefill 0 tok at ") and " · decode 0 tok at " in after and " · hit rate 0.000 · " in after
    assert "unknown command" not in err


def test_chat_drops_a_turn_the_model_refused(capsys, monkeypatch, trained_model_dir):
    """A turn refused with an error (e.g. past the context) is said in one line and left out of the
    conversation: the next turn is sent without it."""
    from offload.api import OffloadedModel
    from offload.generate import GenerationResult
    from quant.errors import MoEOffloadError

    asked = []

    def generate(self, *args, messages, on_text=None, **kwargs):
        asked.append([m["content"] for m in messages])
        if messages[-1]["content"] == "too long":
            raise MoEOffloadError("the conversation is too long")
        return GenerationResult([5], "ok", 1, 1, 0.1, 0.1, "length")

    monkeypatch.setattr(OffloadedModel, "generate", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("too long\nhi\n/exit\n"))
    code, _, err = run(capsys, "chat", trained_model_dir, "--max-new-tokens", "1", "--device", "cpu")
    assert code == 0 and "error: the conversation is too long" in err.splitlines()
    assert asked == [["too long"], ["hi"]]


# ---------------------------------------------------------------------------------------------------
# cli/app.py: trace


def test_trace_prompts_files_that_hold_no_prompt_or_are_missing(capsys, tmp_path):
    """A prompts file of blank lines, or none at all, is one line before the load, and nothing is written."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    out = tmp_path / "t.jsonl"
    code, _, err = run(capsys, "trace", "no-such-model", "--prompts", blank, "--out", out)
    assert_one_line_error(code, err, f"{blank} holds no prompt; write one prompt per line")
    missing = tmp_path / "missing.txt"
    code, _, err = run(capsys, "trace", "no-such-model", "--prompts", missing, "--out", out)
    assert_one_line_error(code, err, f"no such prompts file: {str(missing)!r}")
    assert files_under(tmp_path) == ["blank.txt"]


def test_trace_says_what_it_wrote_and_defaults_to_64_greedy_tokens(capsys, tmp_path, trained_model_dir):
    """The last line counts the sequences (plural from two) and the decode tokens, with the run's hit rate;
    without --max-new-tokens and --temperature the file is the Python API's greedy 64-token trace."""
    prompts = tmp_path / "prompts.txt"
    texts = ["def f(x):", "import os"]
    prompts.write_text("\n".join(texts) + "\n")
    out = tmp_path / "cli.jsonl"
    code, _, err = run(capsys, "trace", trained_model_dir, "--prompts", prompts, "--out", out, "--slots", "2",
                       "--device", "cpu")  # fmt: skip
    assert code == 0
    model = offload.load(str(trained_model_dir), device="cpu", slots=2)
    model.trace(texts, tmp_path / "api.jsonl", max_new_tokens=64, temperature=0.0)
    assert out.read_bytes() == (tmp_path / "api.jsonl").read_bytes()
    stats = model.stats
    assert err.splitlines()[-1] == (f"wrote {out}: 2 sequences, {stats.decode_tokens} decode tokens, hit rate "
                                    f"{stats.total.hit_rate:.3f} with 2 slots per layer")  # fmt: skip
    code, _, err = run(capsys, "trace", trained_model_dir, "--prompt", "x = 1", "--out", tmp_path / "one.jsonl",
                       "--slots", "3", "--max-new-tokens", "2", "--device", "cpu")  # fmt: skip
    assert code == 0 and err.splitlines()[-1].startswith(f"wrote {tmp_path / 'one.jsonl'}: 1 sequence, 1 decode ")


# ---------------------------------------------------------------------------------------------------
# cli/app.py: bench


def test_bench_table_matches_its_json_and_says_what_it_wrote(capsys, tmp_path, trained_model_dir):
    """The measured row's cells are the JSON's figures, each in its own column, and the last line on stderr
    names the JSON file written."""
    out = tmp_path / "bench.json"
    code, printed, err = run(capsys, "bench", trained_model_dir, "--slots", "2", "--device", "cpu", "--tokens", "4",
                             "--prompt-tokens", "3", "--json", out)  # fmt: skip
    assert code == 0 and err.splitlines()[-1] == f"wrote {out}"
    result = json.loads(out.read_text())
    measured = next(cells for cells in rows(printed) if cells[0] == "measured")
    speeds = [float(cell) for cell in measured[1:4]]
    wanted = [result["decode_tokens_per_s"], result["bound_tokens_per_s"], result["fraction_of_bound"]]
    assert speeds == pytest.approx(wanted, abs=0.006)
    assert measured[4:] == [f"{result['hit_rate']:.3f}", f"{result['prefetch']['recall']:.3f}",
                            f"{result['h2d_bytes_per_token'] / 2**20:.1f}", f"{result['stall_s']:.3f}"]  # fmt: skip


def test_bench_takes_no_verify(capsys):
    """bench offers --verify/--no-verify as the other loading commands do (checked here before any load)."""
    code, _, err = run(capsys, "bench", "no-such-model", "--no-verify", "--prompt-tokens", "0")
    assert_one_line_error(code, err, "--prompt-tokens must be at least 1, got 0")


# ---------------------------------------------------------------------------------------------------
# cli/lab.py: simulate


def simulate_json(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "simulate", TINY_TRACE, *args, "--json")
    assert code == 0 and err == "", err
    return json.loads(out)


def test_simulate_defaults_every_policy_and_slots_up_to_the_experts(capsys):
    """No --policy: every online policy plus belady; --slots 8 on a trace of 8 experts is allowed (the
    default 1-8 reaches it)."""
    rows_ = simulate_json(capsys, "--slots", "8")["results"]
    assert [(r["policy"], r["slots"]) for r in rows_] == [(p, 8) for p in ("lru", "fifo", "lfu", "path", "belady")]
    rows_ = simulate_json(capsys, "--policy", "lru")["results"]
    assert [r["slots"] for r in rows_] == list(range(1, 9))


def test_simulate_refuses_a_policy_list_that_names_none(capsys):
    code, _, err = run(capsys, "simulate", TINY_TRACE, "--policy", " , ")
    assert_one_line_error(code, err, "--policy ' , ' names no policy; choose from lru, fifo, lfu, path, belady")


def test_simulate_tables_show_each_layer_and_the_prefetch_counters(capsys, tmp_path):
    """--per-layer rows are each layer's own hit rate, and --prefetch adds a table of issued, used and
    wasted guesses per policy and slots, as the JSON gives them; --plot says what it wrote last."""
    args = ["--policy", "lru", "--slots", "2,3", "--prefetch", "recorded", "--per-layer"]
    expected = simulate_json(capsys, *args)["results"]
    plot = tmp_path / "rates.png"
    code, out, _ = run(capsys, "simulate", TINY_TRACE, *args, "--plot", plot)
    assert code == 0 and out.splitlines()[-1] == f"wrote {plot}"
    table = rows(out)
    for layer in range(6):
        assert ["layer", str(layer), *(f"{r['per_layer'][layer]['hit_rate']:.4f}" for r in expected)] in table
    prefetch = [cells for cells in table if cells[0] == "lru" and len(cells) == 7]
    assert prefetch == [["lru", str(r["slots"]), f"{r['hit_rate']:.4f}", f"{r['recall']:.4f}",
                         str(r["prefetches_issued"]), str(r["prefetches_used"]), str(r["prefetches_wasted"])]
                        for r in expected]  # fmt: skip


@pytest.mark.parametrize("name, magic", [("rates", b"\x89PNG"), ("RATES.PDF", b"%PDF")])
def test_simulate_plot_format_without_or_with_an_upper_case_suffix(capsys, tmp_path, name, magic):
    """No suffix writes a PNG; a suffix in capitals is the format's all the same."""
    plot = tmp_path / name
    code, _, err = run(capsys, "simulate", TINY_TRACE, "--policy", "lru", "--slots", "2", "--plot", plot)
    assert code == 0 and err == "" and plot.read_bytes().startswith(magic)


# ---------------------------------------------------------------------------------------------------
# cli/lab.py: timeline


def timeline_json(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "timeline", TINY_TRACE, *args, "--json")
    assert code == 0 and err == "", err
    return json.loads(out)


def test_timeline_defaults_and_the_options_it_passes_on(capsys):
    """Defaults: lru at 5 slots for 128 tokens; --cache-mode, --back-bandwidth and --wake-us 0 reach the
    replay and its costs."""
    printed = timeline_json(capsys)
    assert [(r["policy"], r["slots"], r["tokens"], r["mode"]) for r in printed["results"]] == [
        ("lru", 5, 128, "inclusive")
    ]
    printed = timeline_json(capsys, "--slots", "3", "--tokens", "8", "--cache-mode", "exclusive", "--bandwidth",
                            "50", "--back-bandwidth", "25", "--expert-bytes", "1000000", "--wake-us", "0")  # fmt: skip
    assert printed["results"][0]["mode"] == "exclusive"
    assert (printed["costs"]["copy_s"], printed["costs"]["back_s"], printed["costs"]["wake_s"]) == (2e-5, 4e-5, 0.0)


def test_timeline_table_matches_its_json(capsys, monkeypatch):
    """Each cell of the table is the JSON's figure in its column: the speed-up is over no cache's tok/s, the
    link's share is of the decode's time, and the caption gives no cache's own bound."""
    monkeypatch.setenv("COLUMNS", "200")
    args = ["--policy", "lru,path", "--slots", "3", "--tokens", "16"]
    printed = timeline_json(capsys, *args)
    code, out, _ = run(capsys, "timeline", TINY_TRACE, *args)
    assert code == 0
    table = [cells for cells in rows(out) if cells[0] in ("lru", "path")]
    no_cache = printed["no_cache"]
    assert len(table) == 2
    for cells, r in zip(table, printed["results"], strict=True):
        assert cells[:2] == [r["policy"], str(r["slots"])]
        assert [float(cell) for cell in cells[2:]] == pytest.approx(
            [r["decode_tokens_per_s"], r["bound_tokens_per_s"], r["fraction_of_bound"],
             r["decode_tokens_per_s"] / no_cache["decode_tokens_per_s"], r["hit_rate"], r["stall_s"],
             r["link_busy"]], abs=0.006)  # fmt: skip
        assert len(cells[4]) == len("0.000")  # of bound: three decimals
    caption = f"no cache: {no_cache['decode_tokens_per_s']:.2f} tok/s (bound {no_cache['bound_tokens_per_s']:.2f})"
    assert caption in out


# ---------------------------------------------------------------------------------------------------
# cli/app.py: synth and quantize


def test_synth_passes_its_options_on(capsys, tmp_path):
    """--layers and --seed reach the writer (the same bytes as synthesize with them), and the experts are
    2-bit by default; the last line names the folder."""
    from offload.synth import synthesize

    out = tmp_path / "cli"
    code, _, err = run(capsys, "synth", out, "--preset", "tiny", "--layers", "3", "--seed", "7")
    assert code == 0 and err.splitlines()[-1] == f"wrote {out}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["num_layers"] == 3 and manifest["expert_format"]["spec"]["bits"] == 2
    api = synthesize(tmp_path / "api", "tiny", expert_bits="2", layers=3, seed=7)
    for name in ("experts-000.safetensors", "resident.safetensors"):
        assert (out / name).read_bytes() == (api / name).read_bytes(), name


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory) -> Path:
    from offload.convert import quantize_model
    from tests.tiny import make_tiny_mixtral

    source = make_tiny_mixtral(tmp_path_factory.mktemp("src"), intermediate=128, layers=2, experts=4, seed=5)
    return quantize_model(str(source), tmp_path_factory.mktemp("q") / "model", expert_bits="4", attn_bits="4")


def test_quantize_force_overwrites_a_quantized_folder(capsys, quantized_model, tmp_path):
    """--force is passed on: an OUT that holds another quantized checkpoint is written over, where it is
    refused without."""
    import shutil

    from tests.tiny import make_tiny_mixtral

    src = make_tiny_mixtral(tmp_path / "src", intermediate=128, layers=2, experts=4, seed=6)
    out = tmp_path / "out"
    shutil.copytree(quantized_model, out)
    code, _, err = run(capsys, "quantize", src, out, "--expert-bits", "4", "--device", "cpu")
    assert code == 2 and err.startswith(f"error: {out} ") and "--force" in err
    code, _, err = run(capsys, "quantize", src, out, "--force", "--expert-bits", "4", "--device", "cpu")
    assert code == 0 and err.splitlines()[-1] == f"wrote {out}"
    assert json.loads((out / "manifest.json").read_text())["source"]["model"] == str(src.resolve())
