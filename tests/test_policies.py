"""Each policy's decisions on small hand-made request streams, with exact hit and miss counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache.policies import POLICIES, Belady, PathMatch, descending_powers, make_policies, make_policy
from cache.simulate import simulate
from cache.stats import LayerStats
from cache.table import SlotTable
from cache.trace import TraceWriter, read_trace
from quant.errors import MoEOffloadError

SHARED_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct_humaneval_routing.jsonl"
)


def replay(policy, requests, slots=2):
    """Serve `requests` on one layer; returns (stats, the expert each request evicted, or None)."""
    table = SlotTable(slots, policy)
    table.reset()
    evicted = []
    for request in requests:
        steps = table.request(request)
        evicted.append(next((s.evicted for s in steps if s.evicted is not None), None))
    return table.stats, evicted


def counts(stats: LayerStats) -> tuple[int, int]:
    return stats.hits, stats.misses


def test_fifo_ignores_hits():
    requests = [[0], [1], [0], [2], [0], [1]]
    # FIFO: the hit on 0 does not save it; [2] evicts 0 (first in), [0] evicts 1, [1] evicts 2
    stats, evicted = replay(make_policy("fifo"), requests)
    assert counts(stats) == (1, 5) and evicted == [None, None, None, 0, 1, 2]
    # LRU on the same stream: the hit on 0 makes 1 the victim, so the second [0] hits
    stats, evicted = replay(make_policy("lru"), requests)
    assert counts(stats) == (2, 4) and evicted == [None, None, None, 1, None, 2]


def test_lfu_counts_and_tie_break():
    stats, evicted = replay(make_policy("lfu"), [[0], [0], [1], [2], [0]])
    assert counts(stats) == (2, 3) and evicted[3] == 1  # 0 was asked for twice, 1 once
    stats, evicted = replay(make_policy("lru"), [[0], [0], [1], [2], [0]])
    assert counts(stats) == (1, 4) and evicted[3] == 0
    # ties go to the least recently used
    stats, evicted = replay(make_policy("lfu"), [[0], [1], [2], [0]])
    assert counts(stats) == (0, 4) and evicted == [None, None, 0, 1]


def test_lfu_aging_halves_counts():
    requests = [[0], [0], [0], [0], [1], [1], [2], [0]]
    # no aging: 0 (4 uses) outlives 1 (2 uses), so [2] evicts 1 and the last [0] hits
    stats, evicted = replay(make_policy("lfu"), requests)
    assert counts(stats) == (5, 3) and evicted[6] == 1
    # half_life=2: by request 6 expert 0's count has been halved to 1.5 < 2, so [2] evicts 0;
    # the last [0] then finds 1 and 2 tied at 1 and evicts the less recent, 1
    stats, evicted = replay(make_policy("lfu", half_life=2), requests)
    assert counts(stats) == (4, 4) and evicted[6] == 0 and evicted[7] == 1


def test_belady_next_use_table_and_decisions():
    future = [[0, 1], [2], [0], [3, 1]]
    assert Belady._table(future) == [[0, 0, 1, 3], [2, 3, 1, 3], [2, 3, 4, 3], [4, 3, 4, 3], [4, 4, 4, 4]]
    requests = [[0], [1], [2], [0], [1]]
    # at [2], 0 is needed at request 3 and 1 at request 4: Belady evicts 1; LRU evicts 0
    stats, evicted = replay(make_policy("belady", futures=[requests]), requests)
    assert counts(stats) == (1, 4) and evicted[2] == 1
    stats, _ = replay(make_policy("lru"), requests)
    assert counts(stats) == (0, 5)


def test_belady_two_expert_requests():
    requests = [[0, 1], [2, 3], [0, 2], [1, 3], [0, 1]]
    # 3 slots. [2,3]: 2 fills the free slot, 3 evicts 1 (next use 3) over 0 (next use 2).
    # [0,2] hits both. [1,3]: 3 hits, 1 evicts 2 (never again) over 0. [0,1] hits both: 5 and 5.
    stats, evicted = replay(make_policy("belady", futures=[requests]), requests, slots=3)
    assert counts(stats) == (5, 5) and evicted == [None, 1, None, 2, None]


def test_factory_errors():
    with pytest.raises(MoEOffloadError, match="^--policy 'mru' is unknown: choose one of lru, fifo, lfu, path, belady"):
        make_policy("mru")
    with pytest.raises(MoEOffloadError, match="^--policy 'belady' is offline .*only `moe-offload simulate`"):
        make_policy("belady")
    with pytest.raises(MoEOffloadError, match=r"policy 'lru' does not take parameters \['decay'\]"):
        make_policy("lru", decay=0.5)


def test_make_policies_share_one_memory():
    policies = make_policies("path", num_layers=3, num_experts=8)
    assert [p.layer for p in policies] == [0, 1, 2]
    assert policies[0].memory is policies[2].memory


def test_path_follows_what_came_after_similar_tokens(tmp_path):
    # Token types cycle 0,1,2 at layer 0; layer 1 needs expert 5, 6, 7 for types 0, 1, 2.
    path = tmp_path / "cycle.jsonl"
    with TraceWriter(path) as writer:
        for token in range(9):
            writer.record(0, token, 0, [token % 3], [1.0], None)
            writer.record(0, token, 1, [5 + token % 3], [1.0], None)
    trace = read_trace(path)
    params = {"sharpness": 16.0, "context": 0.0, "recency": 1.0, "gamma": 0.7, "mix": 0.7, "decay": 0.95}
    # With 2 slots, LRU always evicts the expert the cycle needs next: no hits at layer 1.
    assert simulate(trace, "lru", 2).stats.per_layer[1].hits == 0
    # path, token 3 (type 0) misses on 5 with 6 and 7 cached: the only earlier type-0 token, 0, was
    # followed by 6 (1 token later, vote 1) and 7 (2 later, vote 0.7), so it evicts 7, not 6 (LRU's
    # choice). Token 4 (needs 6) then hits. From there it alternates: misses at 0-3, 5, 7; hits at 4, 6, 8.
    layer1 = simulate(trace, "path", 2, **params).stats.per_layer[1]
    assert counts(layer1) == (3, 6)


def test_reset_forgets_everything():
    """Replaying the whole trace equals replaying its two problems apart, for every policy."""
    trace = read_trace(SHARED_TRACE)
    for name in POLICIES:
        whole = simulate(trace, name, 4).stats.total().hits
        apart = sum(simulate(trace.select([p]), name, 4).stats.total().hits for p in (0, 1))
        assert whole == apart, name


# Three token kinds, each with its own expert pair at layers 0 and 1; some tokens leave their
# kind's path at one layer, so similarity is graded, not all-or-nothing.
PATH_KINDS = [((0, 1), (2, 3)), ((4, 5), (6, 7)), ((0, 6), (3, 5))]


def path_stream(num_tokens: int = 48) -> list[list[tuple[int, int]]]:
    """[token][layer] -> the experts of that request, in router order."""
    tokens = []
    for t in range(num_tokens):
        path = list(PATH_KINDS[(t * t + t // 3) % 3])
        if t % 5 == 4:
            path[1] = ((3 * t) % 8, (3 * t + 1 + t % 3) % 8)
        if t % 7 == 6:
            path[0] = (t % 8, (t + 2) % 8)
        tokens.append(path)
    return tokens


def replay_layers(name: str, tokens, slots: int = 3, **params):
    """Serve `tokens` on two layers sharing one RoutingMemory; returns (tables, each layer's victims)."""
    policies = make_policies(name, num_layers=2, num_experts=8, **params)
    tables = [SlotTable(slots, policy) for policy in policies]
    for table in tables:
        table.reset()
    victims = ["", ""]
    for token in tokens:
        for layer, table in enumerate(tables):
            victims[layer] += "".join(str(s.evicted) for s in table.request(token[layer]) if s.evicted is not None)
    return tables, victims


@pytest.mark.parametrize("table_limit", [PathMatch.table_limit, 0])  # 0: every weight by the plain formula
@pytest.mark.parametrize(
    "params, victims",
    [
        ({}, ["01456107456104516345621564361", "2347562347621576501262657023756242"]),
        (
            {"context": 0.5, "recency": 1.0, "gamma": 0.7, "mix": 0.7},
            ["0145610746104516345621564361", "23475623476215756012626530727523462"],
        ),
        (
            {"sharpness": 8.0, "context": 0.5, "decay": 0.8},
            ["0145610746105416345621564361", "2347562476512765012626530727523462"],
        ),
    ],
)
def test_path_victims_are_pinned(params, victims, table_limit, monkeypatch):
    """PathMatch's exact victims on a two-layer stream, pinned from the code before its host-time
    work (commit ea387f9), which computed every score with whole-vector numpy.

    Each of these changes flips some victim here: sharpness ignored or doubled, the `soon` discount
    off by one token or written from the wrong end, similarity taken from the wrong layer, recency
    reversed, no frequency decay, context ignored, mix swapped, ties broken the other way.
    """
    monkeypatch.setattr(PathMatch, "table_limit", table_limit)
    _, got = replay_layers("path", path_stream(), **params)
    assert got == victims
    _, lru = replay_layers("lru", path_stream())
    assert lru != victims  # the stream is one where path's memory matters


def test_path_scores_are_pinned():
    """Layer 1's scores while token 48 is halfway served (layer 0 done), pinned from the same code:
    sharpness, context and the `soon` discount move them even where no victim changes."""
    tables, _ = replay_layers("path", path_stream(), sharpness=8.0, context=0.5, decay=0.8)
    tables[0].request((4, 5))
    scores = tables[1].policy._scores(tables[1].t, range(8))
    expected = [0.01702203, 0.00745527, 0.13780809, 0.44005096, 0.09860452, 0.43123347, 0.42647449, 0.31728372]
    assert scores == pytest.approx(expected, abs=1e-8)


# PathMatch looks up what the plain formula computes. The lookups equal it bit for bit only because
# numpy's elementwise power and exp do not depend on an element's place in the array: check that here.


@pytest.mark.parametrize("base", [0.5, 0.7, 0.95, 0.98])
def test_descending_powers_equal_a_fresh_power(base):
    table = descending_powers(base, 600)
    for k in range(601):
        assert np.array_equal(table[600 - k :], base ** np.arange(k - 1, -1, -1)), k


@pytest.mark.parametrize("sharpness", [16.0, 8.0, 3.7])
def test_weight_table_equals_the_plain_formula(sharpness):
    rng = np.random.default_rng(0)
    for shared in range(1, 70):
        table = PathMatch(sharpness=sharpness, recency=1.0)._weight_table(shared)  # float32: no conversion
        assert np.array_equal(PathMatch(sharpness=sharpness)._weight_table(shared), table.astype(np.float64))
        for num_earlier in (1, 7, 100, 333):
            similarity = rng.integers(0, shared + 1, num_earlier)
            share = similarity.astype(np.float32) / shared
            plain = np.exp(sharpness * (share - share.max()))
            looked_up = table[similarity.max()].take(similarity)
            assert looked_up.dtype == plain.dtype and np.array_equal(looked_up, plain), (shared, num_earlier)
