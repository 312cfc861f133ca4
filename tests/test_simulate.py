"""The simulator against the shared trace's README, prefetch predictors, prefill, held-out tuning, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cache.policies import PATH_GRID
from cache.simulate import held_out, simulate
from cache.trace import TraceWriter, read_trace
from cli.app import main
from cli.lab import register
from quant.errors import MoEOffloadError

SHARED_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
)

# shared/traces/README.md, C per layer = 2..7
README_LRU = [0.395, 0.512, 0.620, 0.717, 0.813, 0.901]
README_BELADY = [0.395, 0.618, 0.746, 0.833, 0.898, 0.945]


@pytest.fixture(scope="module")
def shared_trace():
    return read_trace(SHARED_TRACE)


def test_reproduces_the_readme_rows(shared_trace):
    for name, row in (("lru", README_LRU), ("belady", README_BELADY)):
        measured = [round(simulate(shared_trace, name, slots).hit_rate, 3) for slots in range(2, 8)]
        assert measured == row, name
    lru4 = simulate(shared_trace, "lru", 4).stats.total()
    assert (lru4.hits, lru4.requests) == (13217, 333 * 32 * 2)


def test_path_beats_the_target_held_out_both_ways(shared_trace):
    rows = held_out(shared_trace, "path", 4, PATH_GRID)
    assert [(r.tuned_on, r.reported_on) for r in rows] == [((1,), 0), ((0,), 1)]
    lru = {p: simulate(shared_trace.select([p]), "lru", 4).hit_rate for p in (0, 1)}
    for row in rows:  # each problem, scored with parameters chosen on the other, beats LRU by 3+ points
        assert row.hit_rate >= lru[row.reported_on] + 0.03, row
    held_out_rate = sum(r.hits for r in rows) / sum(r.requests for r in rows)
    assert held_out_rate >= 0.670  # the whole trace, every token scored held-out (LRU 0.620)


def _write(path: Path, tokens: list[tuple[str, list[list[int]], list]], sequence: int = 0) -> Path:
    """tokens: (phase, experts per layer, guess per layer)."""
    with TraceWriter(path) as writer:
        for token_idx, (phase, layers, guesses) in enumerate(tokens):
            for layer, experts in enumerate(layers):
                weights = [1.0 / len(experts)] * len(experts)
                writer.record(sequence, token_idx, layer, experts, weights, guesses[layer], phase=phase)
    return path


def test_prefill_row_replays_as_one_request(tmp_path):
    # 3 slots. Prefill chunk [0, 1, 2], then a chunk [3, 4, 1]. As one request, 1 is a hit and is
    # protected: 3 evicts 0 (LRU), 4 evicts 2, and 1 hits. As three one-expert requests, [4] would
    # evict 1 (older than 2) and [1] would miss. The decode token [4, 3] then hits both.
    none = [None]
    path = _write(
        tmp_path / "prefill.jsonl",
        [("prefill", [[0, 1, 2]], none), ("prefill", [[3, 4, 1]], none), ("decode", [[4, 3]], none)],
    )
    trace = read_trace(path)
    assert [(t.phase, len(t.layers[0].experts)) for t in trace.tokens] == [
        ("prefill", 3),
        ("prefill", 3),
        ("decode", 2),
    ]
    total = simulate(trace, "lru", 3).stats.total()
    assert (total.requests, total.hits, total.misses) == (8, 3, 5)


def test_a_cached_expert_is_a_hit_even_when_its_request_overflows_the_slots():
    # README rules: an expert already cached is a hit; when a request has more experts than slots,
    # its own experts make room for each other, oldest served first. With 1 slot holding 5, the
    # request [7, 5] serves 5 (hit), then loads 7 over it: 1 hit, 1 miss.
    from cache.policies import make_policy
    from cache.table import SlotTable

    table = SlotTable(1, make_policy("lru"))
    table.request([5])
    table.request([7, 5])
    assert (table.stats.hits, table.stats.misses) == (1, 2)


def test_predictor_recall_and_effect(tmp_path):
    tokens = [  # two layers; the recorded guesses are for layer 1
        ("decode", [[0, 1], [2, 3]], [None, [2, 3]]),
        ("decode", [[0, 1], [2, 4]], [None, [2, 5]]),
        ("decode", [[6, 7], [5, 6]], [None, [5, 6]]),
    ]
    trace = read_trace(_write(tmp_path / "guess.jsonl", tokens))

    # prev-token guesses [2,3] for token 1 (2 right) and [2,4] for token 2 (none right): 1 of 4... plus
    # nothing for token 0. Recall = 1/4; the guessed experts were cached already, so nothing is issued.
    prev = simulate(trace, "lru", 4, prefetch="prev-token").stats.total()
    assert (prev.guess_right, prev.guess_total, prev.prefetches_issued) == (1, 4, 0)

    # cooccur: token 1 has layer 0 = {0,1}, seen with {2,3} at token 0: guesses [2,3] (1 right);
    # token 2's layer 0 {6,7} is new: it falls back to the previous token's [2,4] (0 right).
    cooccur = simulate(trace, "lru", 4, prefetch="cooccur").stats.total()
    assert (cooccur.guess_right, cooccur.guess_total) == (1, 4)

    # recorded: [2,3] (2 right), [2,5] (1 right), [5,6] (2 right): recall 5/6. With 2 slots every
    # guessed expert not cached is loaded before layer 1 asks: 5 loads, 4 used, and 5 (guessed at
    # token 1) wasted, evicted by the miss on 4. Layer 1 hits 5 of 6, against 1 of 6 without.
    recorded = simulate(trace, "lru", 2, prefetch="recorded")
    total = recorded.stats.total()
    assert (total.guess_right, total.guess_total) == (5, 6)
    assert total.recall == pytest.approx(5 / 6)
    layer1 = recorded.stats.per_layer[1]
    assert (layer1.prefetches_issued, layer1.prefetches_used, layer1.prefetches_wasted) == (5, 4, 1)
    assert (layer1.hits, layer1.misses) == (5, 1)
    without = simulate(trace, "lru", 2).stats.per_layer[1]
    assert (without.hits, without.misses) == (1, 5)


def test_recorded_needs_guesses(shared_trace, tmp_path):
    from quant.errors import MoEOffloadError

    with pytest.raises(MoEOffloadError, match="has no recorded guesses .*pick --prefetch prev-token or cooccur"):
        simulate(shared_trace, "lru", 4, prefetch="recorded")
    # recorded by the runtime with prefetch off: a 'guess' field in every row, null in each
    path = _write(tmp_path / "nulls.jsonl", [("decode", [[0, 1], [2, 3]], [None, None])])
    with pytest.raises(MoEOffloadError) as error:
        simulate(read_trace(path), "lru", 4, prefetch="recorded")
    assert str(error.value) == (
        f"trace {path}'s guesses are all null: it was recorded without prefetching; record it again with prefetching "
        "on (`moe-offload trace --prefetch late`, the default, or early or both; on the CPU add --slots), or pick "
        "--prefetch prev-token or cooccur"
    )


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # a callback keeps `simulate` a named subcommand, as in the real app
        pass

    return app


def test_cli_json_shape():
    result = CliRunner().invoke(
        _app(), ["simulate", str(SHARED_TRACE), "--policy", "lru,belady", "--slots", "3-4", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert list(payload) == ["num_layers", "sequences", "skipped_tokens", "results"]
    assert (payload["num_layers"], payload["sequences"], payload["skipped_tokens"]) == (32, 2, 5)
    rows = payload["results"]
    assert [(r["policy"], r["slots"]) for r in rows] == [("lru", 3), ("lru", 4), ("belady", 3), ("belady", 4)]
    assert rows[1]["hit_rate"] == 0.620167 and rows[1]["hits"] == 13217 and rows[1]["requests"] == 21312
    assert rows[1]["misses"] == 21312 - 13217 and rows[1]["recall"] is None
    assert round(rows[3]["hit_rate"], 3) == 0.746


def test_cli_per_layer_json_and_errors():
    runner = CliRunner()
    args = ["simulate", str(SHARED_TRACE), "--policy", "fifo", "--slots", "2", "--per-layer", "--json"]
    rows = json.loads(runner.invoke(_app(), args).stdout)["results"]
    assert len(rows[0]["per_layer"]) == 32 and sum(layer["hits"] for layer in rows[0]["per_layer"]) == rows[0]["hits"]

    bad = runner.invoke(_app(), ["simulate", str(SHARED_TRACE), "--policy", "mru"])
    assert (
        bad.exit_code == 2
        and bad.output == "error: --policy 'mru': 'mru' is unknown; choose from lru, fifo, lfu, path, belady\n"
    )
    bad = runner.invoke(_app(), ["simulate", str(SHARED_TRACE), "--policy", "lru,mru,lifo"])
    assert (
        bad.output
        == "error: --policy 'lru,mru,lifo': 'mru', 'lifo' are unknown; choose from lru, fifo, lfu, path, belady\n"
    )
    bad = runner.invoke(_app(), ["simulate", str(SHARED_TRACE), "--slots", "0-2"])
    assert bad.exit_code == 2 and bad.output == (
        "error: --slots '0-2' must name slot counts from 1 to 4096: write e.g. 1-8\n"
    )  # fmt: skip
    bad = runner.invoke(_app(), ["timeline", str(SHARED_TRACE), "--slots", "1-100000000000"])  # not built first
    assert bad.exit_code == 2 and "--slots '1-100000000000' must name slot counts from 1 to 4096" in bad.output
    bad = runner.invoke(_app(), ["simulate", str(SHARED_TRACE), "--slots", "3-1"])
    assert bad.exit_code == 2 and bad.output == "error: --slots '3-1' names no slot count: write e.g. 1-8\n"
    bad = runner.invoke(_app(), ["simulate", str(SHARED_TRACE), "--slots", "1-20"])
    assert bad.exit_code == 2 and bad.output == (
        "error: --slots '1-20' goes past the trace's 8 experts per layer: write e.g. 1-8\n"
    )  # fmt: skip


def test_cli_header_is_one_line_when_piped(capsys, monkeypatch):
    """Off a terminal rich cut lines at 80 columns: "...: 333 tokens x \n32 layers, ..."."""
    monkeypatch.setenv("COLUMNS", "80")  # rich's width off a terminal, whatever the runner's
    assert main(["simulate", str(SHARED_TRACE), "--policy", "lru", "--slots", "2"]) == 0
    header = f"{SHARED_TRACE}: 333 tokens x 32 layers, 2 sequences, 5 incomplete tokens skipped"
    assert len(header) > 80 and capsys.readouterr().out.splitlines()[0] == header


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # a bad value names the CLI's option, as the CLI's own checks do
        ({"policy": "mru"}, "--policy 'mru' is unknown: choose one of lru, fifo, lfu, path, belady"),
        ({"prefetch": "gate"}, "--prefetch 'gate' is unknown: choose one of none, prev-token, cooccur, recorded"),
        ({"mode": "auto"},
         "--cache-mode 'auto' is unknown here: choose inclusive or exclusive (the mode the traced run used)"),
    ],
)  # fmt: skip
def test_python_errors_name_the_cli_option(shared_trace, kwargs, message):
    with pytest.raises(MoEOffloadError) as error:
        simulate(shared_trace, **{"policy": "lru", "slots": 2, **kwargs})
    assert str(error.value) == message


def test_cli_plot_writes_a_png(tmp_path):
    out = tmp_path / "plots" / "hit_rate.png"  # a folder that does not exist yet, as bench --json allows
    args = ["simulate", str(SHARED_TRACE), "--policy", "lru,fifo", "--slots", "2,4", "--plot", str(out)]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hit_rate.png"]


TINY_TRACE = Path(__file__).resolve().parents[1] / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl"


def test_tiny_model_trace_figures():
    """The committed trace of the trained tiny model (benchmarks/record_tiny_trace.py): README's table."""
    trace = read_trace(TINY_TRACE)
    assert (len(trace.tokens), trace.num_layers, trace.num_experts, trace.skipped_tokens) == (1792, 6, 8, 0)
    rates = {name: round(simulate(trace, name, 4).hit_rate, 4) for name in ("lru", "lfu", "path", "belady")}
    assert rates == {"lru": 0.7366, "lfu": 0.7675, "path": 0.7814, "belady": 0.8232}
    # the guesses recorded from layer l-1's output: the tiny model's README measured recall 0.83
    recorded = simulate(trace, "lru", 4, prefetch="recorded").stats.total()
    assert round(recorded.recall, 4) == 0.8197 and round(recorded.hit_rate, 4) == 0.8942


