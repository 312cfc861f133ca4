"""The static decode path (offload/decoder.py, offload/graphs.py) on the CPU, run eagerly as its graphs'
first run is: it must equal the eager path in logits, in every cache decision and in the trace, and make
no tensor outside the pieces that CUDA graphs capture. tests/test_cuda.py replays the graphs themselves."""

from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import offload
from offload.bench import ReplayedRouting
from offload.graphs import DecodeGraphs, key_range
from tests.test_allocations import FreshTensors
from tests.test_offload_oracle import DECODE, PROMPT, Recorder
from tests.test_offload_oracle import run_teacher_forced as teacher_forced
from tests.tiny import hf_model, make_tiny_mixtral

SHAPES = {
    "gqa-8x2": dict(seed=0),
    "mqa-6x2-window": dict(hidden=64, intermediate=128, heads=4, kv_heads=1, experts=6, sliding_window=6, seed=2),
    "tied-5x2": dict(hidden=64, intermediate=64, heads=2, kv_heads=2, experts=5, tie=True, seed=3),
}


class CountedGraphs(DecodeGraphs):
    """Eager, like DecodeGraphs(capture=False), counting each piece's first runs and later runs, and
    pausing `fresh` (if set) inside the pieces: what they make lives in a graph's pool on CUDA."""

    def __init__(self) -> None:
        super().__init__(capture=False)
        self.first: list = []
        self.runs = 0
        self.fresh: FreshTensors | None = None

    def run(self, key, fn) -> None:
        self.runs += 1
        if key not in self.first:
            self.first.append(key)
        if self.fresh is None:
            fn()
            return
        with torch.utils._python_dispatch._disable_current_modes():
            fn()


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    shape = SHAPES[request.param]
    path = make_tiny_mixtral(tmp_path_factory.mktemp(request.param), **shape)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(shape["seed"]))
    with torch.no_grad():
        expected = hf_model(path)(tokens[None]).logits[0]
    return path, shape, tokens, expected


def load(path, graphs: DecodeGraphs | None, **options):
    model = offload.load(str(path), device="cpu", **options)
    model.decoder.graphs = graphs
    recorder = Recorder()
    model.record_trace(recorder)
    return model, recorder


def test_key_ranges_double_from_256_up_to_the_context():
    assert [key_range(n, 4096) for n in (1, 256, 257, 600, 4096)] == [256, 256, 512, 1024, 4096]
    assert key_range(10, 100) == 100  # never past the KV cache


@pytest.mark.parametrize("prefetch", ["none", "early", "late", "both"])
@pytest.mark.parametrize("slots", [1, 3])
def test_static_path_equals_the_eager_one_and_transformers(case, prefetch, slots):
    path, shape, tokens, expected = case
    assert_static_equals_eager(path, tokens, slots=slots, prefetch=prefetch)
    if slots == 1 and prefetch == "none":  # unquantized: the oracle too
        full, _ = load(path, CountedGraphs(), slots=slots, prefetch=prefetch)
        assert (teacher_forced(full, tokens) - expected).abs().max().item() < 1e-4


def test_static_path_with_nf4_attention_equals_the_eager_one(case):
    """NF4 attention dequantizes in tiles into the workspace, its lookup table and buffers made in a piece's
    first (eager) run: on CUDA the capture after it then needs no host-to-device copy."""
    path, _, tokens, _ = case
    static = assert_static_equals_eager(path, tokens, attn_bits="4", attn_quant="bnb", slots=1, prefetch="late")
    assert static.info()["attention"] == "bitsandbytes NF4, block 64"
    assert any(key[0] == "nf4.pairs" for key in static.decoder.workspace._buffers)


@pytest.mark.parametrize(("prefetch", "ahead"), [("late", 2), ("both", 3)])
def test_static_path_guessing_layers_ahead_equals_the_eager_one(tmp_path, prefetch, ahead):
    """Every guess of a layer's output (up to `ahead` layers) in its guess graph, read back with one copy."""
    path = make_tiny_mixtral(tmp_path / "m", layers=4, seed=4)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(4))
    static = assert_static_equals_eager(path, tokens, slots=2, prefetch=prefetch, prefetch_ahead=ahead)
    assert static.stats.total.prefetches_issued > 0


