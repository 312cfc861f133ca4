"""bench on the CPU: exact cache figures under replayed routing, the JSON it writes, and its errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import offload
from cli.app import main
from offload.bench import (
    DECODE_WARMUP,
    NO_CACHE_IN_EXCLUSIVE_MODE,
    OraclePrefetcher,
    ReplayedRouting,
    bench,
    decode_run,
)
from offload.graphs import DecodeGraphs
from quant.errors import MoEOffloadError

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
    assert result["missed_bytes_per_token"] <= result["h2d_bytes_per_token"]
    per_layer = model.stats.cache.per_layer  # the whole run's: prefill, warm-up and timed decode steps
    decode_requests = (DECODE_WARMUP + 12) * 2
    assert result["prefetch"]["depth"] == 5  # every layer but one
    for layer in per_layer[1:]:
        assert layer.guess_right == layer.guess_total == decode_requests
    # layer 0 is loaded from the token before: the first decode step has none
    assert per_layer[0].guess_right == per_layer[0].guess_total == decode_requests - 2
    assert result["gpu_peak_bytes"] is None and result["gpu_allocs_in_decode"] is None  # no GPU here
    assert result["gpu_budget_bytes"] is None and result["prefill_reserve_bytes"] == 0  # the CPU's plan keeps none
    assert result["fraction_of_bound"] == pytest.approx(result["decode_tokens_per_s"] / result["bound_tokens_per_s"],
                                                        rel=1e-2)  # fmt: skip
    # the bound's compute is the faster of the two measurements, before and after the decode
    assert result["compute_s_per_token"] == min(result["compute_s_per_token_measured"])
    copies_s = result["missed_bytes_per_token"] / (result["h2d_bandwidth_gbps"] * 1e9)
    assert 1 / result["bound_tokens_per_s"] == bound_s(result, copies_s, result["h2d_bandwidth_gbps"])
    assert result["d2h_bytes_per_token"] == 0 and result["d2h_bandwidth_gbps"] is None  # inclusive: nothing back
    assert result["cuda_graphs"] is False and result["arena_pinned"] is False and result["host_embedding"] is False
    # the CPU runs none of the Triton paths: the C kernel has no gated call, and the norm and RoPE take torch's steps
    assert result["fused_kernels"] == {"gated_w1_w3": False, "rms_norm": False, "rope": False, "routing": False}


def test_the_gate_guesses_prefetch_ahead_layers(model):
    """bench --prefetch gate --prefetch-ahead 2: the runtime's guess at each output reaches two layers, in
    the run and in its lru_prefetch baseline; the JSON says how far."""
    result = bench(model, tokens=4, prompt_tokens=3, prefetch="gate", prefetch_ahead=2, compare=True)
    assert model.moe.prefetcher.ahead == 2
    assert (result["prefetch"]["ahead"], result["prefetch"]["depth"]) == (2, None)
    assert result["baselines"]["lru_prefetch"]["prefetch"]["ahead"] == 2
    assert result["baselines"]["lru_no_prefetch"]["prefetch"]["ahead"] is None
    one = bench(model, tokens=4, prompt_tokens=3, prefetch="gate")
    assert model.moe.prefetcher.ahead == 1 and one["prefetch"]["ahead"] == 1
    # the table's header says how far each prefetch reaches
    from cli.app import _prefetch_phrase

    phrases = [_prefetch_phrase(r["prefetch"]) for r in (result, one, result["baselines"]["lru_no_prefetch"])]
    assert phrases == ["gate, 2 layers ahead", "gate, 1 layer ahead", "none"]
    message = r"^--prefetch-ahead must be between 1 and 5 \(the layers but one\), got 6$"
    with pytest.raises(MoEOffloadError, match=message):
        bench(model, tokens=2, prefetch="gate", prefetch_ahead=6)


def test_the_timed_steps_count_their_own_prefetches(model):
    """The last warm-up step's oracle loads reach into the first timed step, and land before the clock
    starts: those are plain hits there. Each prefetch the window issued is used, wasted, or still
    unused at its end; and none other is counted."""
    routing = ReplayedRouting(TINY_TRACE, 6, 8, 2, "cpu")
    model.moe.routing = routing
    model.moe.prefetcher = OraclePrefetcher(routing, model.cache, 6, None)
    run = decode_run(model, prompt_tokens=4, tokens=12, routing=routing)
    d = run.decode
    pending = sum(len(table.unused_prefetches) for table in model.cache.tables)
    assert d.prefetches_issued > 0
    assert d.prefetches_used + d.prefetches_wasted + pending == d.prefetches_issued


def test_the_bound_counts_missed_bytes_not_wrong_guesses(model):
    """A wrong guess's load is traffic (h2d_bytes_per_token) but not work the bound grants."""
    result = bench(model, tokens=12, prompt_tokens=4, route_trace=str(TINY_TRACE), prefetch="gate")
    p = result["prefetch"]
    assert p["wasted"] > 0  # the gate guesses against replayed routing: often wrong
    requests = 12 * 6 * 2  # tokens x layers x top-k
    misses = round(requests * (1 - result["hit_rate"]))
    assert result["expert_bytes"] == model.cache.expert_bytes
    assert result["missed_bytes_per_token"] == round((misses + p["used"]) * result["expert_bytes"] / 12)
    assert result["missed_bytes_per_token"] < result["h2d_bytes_per_token"]
    copies_s = result["missed_bytes_per_token"] / (result["h2d_bandwidth_gbps"] * 1e9)
    assert 1 / result["bound_tokens_per_s"] == bound_s(result, copies_s, result["h2d_bandwidth_gbps"])


