"""Exact cache behaviour the other cache tests leave open: slot numbers and victims, guess and prefetch
accounting, policy corner cases, predictor rankings, replay rules, counters and error messages."""

from __future__ import annotations

import json

import pytest
import torch

from cache.expert_cache import ExpertCache
from cache.policies import LFU, LRU, PATH_GRID, Belady, PathMatch, RoutingMemory, make_policies, make_policy
from cache.predictors import CoOccurrence
from cache.simulate import held_out, simulate, tune
from cache.stats import CacheStats, LayerStats
from cache.table import SlotTable, Step, request_order
from cache.trace import Request, TraceWriter, read_trace
from quant.errors import MoEOffloadError
from tests.test_expert_cache import EXPERTS, NBYTES, expert_bytes, make_cache, serve
from tests.test_policies import counts, path_stream, replay
from tests.test_simulate import _write
from tests.test_trace import _row

# -- ExpertCache -------------------------------------------------------------------------------------


def test_cache_mode_and_direct_device_errors():
    """The constructor's two refusals name the modes to choose from and the way out."""
    with pytest.raises(MoEOffloadError) as error:
        ExpertCache(num_layers=1, num_experts=4, expert_bytes=8, slots_per_layer=[2], mode="auto")
    assert str(error.value) == "unknown cache mode 'auto'; choose one of inclusive, exclusive"
    with pytest.raises(MoEOffloadError) as error:
        ExpertCache(num_layers=1, num_experts=4, expert_bytes=8, device="cuda")
    assert str(error.value) == "experts can be computed straight from the arena only on the CPU; set slots"


def test_write_refuses_bytes_of_another_size_or_dtype():
    """write() takes exactly expert_bytes uint8 bytes, and its error says what it got."""
    cache = make_cache(slots=2)
    with pytest.raises(ValueError) as error:
        cache.write(0, 0, torch.zeros(NBYTES, dtype=torch.float32))
    assert str(error.value) == f"expected {NBYTES} uint8 bytes, got {NBYTES} torch.float32"
    with pytest.raises(ValueError) as error:
        cache.write(0, 0, torch.zeros(NBYTES - 1, dtype=torch.uint8))
    assert str(error.value) == f"expected {NBYTES} uint8 bytes, got {NBYTES - 1} torch.uint8"


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
def test_uneven_slots_over_three_layers_keep_each_layers_slots_apart(mode):
    """A layer's slots start after the sum of the slots of the layers before it (not layer x slots[0])."""
    slots = [1, 3, 2]
    cache = ExpertCache(num_layers=3, num_experts=EXPERTS, expert_bytes=NBYTES, slots_per_layer=slots, mode=mode)
    for layer in range(3):
        for expert in range(EXPERTS):
            cache.write(layer, expert, expert_bytes(layer, expert))
    for layer, experts in [(1, [3, 4, 5]), (2, [4, 5]), (0, [2]), (1, [4, 5]), (2, [5, 4]), (1, [3])]:
        assert sorted(serve(cache, layer, experts)) == sorted(experts)  # serve() checks every buffer's bytes
    assert [(s.hits, s.misses) for s in cache.stats.per_layer] == [(0, 1), (3, 3), (2, 2)]


def test_reset_empties_inclusive_slots_and_keeps_exclusive_residents_in_their_slots():
    """Inclusive: a new sequence misses on what the last one loaded. Exclusive: each resident stays
    cold in its own slot, so it still hits and is served its own bytes."""
    inclusive = make_cache(slots=2)
    serve(inclusive, 0, [0, 1])
    inclusive.reset()
    serve(inclusive, 0, [0, 1])
    assert counts(inclusive.stats.per_layer[0]) == (0, 4)

    exclusive = make_cache(slots=2, mode="exclusive")  # slots hold 0 and 1
    assert serve(exclusive, 0, [3]) == [3]  # evicts 0 (least recently placed): slot 0 now holds 3
    exclusive.reset()
    assert serve(exclusive, 0, [1, 3]) == [1, 3]  # both hits, each read from its own slot
    layer = exclusive.stats.per_layer[0]
    assert (layer.hits, layer.misses, layer.h2d_bytes, layer.d2h_bytes) == (2, 1, NBYTES, NBYTES)


