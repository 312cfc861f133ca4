"""The time-line model: bench's exact cache counters, and schedules worked out by hand."""

import json
from pathlib import Path

import pytest

import offload
from cache.stats import LayerStats
from cache.timeline import Costs, timeline
from cache.trace import Request, Token, Trace, read_trace
from cli.app import main
from offload.bench import ReplayedRouting, decode_run, set_prefetch
from quant.errors import MoEOffloadError

REPO = Path(__file__).resolve().parents[1]
TINY_TRACE = REPO / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl"  # 6 layers, 8 experts, top-2
SHARED_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"  # 32 layers
COUNTERS = ("requests", "hits", "misses", "prefetches_issued", "prefetches_used", "prefetches_wasted",
            "guess_right", "guess_total")  # fmt: skip
# a layer: 1 s resident, 1 s per expert; a load: 3 s. Two layers of top-2: compute 6 s a token.
COSTS = Costs(compute_s=6.0, expert_s=1.0, copy_s=3.0, wake_s=0.5)
TINY_COSTS = Costs(compute_s=6 * 3.0, expert_s=1.0, copy_s=3.0, wake_s=0.5)  # the trained model: 6 layers


def trace_of(*positions: tuple[tuple[int, ...], ...]) -> Trace:
    """One sequence of decode tokens; each position names every layer's two experts."""
    tokens = [Token(0, i, "decode", tuple(Request(experts, (0.6, 0.4)) for experts in layers))
              for i, layers in enumerate(positions)]  # fmt: skip
    return Trace(Path("hand.jsonl"), tokens, num_layers=2, num_experts=4)


def one_step(trace: Trace, **kwargs):
    """Position 0 as the prefill, then position 1 timed."""
    return timeline(trace, COSTS, slots=2, prompt_tokens=1, warmup=0, tokens=1, **kwargs)


def test_a_miss_stalls_the_host_until_its_load_lands_and_loads_queue_on_one_stream():
    run = one_step(trace_of(((0, 1), (0, 1)), ((2, 3), (0, 1))), prefetch="none")
    # layer 0: resident 0-1; loads of 2 and 3 at 1-4 and 4-7; expert 2 waits to 4 (+0.5 wake): 4.5-5.5,
    # expert 3 waits to 7: 7.5-8.5. Layer 1: resident 8.5-9.5, two hits 9.5-11.5.
    assert run.decode_s == pytest.approx(11.5)
    assert run.stall_s == pytest.approx(3 + 2.5)
    assert run.h2d_busy_s == pytest.approx(6)
    assert (run.stats.hits, run.stats.misses) == (2, 2)
    assert run.bound_s == pytest.approx(6)  # compute 6 s; copies 2 x 3 s
    assert run.fraction_of_bound == pytest.approx(6 / 11.5)


def test_the_policys_bookkeeping_delays_the_host_before_the_loads_it_decides():
    costs = Costs(compute_s=6.0, expert_s=1.0, copy_s=3.0, wake_s=0.5, access_s=0.25, eviction_s=0.5)
    run = timeline(trace_of(((0, 1), (0, 1)), ((2, 3), (0, 1))), costs, slots=2, prompt_tokens=1, warmup=0,
                   tokens=1, prefetch="none")  # fmt: skip
    # layer 0: resident 0-1; two accesses and two victims take the host to 2.5; loads 2.5-5.5 and 5.5-8.5;
    # expert 2 at 6-7, expert 3 at 9-10. Layer 1: resident 10-11, two accesses to 11.5, two hits 11.5-13.5.
    assert run.decode_s == pytest.approx(13.5)
    assert run.stall_s == pytest.approx(3 + 2.5)
    assert run.bound_s == pytest.approx(6)  # the bound is the device's: the host's work is not in it


def test_the_oracle_loads_the_next_layer_behind_this_ones_compute():
    run = one_step(trace_of(((0, 1), (0, 1)), ((0, 1), (2, 3))), prefetch="oracle", depth=1)
    # layer 0: resident 0-1, hits 1-3; at 1 the oracle starts layer 1's loads: 1-4 and 4-7.
    # layer 1: resident 3-4; expert 2 landed at 4, runs 4-5; expert 3 waits to 7: 7.5-8.5.
    assert run.decode_s == pytest.approx(8.5)
    assert run.stall_s == pytest.approx(3)
    s = run.stats
    assert (s.hits, s.misses, s.prefetches_issued, s.prefetches_used) == (4, 0, 2, 2)
    assert run.bound_s == pytest.approx(6)  # a used prefetch counts as missed bytes, as in bench


