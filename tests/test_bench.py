"""bench on the CPU: exact cache figures under replayed routing, the JSON it writes, and its errors."""

import json
from pathlib import Path

import pytest

import offload
from cli.app import main
from offload.bench import DECODE_WARMUP, bench

REPO = Path(__file__).resolve().parents[1]
TINY_TRACE = REPO / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl"  # 6 layers: the trained model's
SHARED_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
KEYS = {"device", "commit", "command", "model", "prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate",
        "prefetch", "stall_s", "h2d_bytes_per_token", "h2d_bandwidth_gbps", "bound_tokens_per_s",
        "fraction_of_bound", "gpu_peak_bytes", "gpu_allocs_in_decode", "routing"}  # fmt: skip


@pytest.fixture(scope="module")
def model(trained_model_dir):
    return offload.load(str(trained_model_dir), device="cpu", slots=3, max_seq_len=64)


def test_oracle_prefetch_makes_every_guessed_layer_hit(model):
    result = bench(model, tokens=12, prompt_tokens=4, route_trace=str(TINY_TRACE), prefetch="oracle")
    assert KEYS <= set(result)
    assert result["routing"] == f"replayed: {TINY_TRACE}"
    assert result["prefetch"]["recall"] == 1.0
    per_layer = model.stats.cache.per_layer  # the whole run's: prefill, warm-up and timed decode steps
    decode_requests = (DECODE_WARMUP + 12) * 2
    for layer in per_layer[1:]:  # nothing guesses layer 0
        assert layer.guess_right == layer.guess_total == decode_requests
    assert result["gpu_peak_bytes"] is None and result["gpu_allocs_in_decode"] is None  # no GPU here
    assert result["fraction_of_bound"] == pytest.approx(result["decode_tokens_per_s"] / result["bound_tokens_per_s"],
                                                        rel=1e-2)  # fmt: skip


def test_compare_runs_the_baselines(model):
    result = bench(model, tokens=6, prompt_tokens=3, route_trace=str(TINY_TRACE), prefetch="oracle", compare=True)
    baselines = result["baselines"]
    assert set(baselines) == {"no_cache", "lru_no_prefetch", "lru_prefetch", "accelerate"}
    expert_bytes = model.cache.expert_bytes
    assert baselines["no_cache"]["hit_rate"] == 0.0  # every expert loaded at every use
    assert baselines["no_cache"]["h2d_bytes_per_token"] == 6 * 2 * expert_bytes
    assert baselines["lru_prefetch"]["prefetch"]["recall"] == 1.0
    assert baselines["lru_no_prefetch"]["prefetch"]["issued"] == 0
    assert baselines["accelerate"]["decode_tokens_per_s"] is None and "Hugging Face folders" in baselines[
        "accelerate"]["note"]  # fmt: skip


def test_cli_writes_the_json(capsys, tmp_path, trained_model_dir):
    out = tmp_path / "results" / "bench.json"
    code = main(["bench", str(trained_model_dir), "--slots", "2", "--device", "cpu", "--tokens", "5",
                 "--prompt-tokens", "3", "--compare", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert KEYS <= set(result) and result["routing"] == "model"
    assert result["baselines"]["accelerate"]["decode_tokens_per_s"] > 0  # an HF folder: transformers ran it
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left


def test_bench_errors(capsys, trained_model_dir):
    code = main(["bench", str(trained_model_dir), "--slots", "2", "--device", "cpu", "--route-trace",
                 str(SHARED_TRACE), "--tokens", "4"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"error: trace {SHARED_TRACE} has 32 layers but the model has 6; replay a trace of a model with the "
        "same layers (synth --layers can match it)"
    )  # fmt: skip
    code = main(["bench", str(trained_model_dir), "--slots", "2", "--device", "cpu", "--prefetch", "oracle",
                 "--tokens", "4"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --prefetch oracle needs --route-trace: the oracle reads the next layer from it"
    code = main(["bench", str(trained_model_dir), "--device", "cpu", "--tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: bench measures the expert cache: give --slots (on the CPU) or run on CUDA"