def test_the_link_is_the_fastest_of_its_rounds(monkeypatch):
    """Work elsewhere on the machine slows some rounds of copies: bench keeps the fastest, as it does compute."""
    import offload.bench

    rates = iter([100.0, 300.0, 200.0])  # copies a second, one figure a round
    monkeypatch.setattr(offload.bench, "_copies_per_second", lambda src, dst, repeats: next(rates))
    assert offload.bench.copy_bandwidth(1000, torch.device("cpu"), rounds=3) == 300.0 * 1000
    assert next(rates, None) is None  # every round timed


def bound_s(result: dict, copies_s: float, gbps: float):
    """max(compute, copies) per token, as the JSON's rounded figures allow: compute_s_per_token is rounded
    to the microsecond (abs: the tiny model's is well under a millisecond), the bandwidth to the MB/s,
    which is a part in a hundred of it where a busy 2-core machine measures the tiny model's copies at
    tens of MB/s (one run here: 0.068 GB/s, against 80 GB/s idle)."""
    return pytest.approx(max(result["compute_s_per_token"], copies_s), rel=1e-3 + 0.0005 / gbps, abs=1e-6)


class Loads:
    """A cache that records the prefetches it is asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def prefetch(self, layer: int, experts: list[int]) -> None:
        self.calls.append((layer, experts))


def test_the_oracle_loads_depth_layers_ahead_in_compute_order_once_each():
    routing = ReplayedRouting(TINY_TRACE, 6, 8, 2, "cpu")
    cache = Loads()
    oracle = OraclePrefetcher(routing, cache, 6, depth=3)
    one = torch.zeros(1, 4)
    seen = []
    for position in (10, 11):
        routing.position = position
        for layer in range(6):
            oracle.after_attention(layer, one)
            seen.append(len(cache.calls))
    assert seen == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # three ahead at first, then one per layer
    expected = [(p, layer) for p in (10, 11, 12) for layer in range(6)][1:15]  # (10, 1) .. (12, 2)
    assert cache.calls == [(layer, list(routing.experts(p, layer))) for p, layer in expected]
    routing.position = 0  # a new sequence: the oracle starts over
    oracle.after_attention(0, one)
    assert cache.calls[14:] == [(layer, list(routing.experts(0, layer))) for layer in (1, 2, 3)]
    oracle.after_attention(0, torch.zeros(4, 4))  # a prefill chunk: no guess
    assert len(cache.calls) == 17


def test_oracle_depth_changes_no_hit(model):
    """Each layer's table sees its own requests and prefetches in the same order at any depth."""
    runs = [bench(model, tokens=8, prompt_tokens=3, route_trace=str(TINY_TRACE), prefetch="oracle", oracle_depth=d)
            for d in (1, 5)]  # fmt: skip
    assert [r["prefetch"]["depth"] for r in runs] == [1, 5]
    assert runs[0]["hit_rate"] == runs[1]["hit_rate"]
    # what the requests found does not change; the window's own loads do: the deeper oracle made more of
    # the first timed step's loads in the warm-up, before the clock
    assert runs[0]["prefetch"]["used"] > runs[1]["prefetch"]["used"] > 0
    message = r"^--oracle-depth must be between 1 and 5 \(the layers but one\), got 6$"
    with pytest.raises(MoEOffloadError, match=message):
        bench(model, tokens=2, route_trace=str(TINY_TRACE), prefetch="oracle", oracle_depth=6)


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
    # compute measured before the decode, after it and after the baselines: every run's bound takes the fastest
    measured = result["compute_s_per_token_measured"]
    assert len(measured) == 3 and result["compute_s_per_token"] == min(measured)
    for r in (result, baselines["no_cache"], baselines["lru_prefetch"]):
        copies_s = r["missed_bytes_per_token"] / (result["h2d_bandwidth_gbps"] * 1e9)
        assert 1 / r["bound_tokens_per_s"] == bound_s(result, copies_s, result["h2d_bandwidth_gbps"])
    assert (baselines["lru_prefetch"]["prefetch"]["depth"], baselines["lru_prefetch"]["prefetch"]["ahead"]) == (5, None)
    from cli import app

    console = app.out
    app.out = Console(width=200, file=io.StringIO())
    try:
        app._print_bench(result)
        printed = app.out.file.getvalue()
    finally:
        app.out = console
    row = next(line for line in printed.splitlines() if "accelerate" in line)
    assert "None" not in row and row.split("│")[2].strip() == "-"  # printed Python's None