def test_an_exclusive_swap_overlaps_its_two_directions():
    same = one_step(trace_of(((0, 1), (0, 1)), ((2, 3), (0, 1))), prefetch="none", mode="exclusive")
    assert same.decode_s == pytest.approx(11.5)  # back 1-4 and 4-7 beside 1-4 and 4-7 in: as inclusive
    slow_back = Costs(compute_s=6.0, expert_s=1.0, copy_s=3.0, back_s=5.0, wake_s=0.5)
    run = timeline(trace_of(((0, 1), (0, 1)), ((2, 3), (0, 1))), slow_back, slots=2, prompt_tokens=1, warmup=0,
                   tokens=1, prefetch="none", mode="exclusive")  # fmt: skip
    # swap 1: back 1-6, in 1-4; swap 2: back waits swap 1's in (4) and its stream (6): 6-11; in waits swap
    # 1's back (6): 6-9. Experts 4.5-5.5 and 9.5-10.5; layer 1 10.5-13.5; the last copy back ends at 11.
    assert run.decode_s == pytest.approx(13.5)
    assert run.bound_s == pytest.approx(10)  # the slower direction: 2 x 5 s


@pytest.mark.parametrize("prefetch, misses, used", [("none", 4, 0), ("oracle", 2, 2)])
def test_the_bound_counts_misses_and_used_prefetches(prefetch, misses, used):
    """bench's bound: max(compute, (misses + prefetches used) x copy time) per token; here the copies win."""
    run = one_step(trace_of(((0, 1), (0, 1)), ((2, 3), (2, 3)), ((2, 3), (2, 3))), prefetch=prefetch, depth=1)
    assert (run.stats.misses, run.stats.prefetches_used) == (misses, used)
    assert run.bound_s == pytest.approx(4 * 3.0)  # against 6 s of compute: either count alone would give 6


def test_a_layers_own_loads_queue_before_the_oracles():
    run = one_step(trace_of(((0, 1), (0, 1)), ((0, 2), (2, 3)), ((0, 2), (2, 3))), prefetch="oracle", depth=1)
    # layer 0: resident 0-1; its miss (2) loads 1-4, then the oracle's two for layer 1: 4-7 and 7-10.
    # expert 0 hits (1-2), expert 2 waits to 4: 4.5-5.5. Layer 1: resident 5.5-6.5, expert 2 waits to 7:
    # 7.5-8.5, expert 3 waits from 7.5 to 10: 10.5-11.5. (The guess first would put layer 0's load at 7-10.) The
    # oracle's load for the next token, at layer 1, finds layer 0's experts in place: none to wait for.
    assert run.decode_s == pytest.approx(11.5)
    assert run.stall_s == pytest.approx(3 + 0.5 + 2.5)


@pytest.fixture(scope="module")
def tiny_trace() -> Trace:
    return read_trace(TINY_TRACE)


@pytest.mark.parametrize(
    "slots, mode, prefetch, depth, no_cache",
    [(3, "inclusive", "oracle", None, False), (3, "inclusive", "oracle", 1, False),
     (6, "inclusive", "none", None, False), (3, "inclusive", "none", None, True),
     (3, "exclusive", "oracle", 2, False), (6, "exclusive", "none", None, False),
     ((4, 3, 3, 2, 2, 2), "inclusive", "oracle", None, False), ((2, 2, 3, 3, 4, 5), "exclusive", "none", None, False)],
)  # fmt: skip
def test_counts_what_bench_counts(trained_model_dir, tiny_trace, planned_slots, slots, mode, prefetch, depth,
                                  no_cache):  # fmt: skip
    """The same replay as bench's decode_run on the trained model: every cache counter equal. A tuple
    of slots is one count a layer, as the planner may give them."""
    uneven = isinstance(slots, tuple)
    if uneven:
        planned_slots(slots)
    model = offload.load(str(trained_model_dir), device="cpu", slots=2 if uneven else slots, cache_mode=mode,
                         max_seq_len=64)  # fmt: skip
    assert model.cache.slots_per_layer == (list(slots) if uneven else [slots] * 6)
    c = model.config
    routing = ReplayedRouting(TINY_TRACE, c.num_layers, c.num_experts, c.top_k, model.device)
    model.moe.routing = routing
    set_prefetch(model, prefetch, routing, depth)
    run = decode_run(model, prompt_tokens=5, tokens=20, routing=routing, forget_every_token=no_cache)
    timed = timeline(tiny_trace, TINY_COSTS, slots=slots, mode=mode, prefetch=prefetch, depth=depth, no_cache=no_cache,
                     tokens=20, prompt_tokens=5, num_experts=c.num_experts)  # fmt: skip
    assert {k: getattr(timed.stats, k) for k in COUNTERS} == {k: getattr(run.decode, k) for k in COUNTERS}
    assert timed.stats.requests == 20 * c.num_layers * c.top_k