def test_cli_refuses_a_plot_over_the_trace(tmp_path):
    """`--plot TRACE` wrote a PNG over the trace it had read, and exited 0."""
    trace = _write(tmp_path / "t.jsonl", [("decode", [[0, 1], [2, 3]], [None, None])])
    before = trace.read_bytes()
    (tmp_path / "link.png").symlink_to(trace)
    for plot in (trace, tmp_path / "link.png"):
        result = CliRunner().invoke(_app(), ["simulate", str(trace), "--slots", "2", "--plot", str(plot)])
        assert result.exit_code == 2 and result.output == (
            f"error: --plot {plot} is the trace being read, which it would overwrite; give another file name\n"
        )
    assert trace.read_bytes() == before


def test_cli_checks_options_before_reading_the_trace(tmp_path):
    missing = str(tmp_path / "nope.jsonl")  # never read: each option's error comes first
    result = CliRunner().invoke(_app(), ["simulate", missing, "--cache-mode", "auto"])
    assert result.exit_code == 2 and result.output == (
        "error: --cache-mode 'auto' is unknown here: choose inclusive or exclusive (the mode the traced run used)\n"
    )
    result = CliRunner().invoke(_app(), ["simulate", missing, "--prefetch", "gate"])
    assert result.exit_code == 2 and result.output == (
        "error: --prefetch 'gate' is unknown: choose one of none, prev-token, cooccur, recorded\n"
    )
    result = CliRunner().invoke(_app(), ["simulate", missing, "--slots", "4-"])
    assert result.exit_code == 2 and result.output == (
        "error: --slots '4-' has a range with no end: a range needs both ends, e.g. 1-8\n"
    )
    from matplotlib.backend_bases import FigureCanvasBase

    formats = ", ".join(f".{name}" for name in sorted(FigureCanvasBase.get_supported_filetypes()) if name != "pgf")
    assert ".pdf, " in formats and ".svg, " in formats
    for name in ("x.foo", "x.pgf"):  # pgf: matplotlib writes it only where LaTeX is installed
        plot = tmp_path / name
        result = CliRunner().invoke(_app(), ["simulate", missing, "--plot", str(plot)])
        assert result.exit_code == 2 and result.output == (
            f"error: --plot {plot}: matplotlib cannot write {plot.suffix} files; give a name ending in {formats}\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_plot_format_follows_the_suffix_and_repeats_are_dropped(tmp_path):
    out = tmp_path / "hit_rate.pdf"
    args = ["simulate", str(SHARED_TRACE), "--policy", "lru,fifo,lru", "--slots", "2,4", "--plot", str(out), "--json"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:5] == b"%PDF-"
    rows = json.loads(result.stdout)["results"]
    assert [(r["policy"], r["slots"]) for r in rows] == [("lru", 2), ("lru", 4), ("fifo", 2), ("fifo", 4)]


def test_cli_summary_line_and_per_layer_wasted(tmp_path, monkeypatch):
    tokens = [  # as test_predictor_recall_and_effect, and a last token missing layer 1
        ("decode", [[0, 1], [2, 3]], [None, [2, 3]]),
        ("decode", [[0, 1], [2, 4]], [None, [2, 5]]),
        ("decode", [[6, 7], [5, 6]], [None, [5, 6]]),
        ("decode", [[6, 7]], [None]),
    ]
    _write(tmp_path / "t.jsonl", tokens)
    monkeypatch.chdir(tmp_path)  # the line names the trace as given
    result = CliRunner().invoke(_app(), ["simulate", "t.jsonl", "--policy", "lru", "--slots", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "t.jsonl: 3 tokens x 2 layers, 1 sequence, 1 incomplete token skipped"

    args = ["simulate", "t.jsonl", "--policy", "lru", "--slots", "2", "--prefetch", "recorded", "--per-layer", "--json"]
    payload = json.loads(CliRunner().invoke(_app(), args).stdout)
    assert (payload["num_layers"], payload["sequences"], payload["skipped_tokens"]) == (2, 1, 1)
    row = payload["results"][0]
    layer1 = row["per_layer"][1]
    assert list(layer1) == ["layer", "hit_rate", "hits", "requests", "misses", "prefetches_issued", "prefetches_used",
                            "prefetches_wasted", "recall"]  # fmt: skip
    assert (layer1["prefetches_issued"], layer1["prefetches_used"], layer1["prefetches_wasted"]) == (5, 4, 1)
    assert sum(layer["prefetches_wasted"] for layer in row["per_layer"]) == row["prefetches_wasted"] == 1