class KeyLog(DecodeGraphs):
    """Eager, like DecodeGraphs(capture=False), logging each decode step's piece keys."""

    def __init__(self) -> None:
        super().__init__(capture=False)
        self.steps: list[list] = [[]]

    def run(self, key, fn) -> None:
        fn()
        self.steps[-1].append(key)
        if key == ("head",):  # a step's last piece
            self.steps.append([])


def test_no_key_range_is_first_reached_inside_the_clock(trained_model_dir):
    """Each key range has its own graphs, and a capture synchronizes the device: decode_run meets every
    range its timed steps reach before the clock starts."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=3, max_seq_len=300)
    model.decoder.graphs = log = KeyLog()
    decode_run(model, prompt_tokens=250, tokens=10, routing=None)  # timed positions 252..261: keys 256, then 300
    steps = log.steps[:-1]
    before = steps[:-10]
    keys_of = [{key[2] for key in step if key[0] == "attention"} for step in steps]
    assert keys_of[-10:] == [{256}] * 4 + [{300}] * 6
    assert set().union(*keys_of[:-10]) == {256, 300}
    assert len(before) == 1 + DECODE_WARMUP  # one step at 300 keys before the run, then the warm-up


def test_compare_in_exclusive_mode_keeps_every_slot_full(trained_model_dir):
    """--compare swaps the policy between runs: exclusive mode's slots must keep their experts (each lives
    in one place), and no cache cannot run there."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=3, max_seq_len=64, cache_mode="exclusive")
    result = bench(model, tokens=6, prompt_tokens=3, route_trace=str(TINY_TRACE), prefetch="oracle", compare=True)
    baselines = result["baselines"]
    assert baselines["no_cache"] == {"decode_tokens_per_s": None, "note": NO_CACHE_IN_EXCLUSIVE_MODE}
    for name in ("lru_no_prefetch", "lru_prefetch"):
        assert baselines[name]["d2h_bytes_per_token"] == baselines[name]["h2d_bytes_per_token"] > 0  # one swap a load
    assert baselines["lru_prefetch"]["prefetch"]["recall"] == 1.0
    assert all(len(table.slot_of) == 3 for table in model.cache.tables)
    # each load sends its victim back at the same time: the slower direction sets the copies' time
    slower = min(result["h2d_bandwidth_gbps"], result["d2h_bandwidth_gbps"])
    copies_s = result["missed_bytes_per_token"] / (slower * 1e9)
    assert 1 / result["bound_tokens_per_s"] == bound_s(result, copies_s, slower)