def test_settled_prefetches_are_plain_hits_neither_used_nor_wasted():
    """After settle_prefetches(), finding a prefetched expert is a hit, not a prefetch used, and a reset
    no longer counts the rest as wasted."""
    cache = make_cache(slots=3)
    cache.prefetch(0, [0, 1])
    cache.settle_prefetches()
    assert serve(cache, 0, [0]) == [0]
    cache.reset()
    layer = cache.stats.per_layer[0]
    assert (layer.hits, layer.prefetches_issued, layer.prefetches_used, layer.prefetches_wasted) == (1, 2, 0, 0)


def test_guess_is_the_pending_prefetch_until_its_request():
    """guess() is None with no pending guess, the guess in its order while pending, None once served."""
    cache = make_cache(slots=2)
    assert cache.guess(0) is None
    cache.prefetch(0, [4, 1])
    assert (cache.guess(0), cache.guess(1)) == ([4, 1], None)
    serve(cache, 0, [4])
    assert cache.guess(0) is None


def test_direct_mode_ignores_prefetches():
    """Direct mode has no slots: a prefetch loads and counts nothing, and there is no guess."""
    cache = make_cache(slots=None)
    cache.prefetch(0, [1, 2])
    assert cache.guess(0) is None
    assert cache.stats.total() == LayerStats()


# -- SlotTable ---------------------------------------------------------------------------------------


def test_table_errors():
    """A table needs a slot, and a request naming an expert twice is refused before anything is counted."""
    with pytest.raises(ValueError) as error:
        SlotTable(0, LRU())
    assert str(error.value) == "a layer needs at least one slot, got 0"
    table = SlotTable(2, LRU())
    with pytest.raises(ValueError) as error:
        table.request([3, 3])
    assert str(error.value) == "a request names an expert twice: [3, 3]"
    assert table.stats == LayerStats()


def test_free_slots_fill_in_order_and_an_overflowing_request_evicts_its_oldest_served():
    """Exact steps: misses take free slots 0, 1, ...; a third expert in two slots takes the slot of the
    first one served."""
    table = SlotTable(2, LRU())
    assert table.request([0, 1, 2]) == [Step(0, 0, False), Step(1, 1, False), Step(2, 0, False, evicted=0)]
    assert table.request([1]) == [Step(1, 1, True)]


def test_fill_puts_expert_k_in_slot_k():
    """Exclusive mode's start: experts 0..K-1 in slots 0..K-1, all hits."""
    table = SlotTable(3, LRU())
    table.fill()
    assert table.request([2, 0, 1]) == [Step(2, 2, True), Step(0, 0, True), Step(1, 1, True)]


def test_guess_counts_the_asked_experts_of_the_next_request_only():
    """guess_total counts the experts of the one request after a guess (not the guess's size), later
    requests and a reset drop the guess, and a reset forgets which prefetches were unused."""
    table = SlotTable(4, LRU())
    table.prefetch([0, 1, 2])
    table.request([0])
    assert (table.stats.guess_right, table.stats.guess_total) == (1, 1)
    table.request([1])  # no guess for this one: 1 is a hit and a prefetch used, but no recall counted
    assert (table.stats.guess_right, table.stats.guess_total) == (1, 1)
    table.prefetch([3])
    table.reset()  # 2 and 3 were never used
    table.request([3])  # a miss, its guess gone with the reset
    table.request([3])  # a plain hit: the prefetch of 3 was counted wasted, never used
    stats = table.stats
    assert (stats.guess_right, stats.guess_total) == (1, 1)
    assert (stats.prefetches_issued, stats.prefetches_used, stats.prefetches_wasted) == (4, 2, 2)
    assert (stats.hits, stats.misses) == (3, 1)