def test_a_deeper_oracle_keeps_the_link_busy(tiny_trace):
    """Loads as long as the compute: one layer ahead the link idles through layers that miss nothing."""
    costs = Costs(compute_s=6 * 3.0, expert_s=1.0, copy_s=3.5)  # about 5 loads a token: 17.5 s against 18
    shallow = timeline(tiny_trace, costs, slots=3, prefetch="oracle", depth=1, tokens=64)
    deep = timeline(tiny_trace, costs, slots=3, prefetch="oracle", tokens=64)
    assert deep.stats.hits == shallow.stats.hits
    assert deep.fraction_of_bound > shallow.fraction_of_bound
    assert deep.stall_s < shallow.stall_s / 4  # the same loads, started earlier


@pytest.mark.parametrize(
    "kwargs, message",
    # a bad value names the CLI's option, which passes its values here; a Python-only one the keyword
    [(dict(prefetch="gate"), "--prefetch 'gate' is unknown here: choose none or oracle"),
     (dict(policy="belady"), "--policy 'belady' is unknown or offline: choose one of lru, fifo, lfu, path"),
     (dict(mode="auto"),
      "--cache-mode 'auto' is unknown here: choose inclusive or exclusive (the mode the traced run used)"),
     (dict(slots=1), "--slots must be between 2 (top-k) and 4 (the experts per layer), got 1"),
     (dict(slots=(2, 5)), "--slots must be between 2 (top-k) and 4 (the experts per layer), got 2 to 5"),
     (dict(slots=(2, 2, 2)), "slots per layer names 3 layers, the trace has 2"),
     (dict(depth=2), "--depth must be between 1 and 1 (the layers but one), got 2"),
     (dict(tokens=0), "--tokens must be at least 1, got 0"),
     (dict(prompt_tokens=0), "prompt_tokens must be at least 1, got 0"),
     (dict(mode="exclusive", no_cache=True),
      "no cache empties the slots, which exclusive mode cannot: use inclusive mode"),
     (dict(costs=Costs(compute_s=6.0, expert_s=2.0, copy_s=3.0)),
      "2 layers x 2 experts x 2000 ms per expert is more than the 6000 ms of compute per token; give a smaller "
      "--expert-ms")],
)  # fmt: skip
def test_errors(kwargs, message):
    costs = kwargs.pop("costs", COSTS)
    with pytest.raises(MoEOffloadError) as error:
        timeline(trace_of(((0, 1), (0, 1)), ((2, 3), (0, 1))), costs, **{"slots": 2, **kwargs})
    assert str(error.value) == message


def test_trace_errors():
    short = Trace(Path("short.jsonl"), [Token(0, 0, "decode", (Request((1,), (1.0,)), Request((0, 1), (0.5, 0.5))))],
                  num_layers=2, num_experts=4)  # fmt: skip
    with pytest.raises(MoEOffloadError) as error:
        timeline(short, COSTS, slots=2)
    assert str(error.value) == "trace short.jsonl has a decode row with fewer than 2 experts"
    one_layer = Trace(Path("one.jsonl"), [Token(0, 0, "decode", (Request((0, 1), (0.5, 0.5)),))], 1, 4)
    with pytest.raises(MoEOffloadError) as error:
        timeline(one_layer, Costs(compute_s=3.0, expert_s=1.0, copy_s=3.0), slots=2)
    assert str(error.value) == "trace one.jsonl has one layer: the oracle loads later layers; use --prefetch none"
    assert timeline(one_layer, Costs(compute_s=3.0, expert_s=1.0, copy_s=3.0), slots=2, prefetch="none").tokens == 128


def test_top_k_is_the_traces_own():
    """A trace of a top-4 model is replayed at top-4 (it was cut to Mixtral's 2, silently, from the CLI too)."""
    row = Request((0, 1, 2, 3), (0.25,) * 4)
    four = Trace(Path("four.jsonl"), [Token(0, i, "decode", (row, row)) for i in range(3)], num_layers=2, num_experts=8)
    run = timeline(four, Costs(compute_s=10.0, expert_s=1.0, copy_s=3.0), slots=4, prompt_tokens=1, tokens=2)
    assert run.stats.requests == 2 * 2 * 4
    with pytest.raises(MoEOffloadError) as error:
        timeline(four, COSTS, slots=4, top_k=5)
    assert str(error.value) == "--slots must be between 5 (top-k) and 8 (the experts per layer), got 4"


def test_counters_are_the_timed_steps_alone(tiny_trace):
    run = timeline(tiny_trace, TINY_COSTS, slots=3, prefetch="none", tokens=7)
    assert isinstance(run.stats, LayerStats) and run.stats.requests == 7 * 6 * 2