def test_cli_writes_the_json(capsys, tmp_path, trained_model_dir):
    out = tmp_path / "results" / "bench.json"
    code = main(["bench", str(trained_model_dir), "--slots", "2", "--device", "cpu", "--tokens", "5",
                 "--prompt-tokens", "3", "--compare", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert KEYS <= set(result) and result["routing"] == "model"
    assert result["baselines"]["accelerate"]["decode_tokens_per_s"] > 0  # an HF folder: transformers ran it
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left


def test_without_slots_the_cpu_bench_times_direct_mode(capsys, tmp_path, trained_model_dir):
    """As the CPU runs a model by default: every expert computed in place. The speed, under replayed routing
    here, and every cache figure None, under the same keys as a cache's bench."""
    out = tmp_path / "direct.json"
    code = main(["bench", str(trained_model_dir), "--device", "cpu", "--tokens", "5", "--prompt-tokens", "3",
                 "--route-trace", str(TINY_TRACE), "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "direct mode: every expert computed in place, no cache" in printed
    result = json.loads(out.read_text())
    cached = bench(offload.load(str(trained_model_dir), device="cpu", slots=2, max_seq_len=64), tokens=5,
                   prompt_tokens=3, prefetch="none")  # fmt: skip
    assert set(result) == set(cached) and KEYS <= set(result)
    direct = offload.load(str(trained_model_dir), device="cpu", max_seq_len=64)
    with pytest.raises(MoEOffloadError) as error:  # from Python as from the CLI
        bench(direct, tokens=5, compare=True)
    assert str(error.value) == (
        "--compare runs the cache's baselines: without --slots the CPU computes every expert in place; give --slots"
    )
    assert bench(direct, tokens=2, prompt_tokens=3, route_trace=str(TINY_TRACE))["mode"] == "direct"
    assert isinstance(direct.moe.routing, ReplayedRouting) and direct.moe.routing.path == str(TINY_TRACE)  # it ran
    assert result["mode"] == "direct" and result["routing"] == f"replayed: {TINY_TRACE}"
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert result["compute_s_per_token"] == pytest.approx(1 / result["decode_tokens_per_s"], rel=1e-3)
    assert {key for key, value in result.items() if value is None} == {
        *offload.bench.CACHE_KEYS, "cuda_graphs_failed"}  # fmt: skip


def test_bench_errors(capsys, trained_model_dir, tmp_path, model):
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
    code = main(["bench", "no-such-folder", "--slots", "2", "--device", "cpu", "--prefetch", "oracle",
                 "--route-trace", str(TINY_TRACE), "--prefetch-ahead", "2", "--tokens", "4"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "error: --prefetch-ahead is how far the gate guesses: use it with --prefetch gate (the oracle's reach "
        "is --oracle-depth)"
    )  # fmt: skip
    code = main(["bench", "no-such-folder", "--prefetch", "gate", "--oracle-depth", "3"])  # was ignored
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "error: --oracle-depth is how far the oracle loads: use it with --prefetch oracle (the gate's reach "
        "is --prefetch-ahead)"
    )  # fmt: skip
    without_slots = [
        (["--compare"], "--compare runs the cache's baselines"),
        (["--prefetch", "oracle", "--route-trace", str(TINY_TRACE)], "--prefetch oracle loads experts into slots"),
        (["--prefetch-ahead", "2"], "--prefetch-ahead 2 guesses experts to load into slots"),
    ]
    for asked, what in without_slots:
        code = main(["bench", "no-such-folder", "--device", "cpu", *asked])  # before the load
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == (
            f"error: {what}: without --slots the CPU computes every expert in place; give --slots"
        )  # fmt: skip
    for value in ("0", "-3"):  # -3 was a traceback after the load
        code = main(["bench", "no-such-folder", "--prompt-tokens", value])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == f"error: --prompt-tokens must be at least 1, got {value}"
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe")
    code = main(["bench", "no-such-folder", "--route-trace", str(binary)])  # before the load, not after it
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: trace {binary} is not UTF-8 text: give a .jsonl routing trace"
    code = main(["bench", str(trained_model_dir), "--slots", "1", "--device", "cpu", "--tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "error: bench needs at least 2 slots per layer (the experts a token uses) to measure compute with "
        "nothing copied; give --slots 2 or more"
    )  # fmt: skip
    code = main(["bench", "no-such-folder", "--tokens", "100", "--max-seq-len", "64"])  # was an error after the load
    err = capsys.readouterr().err.strip()
    too_short = ("bench of 16 prompt and 100 timed tokens needs a context of 119 (with 2 warm-up steps), and "
                 "--max-seq-len is 64: raise --max-seq-len, lower --tokens or --prompt-tokens, or leave --max-seq-len "
                 "out")  # fmt: skip
    assert code == 2 and err == f"error: {too_short}"
    with pytest.raises(MoEOffloadError) as error:  # from Python too, before anything is timed
        offload.bench.bench(model, tokens=100)
    assert str(error.value) == too_short
    with pytest.raises(MoEOffloadError) as error:  # was a ZeroDivisionError after the run
        offload.bench.bench(model, tokens=0)
    assert str(error.value) == "--tokens must be at least 1, got 0"
    with pytest.raises(MoEOffloadError) as error:
        offload.bench.bench(model, tokens=2.0)
    assert str(error.value) == "--tokens must be a whole number, got 2.0"
    counts = offload.bench.check_run(np.int64(16), np.int32(4), None)  # numpy's were refused; JSON needs Python's
    assert counts == (16, 4) and all(type(count) is int for count in counts)


def test_device_work_is_told_apart_on_torch_with_and_without_activity_types():
    """profile_decode reads kineto's activity type where torch has it (2.12 on); the GPU machine's torch 2.11
    has none, so there the device's events count, less its sync records."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_decode import is_device_work

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4).sum()
    events = list(prof.profiler.kineto_results.events())
    assert events and not any(is_device_work(e) for e in events)  # host events only

    class Event:  # torch 2.11's _KinetoEvent, as far as is_device_work reads it
        def __init__(self, device, name):
            self.device, self.label = device, name

        def device_type(self):
            return self.device

        def name(self):
            return self.label

    assert is_device_work(Event(DeviceType.CUDA, "Memcpy HtoD (Pinned -> Device)"))
    assert is_device_work(Event(DeviceType.CUDA, "_gemv_packed_kernel"))
    assert not is_device_work(Event(DeviceType.CUDA, "Stream Sync"))
    assert not is_device_work(Event(DeviceType.CUDA, "Stream Wait Event"))  # one a layer: the cache's wait_event
    assert not is_device_work(Event(DeviceType.CPU, "aten::mm"))


def test_overlap_lays_the_device_work_on_one_time_line():
    """profile_decode's time line: link and compute busy, both, each alone, idle and its gaps, per step."""
    from benchmarks.profile_decode import overlap

    us = 1000  # spans in microseconds, figures in milliseconds
    spans = [
        ("compute", 0, 100 * us), ("compute", 150 * us, 250 * us), ("compute", 240 * us, 300 * us),
        ("h2d", 50 * us, 200 * us),
        ("d2h", 320 * us, 325 * us),  # a routing read after an idle gap of 20 ms
        ("compute", 325 * us + 5, 326 * us),  # 5 us after it: a launch's shadow, not a gap
    ]  # fmt: skip
    assert overlap(spans, steps=1) == {
        "wall_ms": 326.0, "link_busy_ms": 150.0, "compute_busy_ms": 250.995, "both_ms": 100.0,
        "link_only_ms": 50.0, "compute_only_ms": 150.995, "idle_ms": 20.005, "idle_gaps": 1.0,
        "idle_gap_mean_us": 20000.0,
    }  # fmt: skip
    assert overlap(spans, steps=2)["link_busy_ms"] == 75.0


def test_bench_warns_of_a_long_context_only_where_asked(tmp_path, capsys):
    """bench's own context (prompt, warm-up and timed steps) past a synthetic model's 512 positions warned about
    --max-seq-len, which nobody gave; a --max-seq-len past them still warns."""
    from offload.synth import synthesize

    folder = synthesize(tmp_path / "tiny", "tiny", layers=2)
    assert main(["bench", str(folder), "--slots", "2", "--tokens", "500", "--prompt-tokens", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["bench", str(folder), "--slots", "2", "--tokens", "2", "--max-seq-len", "600"]) == 0
    assert "warning: a context of 600 tokens (--max-seq-len) is beyond the 512 positions" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands the CPU in for CUDA")
def test_fused_kernels_say_which_one_kernel_paths_ran(tmp_path, monkeypatch):
    """bench's fused_kernels: each path on where it ran (here as on CUDA: the Triton workspace, the norm's, RoPE's
    and the routing's first tries passed), and the gated pair off once its first try failed for the experts' spec."""
    from offload.bench import fused_kernels
    from quant import gemv
    from quant.linear import TRITON
    from tests.test_norm import turn_on
    from tests.tiny import make_tiny_mixtral

    turn_on(monkeypatch, routing=True)
    monkeypatch.setattr(gemv, "_gated_failed", {})
    loaded = offload.load(str(make_tiny_mixtral(tmp_path / "m", layers=1, seed=12)), device="cpu", expert_bits="2")
    loaded.moe.workspace.kernel = TRITON
    assert fused_kernels(loaded) == {"gated_w1_w3": True, "rms_norm": True, "rope": True, "routing": True}
    gemv._gated_failed[torch.device("cpu"), torch.float32, loaded.prepared.expert_format.spec] = "no"
    assert fused_kernels(loaded)["gated_w1_w3"] is False