def test_a_prefetch_stops_when_only_guessed_experts_are_left():
    """A guessed expert is not loaded when every other slot holds a guessed (protected) expert."""
    table = SlotTable(3, LRU())
    table.request([0, 1])
    assert table.prefetch([0, 1, 2, 3]) == [Step(2, 2, False)]  # 3 finds 0, 1 and 2 all guessed
    assert table.prefetch([0, 1, 2, 3]) == []
    assert (table.stats.prefetches_issued, len(table.slot_of)) == (1, 3)


def test_request_order_sorts_a_chunk_by_total_gate_weight():
    """Prefill: every expert of the chunk once, by summed gate weight, highest first (ties in id order);
    decode: the router's order as is."""
    ids = torch.tensor([[0, 1], [2, 1], [1, 3]])
    weights = torch.tensor([[0.125, 0.25], [0.125, 0.25], [0.125, 0.75]])
    assert request_order(ids, weights) == ([3, 1, 0, 2], [0.75, 0.625, 0.125, 0.125])
    assert request_order(torch.tensor([[5, 2]]), torch.tensor([[0.75, 0.25]])) == ([5, 2], [0.75, 0.25])


# -- policies ----------------------------------------------------------------------------------------


def test_lfu_aging_halves_every_count_each_half_life():
    """half_life=2: counts halve at requests 2 and 4, so at request 4 expert 2 (0.25) goes, and at request
    5 expert 1 (1.0) goes before expert 0 (2.5 / 2 = 1.25)."""
    stats, evicted = replay(make_policy("lfu", half_life=2), [[0], [2], [0], [0], [1], [2]])
    assert counts(stats) == (2, 4) and evicted == [None, None, None, None, 2, 1]


def test_lfu_counts_a_prefetch_as_a_use_for_ties():
    """A prefetched expert has count 0 (lower than any asked-for one); among prefetches the one placed
    first is the least recently used."""
    table = SlotTable(2, make_policy("lfu"))
    table.request([0])
    table.prefetch([1])
    assert table.request([2]) == [Step(2, 1, False, evicted=1)]
    table = SlotTable(2, make_policy("lfu"))
    table.prefetch([1, 2])
    assert table.request([3]) == [Step(3, 0, False, evicted=1)]


def test_lfu_half_life_must_not_be_negative():
    """half_life=0 means no aging; below it is refused, naming the value."""
    with pytest.raises(ValueError) as error:
        LFU(half_life=-1)
    assert str(error.value) == "half_life must be >= 0, got -1"


def test_belady_ties_go_to_slot_order():
    """Two experts never used again: the one in the lower slot goes, whatever order they came in."""
    requests = [[0], [1], [2], [3]]
    _, evicted = replay(make_policy("belady", futures=[requests]), requests)
    assert evicted == [None, None, 0, 2]  # at [3], 2 sits in slot 0 and 1 in slot 1


def test_belady_evicts_an_expert_its_future_never_names_first():
    """A prefetched expert beyond every id in the future is evicted before one needed again."""
    table = SlotTable(2, Belady(futures=[[[0], [1], [0]]]))
    table.reset()
    table.request([0])
    table.prefetch([5])
    assert table.request([1]) == [Step(1, 1, False, evicted=5)]
    assert table.request([0]) == [Step(0, 0, True)]
    assert (table.stats.prefetches_issued, table.stats.prefetches_wasted) == (1, 1)


def test_belady_sequence_errors():
    """Belady needs reset() before its first victim, and one future per sequence."""
    belady = Belady(futures=[[[0]]])
    with pytest.raises(RuntimeError) as error:
        belady.victim([0], 0)
    assert str(error.value) == "Belady.reset() must be called before the first sequence"
    belady.reset()
    with pytest.raises(RuntimeError) as error:
        belady.reset()
    assert str(error.value) == "Belady was given 1 sequences, asked for another"