def test_cli_times_what_the_python_api_times(capsys):
    code = main(["timeline", str(TINY_TRACE), "--policy", "lru,path", "--slots", "3-4", "--depth", "2",
                 "--compute-ms", "6", "--expert-ms", "0.2", "--bandwidth", "2", "--expert-bytes", "1000000",
                 "--wake-us", "50", "--tokens", "16", "--json"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    costs = Costs(compute_s=0.006, expert_s=0.0002, copy_s=0.0005, wake_s=5e-5)
    assert printed["costs"] == {"compute_s": 0.006, "expert_s": 0.0002, "copy_s": 0.0005, "back_s": None,
                                "wake_s": 5e-5, "access_s": 0.0, "eviction_s": 0.0}  # fmt: skip
    trace = read_trace(TINY_TRACE)
    expected = [timeline(trace, costs, policy=p, slots=k, depth=2, tokens=16).to_dict()
                for p in ("lru", "path") for k in (3, 4)]  # fmt: skip
    assert printed["results"] == expected
    no_cache = timeline(trace, costs, slots=4, prefetch="none", no_cache=True, tokens=16)
    assert printed["no_cache"] == no_cache.to_dict()


def test_cli_prints_the_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # rich's width off a terminal, whatever the runner's
    assert main(["timeline", str(SHARED_TRACE), "--slots", "5", "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    # whole, though piped: rich cut it at 80 columns
    assert out.splitlines()[0] == (f"{SHARED_TRACE}: 32 decode tokens of its longest sequence; an expert copies in "
                                   "1.249 ms, computes in 0.2161 ms; 23.928 ms of compute per token")  # fmt: skip
    assert "predicted decode (inclusive, prefetch oracle, depth 31)" in out
    run = timeline(read_trace(SHARED_TRACE), Costs(compute_s=0.023928, expert_s=0.000216,
                   copy_s=66_748_416 / 53.43e9, wake_s=2e-5), tokens=32)  # fmt: skip
    assert f"{run.tokens_per_s:.2f}" in out and f"{run.fraction_of_bound:.3f}" in out


@pytest.mark.parametrize(
    "args, message",
    [(["--bandwidth", "0"], "error: --bandwidth must be a positive finite number, got 0"),
     (["--wake-us", "-1"], "error: --wake-us must be a finite number, not negative, got -1"),
     (["--compute-ms", "nan"], "error: --compute-ms must be a positive finite number, got nan"),  # printed NaN
     (["--expert-ms", "nan"], "error: --expert-ms must be a positive finite number, got nan"),
     (["--bandwidth", "inf"], "error: --bandwidth must be a positive finite number, got inf"),
     (["--back-bandwidth", "nan"], "error: --back-bandwidth must be a positive finite number, got nan"),
     (["--wake-us", "nan"], "error: --wake-us must be a finite number, not negative, got nan"),
     (["--wake-us", "inf"], "error: --wake-us must be a finite number, not negative, got inf"),
     (["--cache-mode", "auto"],
      "error: --cache-mode 'auto' is unknown here: choose inclusive or exclusive (the mode the traced run used)"),
     (["--slots", "9"], "error: --slots must be between 2 (top-k) and 8 (the experts per layer), got 9"),
     (["--slots", "1-3"], "error: --slots must be between 2 (top-k) and 8 (the experts per layer), got 1"),
     (["--policy", "belady"], "error: --policy 'belady' is unknown or offline: choose one of lru, fifo, lfu, path"),
     (["--policy", "lru,mru"], "error: --policy 'mru' is unknown or offline: choose one of lru, fifo, lfu, path"),
     (["--prefetch", "gate"], "error: --prefetch 'gate' is unknown here: choose none or oracle"),
     (["--depth", "6"], "error: --depth must be between 1 and 5 (the layers but one), got 6"),
     (["--tokens", "0"], "error: --tokens must be at least 1, got 0"),
     (["--policy", ","], "error: --policy ',' names no policy: give e.g. lru or lru,path"),
     (["--compute-ms", "0.1"], "error: 6 layers x 2 experts x 0.2161 ms per expert is more than the 0.1 ms of "
                               "compute per token; give a smaller --expert-ms")],
)  # fmt: skip
def test_cli_errors(capsys, args, message):
    assert main(["timeline", str(TINY_TRACE), *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_cli_runs_a_repeated_policy_once(capsys):
    assert main(["timeline", str(TINY_TRACE), "--policy", "lru,lru", "--slots", "3", "--tokens", "4", "--json"]) == 0
    assert [(r["policy"], r["slots"]) for r in json.loads(capsys.readouterr().out)["results"]] == [("lru", 3)]