def assert_static_equals_eager(path, tokens, **options):
    """Teacher-force `tokens` through the eager and the static path; they must agree in everything."""
    eager, eager_trace = load(path, None, expert_bits="2", **options)
    graphs = CountedGraphs()
    static, static_trace = load(path, graphs, expert_bits="2", **options)
    want, got = teacher_forced(eager, tokens), teacher_forced(static, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 rounding, nothing more
    assert static.stats.cache.to_dict() == eager.stats.cache.to_dict()  # every hit, miss, load and guess
    # the same requests; gate weights to float32 rounding (masked attention sums in another order)
    probs = [row.pop("gating_probs") for rows in (static_trace.rows, eager_trace.rows) for row in rows]
    assert static_trace.rows == eager_trace.rows
    half = len(probs) // 2
    for mine, theirs in zip(probs[:half], probs[half:], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    layers, k = static.config.num_layers, static.config.top_k
    # per layer "attention" and k experts, then "guess" where the prefetcher guesses at the output on the device (a
    # layer before the last); "head"
    guesses = layers - 1 if static.moe.prefetcher is not None and static.moe.prefetcher.late else 0
    assert sum(static.moe.guesses_late(layer) for layer in range(layers)) == guesses
    assert graphs.runs == DECODE * ((1 + k) * layers + guesses + 1)
    # one key range (256) and one prefetcher: one set of pieces, and experts keyed by slot row and place
    expert_keys = [key for key in graphs.first if key[0] == "expert"]
    assert len(graphs.first) - len(expert_keys) == layers + guesses + 1
    rows = {row.data_ptr() for row in static.cache.slot_rows}
    assert {key[1] for key in expert_keys} <= rows and {key[2] for key in expert_keys} == set(range(k))
    return static


CHANGES = {
    "prefetcher": lambda model: model.set_prefetch("early"),  # the late guess's graphs would go on guessing late
    "routing": lambda model: setattr(model.moe, "routing", FixedRouting()),  # graphs read the old one's weights
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_new_prefetcher_or_routing_drops_the_graphs(case, change):
    path, *_ = case
    graphs = CountedGraphs()
    model, _ = load(path, graphs, slots=2, prefetch="late")
    model.reset()
    model.forward(torch.tensor([5, 6, 7]), 0)
    model.forward(torch.tensor([8]), 3)
    graphs.graphs["marker"] = None  # what a capture would have left
    model.forward(torch.tensor([9]), 4)
    assert "marker" in graphs.graphs
    CHANGES[change](model)
    model.forward(torch.tensor([10]), 5)
    assert "marker" not in graphs.graphs


@pytest.mark.parametrize("routing", ["router", "replayed"])
def test_outside_the_graphs_a_decode_step_makes_no_tensor(tmp_path, routing):
    """With prefetch `both` (both guesses in the graphs), loading on misses: the host's part of a step, the
    experts included, makes nothing; what the graphs' pieces make lives in their pool."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=2, experts=4, seed=3)
    graphs = CountedGraphs()
    model, _ = load(tiny, graphs, expert_bits="2", slots=2, prefetch="both")
    if routing == "replayed":
        model.moe.routing = FixedRouting()
    model.reset()
    model.forward(torch.tensor([5, 6, 7]), 0)
    token = torch.tensor([8])
    for pos in range(3, 6):  # the first step runs each piece for the first time; then the buffers exist
        model.forward(token, pos)
    misses = model.stats.total.misses
    graphs.fresh = FreshTensors()
    with graphs.fresh as fresh:
        for pos in range(6, 10):
            logits = model.forward(token, pos, copy=False)  # the graphs' buffer, as bench reads it
            torch.argmax(logits[-1], dim=-1, keepdim=True, out=token)  # as bench samples
    assert fresh.made == {}
    assert model.stats.total.misses > misses  # the steps did load experts


class AttentionBackends(TorchDispatchMode):
    """The kernel SDPA picks for each of its calls inside it (torch's own choice, asked with the call's arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.picked: list[SDPBackend] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten.scaled_dot_product_attention:
            self.picked.append(SDPBackend(torch._fused_sdp_choice(*args, **kwargs)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("path_", ["eager", "static"])
def test_a_decode_steps_attention_runs_sdpas_fused_kernel(case, path_):
    """A decode step's one query meets its key heads' keys as they are (offload.decoder.one_query_attention):
    SDPA's fused kernel, on the CPU as on CUDA, where the math kernel would repeat the keys and values for every
    query head in float32 (the static step's masked call and a T4's took it; 192 MiB a layer at 4096 keys)."""
    path, shape, tokens, _ = case
    model, _ = load(path, CountedGraphs() if path_ == "static" else None, slots=2)
    model.reset()
    model.forward(tokens[:4], 0)
    with AttentionBackends() as attention:
        for pos in range(4, 7):
            model.forward(tokens[pos : pos + 1], pos)
    assert attention.picked == [SDPBackend.FLASH_ATTENTION] * (3 * model.config.num_layers)  # the CPU's fused one


def test_graphs_capture_on_a_stream_of_their_own(monkeypatch):
    """torch's default capture stream is one for the process, made on the device current at its first capture: a
    model on another GPU must capture on a stream of its own, made on its device, the same one for every piece.
    (On the CPU, with CUDA's graph, stream and capture stood in for.)"""
    captured, made = [], []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("Graph", (), {"pool": lambda self: "pool"})())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "decode stream")
    monkeypatch.setattr(torch.cuda, "Stream", lambda: made.append(f"stream {len(made)}") or made[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool, stream: captured.append(stream) or nullcontext())
    graphs = DecodeGraphs()
    for key in ("attention", "guess", "head"):
        graphs.run(key, lambda: None)
    graphs.reset()  # new graphs, the same stream
    graphs.run("attention", lambda: None)
    assert made == ["stream 0"] and captured == ["stream 0"] * 4


class OutsideAddresses(TorchDispatchMode):
    """Where the operators inside it read and write tensors made before it: the addresses a CUDA graph of that
    code keeps as they were at its capture."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[int] = set()  # storages made inside
        self.outside: list[int] = []  # data pointers of the others, as each operator met them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self.outside += [t.data_ptr() for t in given if t.untyped_storage().data_ptr() not in self.made]
        out = func(*args, **kwargs)
        storages = {t.untyped_storage().data_ptr() for t in given}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.made.add(t.untyped_storage().data_ptr())
        return out


class AddressedGraphs(DecodeGraphs):
    """Eager, recording each run of each piece: the addresses from outside it that its operators met."""

    def __init__(self) -> None:
        super().__init__(capture=False)
        self.runs: dict = {}

    def run(self, key, fn) -> None:
        with OutsideAddresses() as addresses:
            fn()
        self.runs.setdefault(key, []).append(addresses.outside)


@pytest.mark.parametrize("mutant", [None, "a KV cache made anew at reset"])
def test_every_replay_of_a_piece_meets_the_addresses_of_its_capture(tmp_path, monkeypatch, mutant):
    """A graph replays its capture's kernels on its capture's addresses: a piece must find whatever it reads or
    writes from outside (the residual stream, the KV cache, the routing buffers, a slot row) where it found it at
    its second run (its first makes the workspace's buffers), at every later step, across a reset and a new
    sequence. On the CPU each piece runs again eagerly and would be right on new buffers, so only this can show a
    buffer made anew; the mutant is one."""
    if mutant is not None:
        reset = offload.decoder.Decoder.reset

        def reset_anew(decoder):
            reset(decoder)
            decoder.k_cache = torch.zeros_like(decoder.k_cache)

        monkeypatch.setattr(offload.decoder.Decoder, "reset", reset_anew)
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=3, experts=4, seed=3)
    model, _ = load(tiny, None, expert_bits="2", slots=2, prefetch="both")
    graphs = model.decoder.graphs = AddressedGraphs()
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # two sequences
        model.reset()
        model.forward(tokens[:4], 0)
        for pos in range(4, len(tokens)):
            model.forward(tokens[pos : pos + 1], pos)
    moved = sorted(str(key) for key, runs in graphs.runs.items() if any(run != runs[1] for run in runs[2:]))
    assert {key[0] for key in graphs.runs} == {"attention", "expert", "guess", "head"}
    assert all(len(runs) > 2 and runs[1] for key, runs in graphs.runs.items() if key[0] != "expert")
    if mutant is None:
        assert moved == []
    else:
        assert moved == [str(("attention", layer, 256)) for layer in range(3)]


class FixedRouting:
    """Replayed routing's interface (offload/bench.py): alternating experts, so every step misses."""

    def __init__(self) -> None:
        self.calls = 0
        self.weights = torch.tensor([0.5, 0.5])

    def decode(self, layer: int) -> tuple[list[int], list[float]]:
        self.calls += 1
        return ([0, 1], [0.5, 0.5]) if self.calls % 4 < 2 else ([2, 3], [0.5, 0.5])

    def device_weights(self, layer: int) -> torch.Tensor:
        return self.weights

    def __call__(self, layer, x):
        ids = torch.tensor([[0, 1]]).expand(x.shape[0], 2)
        return ids, torch.full((x.shape[0], 2), 0.5)


def test_replayed_weights_reach_the_expert_pieces(tmp_path):
    """The expert pieces read the gate weights on the device: replayed ones must be copied there."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=2, experts=4, seed=3)
    trace = tmp_path / "t.jsonl"
    chosen = [([3, 1], [0.8, 0.2]), ([0, 2], [0.3, 0.6]), ([2, 3], [0.5, 0.1])]
    trace.write_text("".join(
        f'{{"problem_id": 0, "token_idx": {t}, "layer": {layer}, "experts": {chosen[(t + layer) % 3][0]}, '
        f'"gating_probs": {chosen[(t + layer) % 3][1]}}}\n'
        for t in range(6) for layer in range(2)
    ))  # fmt: skip
    logits = []
    for graphs in (None, CountedGraphs()):
        model, _ = load(tiny, graphs, expert_bits="2", slots=2, prefetch="none")
        model.moe.routing = routing = ReplayedRouting(trace, num_layers=2, num_experts=4, top_k=2, device="cpu")
        model.reset()
        model.forward(torch.tensor([5, 6, 7]), 0)
        steps = []
        for position in range(6):
            routing.position = position
            steps.append(model.forward(torch.tensor([8 + position]), 3 + position))
        logits.append(torch.cat(steps))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_replayed_routing_serves_the_host_the_traces_weights_normalised(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [3, 1], "gating_probs": [0.3, 0.1]}\n'
        '{"problem_id": 0, "token_idx": 0, "layer": 1, "experts": [0, 2], "gating_probs": [0.5, 0.5]}\n'
    )
    routing = ReplayedRouting(trace, num_layers=2, num_experts=4, top_k=2, device="cpu")
    experts, weights = routing.decode(0)
    assert experts == [3, 1] and weights == pytest.approx([0.75, 0.25])
    ids, tensor_weights = routing(0, torch.zeros(1, 8))
    assert ids.tolist() == [experts] and tensor_weights[0].tolist() == pytest.approx(weights)
    assert routing.device_weights(0).tolist() == pytest.approx(weights)


def test_replayed_routing_cycles_through_its_tokens_on_the_device(tmp_path):
    """A prefill of T tokens at `position` reads rows position.. of the sequence, wrapping around, and
    the device rows follow `position` as the host's lists do."""
    trace = tmp_path / "t.jsonl"
    chosen = [([3, 1], [0.3, 0.1]), ([0, 2], [0.5, 0.5]), ([2, 3], [0.2, 0.6])]
    trace.write_text("".join(
        f'{{"problem_id": 0, "token_idx": {t}, "layer": 0, "experts": {e}, "gating_probs": {w}}}\n'
        for t, (e, w) in enumerate(chosen)
    ))  # fmt: skip
    routing = ReplayedRouting(trace, num_layers=1, num_experts=4, top_k=2, device="cpu")
    routing.position = 2
    ids, weights = routing(0, torch.zeros(3, 8))
    assert ids.tolist() == [[2, 3], [3, 1], [0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.25, 0.75], [0.75, 0.25], [0.5, 0.5]]))
    for position in range(7):
        routing.position = position
        experts, host = routing.decode(0)
        assert experts == list(chosen[position % 3][0])
        assert routing.device_weights(0).tolist() == pytest.approx(host)