def _path_run(tokens, presized: bool, **params) -> tuple[list[str], list[list[float]]]:
    """PathMatch on two layers: each layer's victims, and layer 1's scores of every expert once each token's
    layer 0 is served. `presized`: the memory and `soon` tables are made large enough up front, so nothing
    grows mid-sequence."""
    policies = make_policies("path", num_layers=2, num_experts=8, **params)
    if presized:
        memory = RoutingMemory(2, 8, capacity=2 * len(tokens))
        for layer, policy in enumerate(policies):
            policy.bind(layer, memory)
    tables = [SlotTable(3, policy) for policy in policies]
    for table in tables:
        table.reset()
    if presized:
        for policy in policies:
            policy._grow(2 * len(tokens), 8)
    victims, scores = ["", ""], []
    for token in tokens:
        for layer, table in enumerate(tables):
            if layer == 1:
                scores.append(table.policy._scores(table.t, range(8)))
            victims[layer] += "".join(str(s.evicted) for s in table.request(token[layer]) if s.evicted is not None)
    return victims, scores


@pytest.mark.parametrize("params", [{}, {"context": 0.5, "recency": 1.0}])
def test_path_victims_do_not_change_when_its_tables_grow(params):
    """Past 256 tokens PathMatch's `soon` table grows, past 512 the shared RoutingMemory does: what they
    held is kept, so victims and scores equal those of tables sized for the whole sequence from the start."""
    tokens = path_stream(600)
    victims, scores = _path_run(tokens, presized=False, **params)
    assert (victims, scores) == _path_run(tokens, presized=True, **params)
    assert len(victims[0]) > 100 and len(victims[1]) > 100


def test_path_victims_do_not_change_when_an_expert_id_widens_its_tables():
    """An unbound PathMatch starts with 8 experts; ids up to 11 widen its tables and its memory without
    losing what they held: the victims equal those of a policy made for 12 experts."""
    tokens = [[(t * 5) % 12, (t * 7 + 3) % 12] if t % 4 else [t % 12, (t + 1) % 12] for t in range(120)]
    tokens = [pair if pair[0] != pair[1] else [pair[0], (pair[0] + 1) % 12] for pair in tokens]

    def victims(policy) -> str:
        table = SlotTable(4, policy)
        table.reset()
        return "".join(f"{s.evicted}," for request in tokens for s in table.request(request) if s.evicted is not None)

    widened = victims(PathMatch())
    assert widened == victims(make_policies("path", num_layers=1, num_experts=12)[0])
    assert any(int(e) >= 8 for e in widened.split(",")[:-1])


# -- predictors --------------------------------------------------------------------------------------


def test_cooccur_ranks_by_gate_weighted_share_with_a_previous_token_fallback():
    """Exact guesses: gate-weighted conditional shares, ties to the lower id, k = the layer below's
    count, the previous token's experts as rank-weighted fallback, counts kept across sequences."""
    predictor = CoOccurrence()
    history = [((0,), (2,)), ((0,), (5,)), ((1,), (4, 3)), ((1,), (4, 3))]  # layer 0 -> layer 1
    for below, above in history:
        predictor.observe(0, Request(below, (1.0,)))
        predictor.observe(1, Request(above, (0.5,) * len(above)))

    def guess(experts, weights):
        return predictor.guess(1, [Request(experts, weights)], None)

    # P(2|0) = P(5|0) = 1/2, P(4|1) = P(3|1) = 1: weighted 0.45, 0.45 beat 0.1 + prior 0.1 and 0.1 + 0.05
    assert guess((0, 1), (0.9, 0.1)) == [2, 5]
    assert guess((1, 0), (0.25, 0.75)) == [2, 5]  # 0.375 each against 0.25 + 0.1 and 0.25 + 0.05
    assert guess((6, 7), (0.5, 0.5)) == [4, 3]  # nothing learned for 6 and 7: the previous token, in order
    predictor.reset()
    assert guess((0, 1), (0.9, 0.1)) == [2, 5]  # the counts stay
    assert guess((6, 7), (0.5, 0.5)) is None  # the previous token does not


