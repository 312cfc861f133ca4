"""The simulator and the runtime agree exactly: a trace recorded by `moe-offload trace` replays to the
same per-layer counts the runtime kept, with its recorded prefetch guesses too."""

import json

import pytest

from cache.simulate import simulate
from cache.trace import read_trace
from cli.app import main

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]
FIELDS = ("requests", "hits", "misses", "prefetches_issued", "prefetches_used", "prefetches_wasted", "guess_right",
          "guess_total")  # fmt: skip


@pytest.mark.parametrize(("policy", "prefetch", "replay", "mode"), [
    ("lru", "none", "none", "inclusive"), ("lru", "late", "recorded", "inclusive"),
    ("path", "late", "recorded", "inclusive"), ("lru", "late", "recorded", "exclusive"),
])  # fmt: skip
def test_replayed_trace_counts_what_the_runtime_counted(capsys, tmp_path, trained_model_dir, policy, prefetch, replay,
                                                        mode):  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n")
    out = tmp_path / "trace.jsonl"
    code = main([
        "trace", str(trained_model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "24",
        "--slots", "3", "--device", "cpu", "--policy", policy, "--prefetch", prefetch, "--cache-mode", mode,
    ])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"dataset", "problem_id", "layer", "experts", "gating_probs", "token_idx", "guess", "phase"} <= set(rows[0])
    assert {r["problem_id"] for r in rows} == {0, 1, 2}
    assert [r["phase"] for r in rows[:6]] == ["prefill"] * 6  # the prompt: one request per layer, then decode

    # the runtime's own counts, from a second identical run through the Python API
    import offload

    model = offload.load(str(trained_model_dir), device="cpu", slots=3, policy=policy, prefetch=prefetch,
                         cache_mode=mode)  # fmt: skip
    model.trace([p.replace("\n", " ") for p in PROMPTS], tmp_path / "again.jsonl", max_new_tokens=24)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()  # deterministic

    replayed = simulate(read_trace(out), policy, 3, prefetch=replay, mode=mode)
    if mode == "exclusive":  # the slots start full: replayed as inclusive, the counts differ
        assert simulate(read_trace(out), policy, 3, prefetch=replay).hits < replayed.hits
    for layer, (ours, theirs) in enumerate(zip(model.stats.cache.per_layer, replayed.stats.per_layer, strict=True)):
        assert [getattr(ours, f) for f in FIELDS] == [getattr(theirs, f) for f in FIELDS], f"layer {layer}"
    if prefetch != "none":
        assert model.stats.total.prefetches_issued > 0


def test_slots_that_differ_by_layer_replay_to_the_same_counts(planned_slots, tmp_path, trained_model_dir):
    """The planner gives the first layers one slot more when an even split leaves some over (only on
    CUDA); here the CPU runtime is handed such a plan, and its trace replays to its own counts. Inclusive
    mode only: exclusive slots keep their experts from one sequence to the next, and a replay starts
    each sequence empty (the exclusive uneven case is tests/test_expert_cache.py's)."""
    import offload

    uneven = (4, 3, 3, 2, 2, 2)
    planned_slots(uneven)
    model = offload.load(str(trained_model_dir), device="cpu", slots=3, policy="path", prefetch="late")
    assert model.cache.slots_per_layer == list(uneven)
    out = model.trace([p.replace("\n", " ") for p in PROMPTS], tmp_path / "uneven.jsonl", max_new_tokens=24)

    replayed = simulate(read_trace(out), "path", uneven, prefetch="recorded")
    assert replayed.slots == uneven and simulate(read_trace(out), "lru", (3,) * 6).slots == 3
    for layer, (ours, theirs) in enumerate(zip(model.stats.cache.per_layer, replayed.stats.per_layer, strict=True)):
        assert [getattr(ours, f) for f in FIELDS] == [getattr(theirs, f) for f in FIELDS], f"layer {layer}"
    assert model.stats.total.prefetches_issued > 0
    # layers keep apart: each counts what it counts when every layer has its number of slots
    for k in set(uneven):
        even = simulate(read_trace(out), "path", k, prefetch="recorded").stats.per_layer
        for layer in (layer for layer, count in enumerate(uneven) if count == k):
            assert replayed.stats.per_layer[layer] == even[layer], f"layer {layer}"


def test_a_trace_numbers_its_sequences_from_0_after_earlier_generations(tmp_path, trained_model_dir):
    """model.trace after other generate calls writes problem_id 0, 1, ... as `moe-offload trace` does; its
    prompts may be any iterable (they are read twice: checked, then generated)."""
    import offload

    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    model.generate("def f():", max_new_tokens=2)
    model.generate("x = 1", max_new_tokens=2)
    out = model.trace(iter(["def g():", "y = 2"]), tmp_path / "t.jsonl", max_new_tokens=2)  # any iterable
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted({row["problem_id"] for row in rows}) == [0, 1]


@pytest.mark.parametrize("reply_tokens", [6, 1])
def test_a_conversation_traced_turn_by_turn_replays_to_the_runtime_counts(tmp_path, trained_model_dir, reply_tokens):
    """Each turn prefills only what is new, into the same sequence: its prefill rows take the index of the
    last decode step before them, so the trace reads back and replays in the order the turns ran; a reply
    of one token takes no decode step, and the next turn's prefill then shares its index."""
    import offload
    from cache.trace import TraceWriter

    model = offload.load(str(trained_model_dir), device="cpu", slots=3, prefetch="late")
    messages: list[dict] = []
    with TraceWriter(tmp_path / "chat.jsonl", dataset="chat") as writer:
        model.record_trace(writer, first_sequence=model.sequence + 1)
        for turn in ("def add(a, b):", "Now a docstring."):
            messages.append({"role": "user", "content": turn})
            reply = model.generate(messages=messages, max_new_tokens=reply_tokens, temperature=0)
            messages.append({"role": "assistant", "content": reply.text})
        model.record_trace(None)
        model.cache.reset()  # the sequence ends: its unused prefetches count as wasted, as in a replay
    trace = read_trace(writer.path)
    assert model.sequence == 0 and [t.sequence for t in trace.tokens] == [0] * len(trace.tokens)
    phases = [(t.phase, t.token_idx) for t in trace.tokens]
    # 6 reply tokens take 5 decode forwards (the first comes from the prefill): turn 2 follows decode 4
    steps = reply_tokens - 1
    assert phases == [("prefill", -1), *(("decode", i) for i in range(steps)), ("prefill", steps - 1),
                      *(("decode", i) for i in range(steps, 2 * steps))]  # fmt: skip
    replayed = simulate(trace, "lru", 3, prefetch="recorded" if trace.has_guesses else "none")  # none: no decode
    for layer, (ours, theirs) in enumerate(zip(model.stats.cache.per_layer, replayed.stats.per_layer, strict=True)):
        assert [getattr(ours, f) for f in FIELDS] == [getattr(theirs, f) for f in FIELDS], f"layer {layer}"


def test_tracing_a_model_that_ran_before_in_exclusive_mode_warns(tmp_path, trained_model_dir):
    """Its slots hold what the earlier run left, not the load's experts 0..K-1 that a replay starts from."""
    import offload

    model = offload.load(str(trained_model_dir), device="cpu", slots=3, cache_mode="exclusive")
    model.trace(["def f():"], tmp_path / "fresh.jsonl", max_new_tokens=2)  # fresh from load: no warning
    with pytest.warns(UserWarning, match=r"^this model has run before, and in exclusive mode its slots"):
        model.trace(["def g():"], tmp_path / "again.jsonl", max_new_tokens=2)
