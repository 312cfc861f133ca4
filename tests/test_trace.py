"""Reading the shared trace format exactly as it is, and writing it (with guess and phase) atomically."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from cache.simulate import simulate
from cache.trace import TraceWriter, read_trace
from quant.errors import MoEOffloadError

SHARED_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
)


def _row(problem_id: int, token_idx: int, layer: int, experts: list[int], **extra) -> str:
    weights = [round(1.0 / len(experts), 4)] * len(experts)
    row = {"dataset": "t", "problem_id": problem_id, "layer": layer, "experts": experts, "gating_probs": weights}
    return json.dumps({**row, "token_idx": token_idx, **extra})


def test_shared_trace_tokens_and_skipped_count():
    trace = read_trace(SHARED_TRACE)
    # 10,779 rows: 333 tokens have all 32 layers; 5 tokens (31, 31, 25, 24 and 12 layers) are skipped
    assert trace.skipped_tokens == 5
    assert len(trace.tokens) == 333
    assert (trace.num_layers, trace.num_experts) == (32, 8)
    assert trace.sequence_ids == [0, 1]
    assert [len(run) for run in trace.sequences()] == [81, 252]
    first = trace.tokens[0]
    assert (first.sequence, first.token_idx, first.phase) == (0, 0, "decode")
    assert first.layers[0].experts == (6, 5) and first.layers[0].guess is None
    assert first.layers[0].weights[0] == pytest.approx(0.6959583759307861)
    assert trace.has_guesses is False


def test_malformed_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [_row(0, 0, 0, [1, 2]), _row(0, 0, 1, [3, 4])]
    cases = {
        '{"problem_id": 0, "layer": ': "line 3: not valid JSON",
        _row(0, 1, 0, [1, 2]).replace('"experts"', '"expert"'): "line 3: field 'experts' is missing or not a list",
        _row(0, 1, 0, [1, 2]).replace(
            '"layer": 0', '"layer": "0"'
        ): "line 3: field 'layer' is missing or not an integer",
        json.dumps({"problem_id": 0, "layer": 0, "token_idx": 1, "experts": [1, 2], "gating_probs": [1.0]}): (
            "line 3: 'gating_probs' must hold one number per expert, got [1.0]"
        ),
        _row(0, 1, 0, [2, 2]): "line 3: 'experts' names an expert twice: [2, 2]",
        _row(0, 1, 0, [1, 10**8]): "line 3: 'experts' must be integers from 0 to 4095, got [1, 100000000]",
        _row(0, 1, 0, [-1, 2]): "line 3: 'experts' must be integers from 0 to 4095, got [-1, 2]",
        _row(0, 1, 0, [1, 2]).replace('"layer": 0', '"layer": 4096'): "line 3: 'layer' must be from 0 to 4095",
        _row(0, 1, 0, [1, 2], guess=[9999]): "line 3: 'guess' must be a list of expert ids or null, got [9999]",
        _row(0, 0, 1, [5, 6]): "line 3: a second row for problem_id 0, token_idx 0, layer 1 (decode)",
        _row(0, 1, 0, [1, 2], phase="warmup"): "line 3: 'phase' must be 'prefill' or 'decode', got 'warmup'",
        "[1, 2]": "line 3: expected a JSON object per line",
    }
    for bad, message in cases.items():
        path.write_text("\n".join([*good, bad]) + "\n")
        with pytest.raises(MoEOffloadError) as error:
            read_trace(path)
        assert str(error.value).startswith(f"{path} {message}"), str(error.value)


def test_a_trace_that_is_not_text_or_has_no_whole_token(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path)
    assert str(error.value) == f"trace {path} is not UTF-8 text: give a .jsonl routing trace"
    path.write_text("\n".join([_row(0, 0, 0, [1, 2]), _row(0, 1, 1, [3, 4])]) + "\n")  # layer 1 of token 0 missing
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path)
    assert str(error.value) == (
        f"trace {path} has no complete token (a row for each of layers 0 to 1): all 2 are missing a layer"
    )


def test_missing_trace_file(tmp_path):
    with pytest.raises(MoEOffloadError, match=r"trace .*nope.jsonl does not exist"):
        read_trace(tmp_path / "nope.jsonl")


def test_writer_round_trip_with_guess_and_prefill(tmp_path):
    path = tmp_path / "out" / "trace.jsonl"
    with TraceWriter(path, dataset="unit") as writer:
        for layer in range(2):  # one prefill chunk: every expert the prompt used, in one row per layer
            writer.record(0, 0, layer, [4, 1, 7, 2], [0.4, 0.3, 0.2, 0.1], None, phase="prefill")
        writer.record(0, 3, 0, [1, 2], [0.75, 0.25], None)
        writer.record(0, 3, 1, [5, 6], [0.5, 0.5], [5, 0])
        writer.record(0, 4, 0, [1, 3], [0.6, 0.4], None)  # incomplete: layer 1 missing
        assert not path.exists()  # only the temporary file exists until close
    assert sorted(p.name for p in path.parent.iterdir()) == ["trace.jsonl"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(rows[3]) == [
        "dataset",
        "problem_id",
        "layer",
        "experts",
        "gating_probs",
        "token_idx",
        "guess",
        "phase",
    ]
    assert rows[3]["guess"] == [5, 0] and rows[3]["phase"] == "decode" and rows[0]["phase"] == "prefill"

    trace = read_trace(path)
    assert trace.skipped_tokens == 1 and trace.has_guesses
    prefill, decode = trace.tokens
    assert (prefill.phase, prefill.layers[1].experts) == ("prefill", (4, 1, 7, 2))
    assert (decode.phase, decode.token_idx, decode.layers[1].guess) == ("decode", 3, (5, 0))


def test_writer_leaves_nothing_after_an_error(tmp_path):
    path = tmp_path / "trace.jsonl"
    with pytest.raises(RuntimeError, match="boom"), TraceWriter(path) as writer:
        writer.record(0, 0, 0, [1, 2], [0.5, 0.5], None)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_sequence_of_another_models_routing_is_refused(tmp_path):
    """A 6-layer model's sequence appended to the 32-layer trace was dropped, token by token, as incomplete."""
    path = tmp_path / "mixed.jsonl"
    other = [_row(7, token, layer, [1, 2]) for token in range(3) for layer in range(6)]
    path.write_text(SHARED_TRACE.read_text() + "\n".join(other) + "\n")
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path)
    assert str(error.value) == (
        f"trace {path}: problem_id 7's tokens have at most 6 layers, the trace's 32; a trace holds one model's "
        "routing: give each model's its own file"
    )