def _two_sequences(path, tokens_per_sequence: int = 2):
    """Two sequences of identical decode tokens: layer 0 [0, 1], layer 1 [2, 3]."""
    with TraceWriter(path) as writer:
        for sequence in (0, 1):
            for token_idx in range(tokens_per_sequence):
                writer.record(sequence, token_idx, 0, [0, 1], [0.5, 0.5], None)
                writer.record(sequence, token_idx, 1, [2, 3], [0.5, 0.5], None)
    return read_trace(path)


def test_prev_token_forgets_the_last_sequence(tmp_path):
    """A sequence's first token gets no prev-token guess: one guessed token a sequence, 2 experts, all right."""
    total = simulate(_two_sequences(tmp_path / "t.jsonl"), "lru", 4, prefetch="prev-token").stats.total()
    assert (total.guess_right, total.guess_total) == (4, 4)


# -- the simulator -----------------------------------------------------------------------------------


def test_prefill_is_neither_guessed_nor_observed(tmp_path):
    """A prefill chunk between two decode tokens: no guess is made for it, and the next decode token's
    prev-token guess is the previous decode token's experts, not the chunk's."""
    none = [None, None]
    tokens = [
        ("decode", [[0, 1], [2, 3]], none),
        ("prefill", [[4, 5, 6], [5, 6, 7]], none),
        ("decode", [[0, 1], [2, 3]], none),
    ]
    trace = read_trace(_write(tmp_path / "t.jsonl", tokens))
    total = simulate(trace, "lru", 8, prefetch="prev-token").stats.total()
    assert (total.guess_right, total.guess_total, total.prefetches_issued) == (2, 2, 0)


def test_a_prefetch_unused_at_the_end_of_the_run_is_wasted(tmp_path):
    """The last token's guess loads 5, which no request uses: issued 1, used 0, wasted 1."""
    trace = read_trace(_write(tmp_path / "t.jsonl", [("decode", [[0, 1], [2, 3]], [None, [5]])]))
    layer1 = simulate(trace, "lru", 4, prefetch="recorded").stats.per_layer[1]
    assert (layer1.prefetches_issued, layer1.prefetches_used, layer1.prefetches_wasted) == (1, 0, 1)


def test_exclusive_replay_keeps_the_slots_across_sequences(tmp_path):
    """Exclusive: the slots start with 0..K-1 and keep their experts into the next sequence; inclusive
    starts every sequence empty."""
    with TraceWriter(tmp_path / "t.jsonl") as writer:
        writer.record(0, 0, 0, [2], [1.0], None)  # evicts 0, the least recently placed
        writer.record(1, 0, 0, [2], [1.0], None)
    trace = read_trace(tmp_path / "t.jsonl")
    exclusive = simulate(trace, "lru", 2, mode="exclusive")
    assert (exclusive.hits, exclusive.misses, exclusive.mode) == (1, 1, "exclusive")
    assert (simulate(trace, "lru", 2).hits, simulate(trace, "lru", 2).misses) == (0, 2)


def test_sim_result_row(tmp_path):
    """to_dict's row, every field exact: counts of the whole run, the mode, and the tokens replayed.

    Exclusive, 2 slots holding 0 and 1. Layer 1, token 0: the guess [2, 5] loads both over 0 and 1; 2 hits
    (used), 3 misses over 5 (wasted). Token 1: the guess [2, 4] loads 4 over 3; both hit (4 used)."""
    tokens = [("decode", [[0, 1], [2, 3]], [None, [2, 5]]), ("decode", [[0, 1], [2, 4]], [None, [2, 4]])]
    result = simulate(read_trace(_write(tmp_path / "t.jsonl", tokens)), "lru", 2, prefetch="recorded", mode="exclusive")
    assert result.to_dict() == {
        "policy": "lru", "slots": 2, "prefetch": "recorded", "mode": "exclusive", "hit_rate": 0.875, "hits": 7,
        "requests": 8, "misses": 1, "tokens": 2, "prefetches_issued": 3, "prefetches_used": 2,
        "prefetches_wasted": 1, "recall": 0.75,
    }  # fmt: skip


def test_tune_keeps_the_first_grid_point_on_a_tie(tmp_path):
    """Every point scores 0 hits here: tune returns the first point, not the last or none."""
    tokens = [("decode", [[t]], [None]) for t in range(4)]
    trace = read_trace(_write(tmp_path / "t.jsonl", tokens))
    assert tune(trace, "path", 1, {"mix": [0.5, 0.7], "gamma": [0.5, 0.7]}) == ({"mix": 0.5, "gamma": 0.5}, 0.0)


def test_held_out_needs_two_sequences(tmp_path):
    """Held-out tuning of a one-sequence trace is refused, not run on an empty tuning set."""
    path = _write(tmp_path / "t.jsonl", [("decode", [[0, 1]], [None])])
    with pytest.raises(MoEOffloadError) as error:
        held_out(read_trace(path), "path", 2, PATH_GRID)
    assert str(error.value) == f"trace {path} has one sequence: held-out tuning needs two or more"


# -- counters ----------------------------------------------------------------------------------------


def test_layer_stats_rates_differences_and_dicts():
    """hit_rate of nothing is 0, recall without guesses None; `-` subtracts each field; to_dict rounds
    both rates to 6 places."""
    assert (LayerStats().hit_rate, LayerStats().recall) == (0.0, None)
    now = LayerStats(requests=3, hits=1, misses=2, guess_right=1, guess_total=3, stall_s=0.75, h2d_bytes=80)
    before = LayerStats(requests=1, hits=1, stall_s=0.25, h2d_bytes=40)
    assert now - before == LayerStats(requests=2, hits=0, misses=2, guess_right=1, guess_total=3, stall_s=0.5,
                                      h2d_bytes=40)  # fmt: skip
    row = now.to_dict()
    assert (row["hit_rate"], row["recall"], row["stall_s"]) == (0.333333, 0.333333, 0.75)


def test_cache_stats_dict_has_totals_on_top_and_every_layer_below():
    """Totals (every field summed, stall time included) at the top level, then each layer's own."""
    layers = [LayerStats(requests=2, hits=1, misses=1, stall_s=0.5), LayerStats(requests=2, hits=2, stall_s=0.25)]
    stats = CacheStats(layers)
    assert stats.total().stall_s == 0.75
    payload = stats.to_dict()
    assert (payload["requests"], payload["hits"], payload["hit_rate"], payload["stall_s"]) == (4, 3, 0.75, 0.75)
    assert payload["per_layer"] == [layers[0].to_dict(), layers[1].to_dict()]


# -- traces ------------------------------------------------------------------------------------------