def test_a_guessed_expert_counts_among_the_models_experts(tmp_path):
    """A short trace may guess an expert it never routes to: the model has it, so --slots may reach it."""
    path = tmp_path / "guess.jsonl"
    rows = [_row(0, 0, 0, [0, 1, 2, 3]), _row(0, 0, 1, [4, 5, 6, 7], guess=[4, 5]), _row(0, 1, 0, [0, 1])]
    path.write_text("\n".join([*rows, _row(0, 1, 1, [2, 3], guess=[9, 1])]) + "\n")
    trace = read_trace(path)
    assert trace.num_experts == 10
    assert simulate(trace, "lru", 10, prefetch="recorded").stats.total().prefetches_issued > 0


def test_a_folder_is_named_a_folder(tmp_path):
    with pytest.raises(MoEOffloadError) as error:
        read_trace(tmp_path)
    assert str(error.value) == f"trace {tmp_path} is a folder: give the path of a .jsonl routing trace"


def test_a_pipe_is_read(tmp_path):
    """`simulate <(zcat t.jsonl.gz)`: a pipe is no regular file, and was refused as one that does not exist."""
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    text = "\n".join([_row(0, 0, 0, [1, 2]), _row(0, 0, 1, [3, 4]), _row(0, 1, 0, [1, 3])]) + "\n"

    def write() -> None:  # opens only once a reader has: a refused pipe leaves nothing blocked
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
                continue
            os.write(descriptor, text.encode())
            os.close(descriptor)
            return

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    trace = read_trace(fifo)
    writer.join()
    assert (len(trace.tokens), trace.skipped_tokens, trace.num_layers) == (1, 1, 2)