def _lines(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n")
    return path


def test_replay_order_of_sequences_decodes_and_prefill_rounds(tmp_path):
    """Sequences in order of first appearance (not by id); in one, by token_idx, the decode step before
    the prefills that follow it, and two prefills of one token_idx in file order. Blank lines are skipped."""
    path = _lines(tmp_path / "t.jsonl", [
        _row(5, 0, 0, [1, 2, 3], phase="prefill"),
        _row(5, 0, 0, [1]),
        "",
        _row(2, 0, 0, [4]),
        "   ",
        _row(5, 0, 0, [6, 7], phase="prefill"),  # a second turn prefilled at the same token_idx
        _row(5, -1, 0, [0], phase="prefill"),
    ])  # fmt: skip
    trace = read_trace(path)
    assert [(t.sequence, t.token_idx, t.phase, t.layers[0].experts) for t in trace.tokens] == [
        (5, -1, "prefill", (0,)),
        (5, 0, "decode", (1,)),
        (5, 0, "prefill", (1, 2, 3)),
        (5, 0, "prefill", (6, 7)),
        (2, 0, "decode", (4,)),
    ]
    assert trace.sequence_ids == [5, 2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (json.dumps({"problem_id": 0, "layer": True, "token_idx": 0, "experts": [1], "gating_probs": [1.0]}),
         "field 'layer' is missing or not an integer; fix or remove the line"),
        (json.dumps({"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [True, 1], "gating_probs": [0.5, 0.5]}),
         "'experts' must be integers from 0 to 4095, got [True, 1]"),
        (json.dumps({"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [], "gating_probs": []}),
         "'experts' must be integers from 0 to 4095, got []"),
        (json.dumps({"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": ["a", 0.5]}),
         "'gating_probs' must hold one number per expert, got ['a', 0.5]"),
    ],
)  # fmt: skip
def test_bad_values_the_type_checks_must_catch(tmp_path, line, message):
    """Booleans are no integers, a row names at least one expert, and gate weights are numbers."""
    path = _lines(tmp_path / "t.jsonl", [_row(0, 0, 0, [1, 2]), line])
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path)
    assert str(error.value) == f"{path} line 2: {message}"


def test_a_trace_with_no_rows(tmp_path):
    """A file of blank lines holds no rows, and the error says how to record one."""
    path = _lines(tmp_path / "t.jsonl", ["", " "])
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path)
    assert str(error.value) == f"trace {path} holds no rows: record one with `moe-offload trace`"


def test_longest_decode_takes_the_sequence_with_most_decode_tokens_and_checks_each_row(tmp_path):
    """The longest sequence's decode tokens (its prefill left out); every one of its rows must name top_k
    experts; a trace with no decode token is refused."""
    rows = [_row(0, 0, 0, [1, 2]), _row(1, -1, 0, [1, 2, 3], phase="prefill"), _row(1, 0, 0, [3, 4])]
    path = _lines(tmp_path / "t.jsonl", [*rows, _row(1, 1, 0, [5])])
    tokens = read_trace(path).longest_decode(1)
    assert [(t.sequence, t.token_idx, t.layers[0].experts) for t in tokens] == [(1, 0, (3, 4)), (1, 1, (5,))]
    with pytest.raises(MoEOffloadError) as error:
        read_trace(path).longest_decode(2)
    assert str(error.value) == f"trace {path} has a decode row with fewer than 2 experts"
    prefill_only = _lines(tmp_path / "p.jsonl", [rows[1]])
    with pytest.raises(MoEOffloadError) as error:
        read_trace(prefill_only).longest_decode(2)
    assert str(error.value) == f"trace {prefill_only} has no decode tokens to replay"


def test_select_keeps_the_recorded_guesses(tmp_path):
    """A selected sequence still replays its recorded guesses (held-out tuning with --prefetch recorded)."""
    with TraceWriter(tmp_path / "t.jsonl") as writer:
        for sequence in (0, 1):
            writer.record(sequence, 0, 0, [0, 1], [0.5, 0.5], None)
            writer.record(sequence, 0, 1, [2, 3], [0.5, 0.5], [2, 6])
    trace = read_trace(tmp_path / "t.jsonl")
    total = simulate(trace.select([1]), "lru", 4, prefetch="recorded").stats.total()
    assert (total.guess_right, total.guess_total, total.prefetches_issued) == (1, 2, 2)


def test_trace_writer_checks_and_counts_rows(tmp_path):
    """record() refuses a bad phase, mismatched weights and a closed writer, each in its own words;
    `rows` counts the rows written."""
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    with pytest.raises(ValueError) as error:
        writer.record(0, 0, 0, [1, 2], [0.5, 0.5], None, phase="warmup")
    assert str(error.value) == "phase must be 'prefill' or 'decode', got 'warmup'"
    with pytest.raises(ValueError) as error:
        writer.record(0, 0, 0, [1, 2], [1.0], None)
    assert str(error.value) == "2 experts but 1 gate weights"
    writer.record(0, 0, 0, [1, 2], [0.5, 0.5], None)
    writer.record(0, 0, 1, [3], [1.0], [3])
    assert writer.rows == 2
    writer.close()
    with pytest.raises(RuntimeError) as error:
        writer.record(0, 1, 0, [1], [1.0], None)
    assert str(error.value) == f"TraceWriter for {path} is already closed"
    assert len(path.read_text().splitlines()) == 2
