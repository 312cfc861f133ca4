"""The CUDA paths: skipped without a GPU. Written on a machine with none; their first run is still to come.

Run on a GPU machine with `python -m pytest tests/test_cuda.py -q` before trusting any CUDA figure.
"""

import random

import pytest
import torch

import offload
from cache.expert_cache import ExpertCache
from quant.linear import TRITON
from tests.tiny import hf_model, make_tiny_mixtral, prefill_then_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("cuda"), hidden=64, intermediate=128, experts=6, seed=11)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.15), ("float16", 0.05)])
@pytest.mark.parametrize("slots", [1, 3, 6])
def test_logits_match_transformers_on_cuda(tiny, dtype, tolerance, slots):
    tokens = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tiny)(tokens[None]).logits[0]  # float32 on the CPU: the reference
    model = offload.load(str(tiny), device="cuda", dtype=dtype, slots=slots, prefetch="late")
    assert model.cache.pinned and model.cache.arena.is_pinned()  # registered memory counts as pinned
    model.reset()
    got = [model.forward(tokens[:8], 0)]
    for pos in range(8, 20):
        got.append(model.forward(tokens[pos : pos + 1], pos))
    error = (torch.cat(got).cpu() - expected).abs().max().item()
    assert error < tolerance, f"{dtype}, {slots} slots: max |logit diff| {error:.3g}"


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
def test_every_served_buffer_is_the_right_expert_after_many_async_loads(mode):
    layers, experts, nbytes = 3, 8, 1 << 20  # 1 MiB experts: copies long enough to overlap
    cache = ExpertCache(num_layers=layers, num_experts=experts, expert_bytes=nbytes, device="cuda",
                        slots_per_layer=[3] * layers, mode=mode)  # fmt: skip
    for layer in range(layers):
        for expert in range(experts):
            cache.write(layer, expert, torch.full((nbytes,), layer * experts + expert + 1, dtype=torch.uint8))
    rng = random.Random(0)
    for _ in range(400):
        layer = rng.randrange(layers)
        if rng.random() < 0.5 and layer + 1 < layers:
            cache.prefetch(layer + 1, rng.sample(range(experts), 2))  # loads in flight while we compute
        for expert, buffer in cache.fetch(layer, rng.sample(range(experts), 2)):
            # compute on the default stream reads the slot: it must see this expert's bytes, fully loaded
            assert int(buffer.min()) == int(buffer.max()) == layer * experts + expert + 1
    torch.cuda.synchronize()
    total = cache.stats.total()
    assert total.hits + total.misses == total.requests == 800
    if mode == "exclusive":
        assert total.d2h_bytes == total.h2d_bytes


@pytest.mark.parametrize(("prefetch", "ahead"), [("none", 1), ("both", 1), ("late", 3)])
def test_decode_allocates_nothing_on_the_gpu(tiny, tmp_path, prefetch, ahead):
    """Issue 5's goal: after warm-up, a decode step on CUDA graphs asks the allocator for nothing, with
    the experts loading on misses and both guesses in the graphs (or the output's, three layers ahead)."""
    if ahead > 1:
        tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=4, experts=6, seed=11)
    model = offload.load(str(tiny), device="cuda", slots=3, expert_bits="4", attn_bits="4", prefetch=prefetch,
                         prefetch_ahead=ahead)  # fmt: skip
    # the norms and rotations in the graphs are offload/norm.py's and offload/rope.py's kernels
    assert model.prepared.cuda_graphs and model.decoder.fused_norm and model.decoder.fused_rope
    assert model.moe.fused_route and (prefetch == "none" or model.moe.prefetcher.fused_route)  # offload/router.py
    assert prefetch == "none" or model.moe.prefetcher.fused_norm
    from quant import gemv

    assert gemv._gated_failed == {}  # load()'s first try of the gated kernel on the experts' shape ran and agreed
    model.reset()
    model.forward(torch.tensor([5, 6, 7], device="cuda"), 0)
    token = torch.tensor([8], device="cuda")
    for pos in range(3, 6):  # the first step runs each piece and captures it
        model.forward(token, pos, copy=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    misses = model.stats.total.misses
    for pos in range(6, 14):
        logits = model.forward(token, pos, copy=False)
        torch.argmax(logits[-1], dim=-1, keepdim=True, out=token)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 0
    assert model.stats.total.misses > misses  # the steps loaded experts
    assert model.decoder.graphs.failed is None
    c = model.config
    expert_graphs = 3 * c.num_layers * c.top_k  # every slot row and place, captured after the first step
    guesses = 0 if prefetch == "none" else c.num_layers - 1  # the late guess, at each layer's output but the last's
    assert len(model.decoder.graphs.graphs) == c.num_layers + guesses + 1 + expert_graphs


def test_a_replayed_decode_step_copies_nothing_host_to_device(tiny, tmp_path):
    """Every host-to-device copy shares the copy engine that carries the experts: a replayed step that
    copied its gate weights over would wait behind whatever expert load is in flight. With every
    expert in a slot, a decode step must copy nothing host-to-device at all."""
    from torch.profiler import ProfilerActivity, profile

    from offload.bench import ReplayedRouting

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        f'{{"problem_id": 0, "token_idx": {t}, "layer": {layer}, "experts": [{t % 6}, {(t + 3) % 6}], '
        f'"gating_probs": [0.6, 0.4]}}\n'
        for t in range(4) for layer in range(2)
    ))  # fmt: skip
    model = offload.load(str(tiny), device="cuda", slots=6, expert_bits="2", attn_bits="4", prefetch="none")
    model.moe.routing = routing = ReplayedRouting(trace, 2, 6, 2, "cuda")
    model.reset()
    model.forward(torch.tensor([5, 6, 7], device="cuda"), 0)
    token = torch.tensor([8], device="cuda")
    for pos in range(3, 9):  # every expert loaded once, every graph captured
        routing.position = pos
        model.forward(token, pos, copy=False)
    torch.cuda.synchronize()
    misses = model.stats.total.misses
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for pos in range(9, 13):
            routing.position = pos
            model.forward(token, pos, copy=False)
        torch.cuda.synchronize()
    assert model.stats.total.misses == misses
    copies = [e.name for e in prof.events() if "HtoD" in e.name]
    assert copies == []


def test_cuda_graphs_replay_the_eager_decode(tiny):
    """Replayed graphs against the same steps launched from Python, in float32: logits and every cache
    counter (in bfloat16 a near tie in the router may go the other way)."""
    tokens = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(5))
    runs = {}
    for graphs in (True, False):
        model = offload.load(str(tiny), device="cuda", dtype="float32", slots=3, expert_bits="2", attn_bits="4",
                             prefetch="both", cuda_graphs=graphs, max_seq_len=320)  # fmt: skip
        got = prefill_then_decode(model, tokens, 8)  # past 256 keys: a second set of graphs, over 320 keys
        # every counter but stall_s, the seconds the host waited on loads in flight: a clock, not a count
        per_layer = model.stats.cache.per_layer
        counters = [{k: v for k, v in layer.to_dict().items() if k != "stall_s"} for layer in per_layer]
        runs[graphs] = got.float().cpu(), counters, model.decoder.graphs
    error = (runs[True][0] - runs[False][0]).abs().max().item()
    assert error < 1e-4, f"graphs against eager, max |logit diff| {error:.3g}"
    assert runs[True][1] == runs[False][1]
    assert runs[False][2] is None and runs[True][2].failed is None
    layers, k = model.config.num_layers, model.config.top_k
    # attention per key range, the late guess at each layer but the last, head, and an expert graph per slot row and
    # place
    assert len(runs[True][2].graphs) == 2 * layers + (layers - 1) + 1 + 3 * layers * k


def test_nf4_attention_decodes_in_graphs_on_cuda(tiny, tmp_path):
    """NF4 attention in tiles: its table and buffers are made in a piece's first run, so the capture after
    it succeeds (dequantizing whole made a host-to-device table copy at every call), and the replay
    matches transformers carrying the same dequantized weights."""
    from offload.convert import quantize_model
    from quant.bnb import dequantize_nf4
    from tests.test_quantized_model import carry_our_weights

    folder = quantize_model(str(tiny), tmp_path / "nf4", expert_bits="4", attn_bits="4", attn_quant="bnb")
    model = offload.load(str(folder), device="cuda", dtype="float32", slots=2)
    tokens = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(4))
    model.reset()
    got = [model.forward(tokens[:8], 0)]
    for pos in range(8, 24):
        got.append(model.forward(tokens[pos : pos + 1], pos))
    assert model.decoder.graphs.failed is None and model.decoder.graphs.graphs
    reference = hf_model(tiny)
    with torch.no_grad():
        carry_our_weights(reference, offload.load(str(folder), device="cpu"), dequantize_attention=dequantize_nf4)
        expected = reference(tokens[None]).logits[0]
    assert (torch.cat(got).float().cpu() - expected).abs().max().item() < 1e-3


def test_quantize_on_the_gpu_gives_a_folder_close_to_the_cpus(tiny, tmp_path):
    from offload.convert import quantize_model

    on_gpu = quantize_model(str(tiny), tmp_path / "gpu", expert_bits="2", attn_bits="4", device="cuda")
    on_cpu = quantize_model(str(tiny), tmp_path / "cpu", expert_bits="2", attn_bits="4", device="cpu")
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(3))
    a = offload.load(str(on_gpu), device="cpu").logits(tokens)
    b = offload.load(str(on_cpu), device="cpu").logits(tokens)
    assert (a - b).abs().max().item() < 0.5  # hqq optimizes in each device's arithmetic: close, not equal


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.15), ("float16", 0.05)])
def test_fused_gemv_decode_matches_dequantize_then_matmul_on_cuda(tiny, dtype, tolerance):
    """quant/gemv.py compiled for the GPU (the CPU tests run it interpreted): same logits, both kernels."""
    tokens = torch.randint(3, 128, (16,), generator=torch.Generator().manual_seed(4))
    logits = {}
    for fused in (None, False):  # None: the default, which must pick the kernel on CUDA
        model = offload.load(str(tiny), device="cuda", dtype=dtype, slots=3, expert_bits="2", attn_bits="4",
                             fused_gemv=fused)  # fmt: skip
        expected = TRITON if fused is None else None
        assert model.moe.workspace.kernel is expected and model.decoder.workspace.kernel is expected
        logits[fused] = prefill_then_decode(model, tokens, 8).float().cpu()
    error = (logits[None] - logits[False]).abs().max().item()
    assert error < tolerance, f"{dtype}: fused against dequantize+matmul, max |logit diff| {error:.3g}"


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.1)])
def test_meta_rows_decode_matches_grid_order_on_cuda(tmp_path, dtype, tolerance):
    """--meta-rows compiled for the GPU, in CUDA graphs: at hidden 2048, w1 and w3 held by packed row (META_ROWS),
    the logits of grid order's experts, within the sums' order; `info` says so."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=2048, intermediate=256, layers=2, experts=4, seed=12)
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5))
    logits = {}
    for rows in (True, False):
        model = offload.load(str(tiny), device="cuda", dtype=dtype, slots=2, expert_bits="2", meta_rows=rows)
        assert model.prepared.expert_format.meta_order == ("row" if rows else "grid")
        assert model.info()["experts"].endswith(", scales and zeros by packed row") == rows
        logits[rows] = prefill_then_decode(model, tokens, 6).float().cpu()
    error = (logits[True] - logits[False]).abs().max().item()
    assert error < tolerance, f"{dtype}: by packed row against grid order, max |logit diff| {error:.3g}"


def test_a_failed_capture_decodes_on_and_says_why():
    """An operator that cannot be captured (a host sync): the graphs stop, the stream decode ran on is
    the current one again, and `failed` names the first error, not the capture's own after it."""
    from offload.graphs import DecodeGraphs

    graphs, x = DecodeGraphs(), torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        graphs.run("syncs", lambda: x.add_(1).sum().item())  # eagerly, then the capture fails
    assert torch.cuda.current_stream() == stream
    assert graphs.capture is False and graphs.failed.startswith("syncs: ")
    assert "invalidated" not in graphs.failed, graphs.failed
    graphs.run("syncs", lambda: x.add_(1))  # on eagerly
    assert x.tolist() == [3.0] * 4 and not graphs.graphs


def test_a_chunked_prefill_matches_transformers_on_cuda(tiny):
    """Spans after the first are masked, and on CUDA they repeat the key heads for the memory-efficient
    kernel (offload.decoder.repeat_kv_policy): a prompt in chunks of 3, then a second prefill after it,
    as a chat turn."""
    tokens = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tiny)(tokens[None]).logits[0]
    model = offload.load(str(tiny), device="cuda", dtype="float32", slots=3, prefill_chunk=3)
    assert model.decoder.repeat_kv in ("masked", "always")
    model.reset()
    got = torch.cat([model.forward(tokens[:8], 0), model.forward(tokens[8:], 8)])
    assert (got.cpu() - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("history", [0, 1024])
def test_a_long_prefill_peaks_under_what_the_plan_keeps_for_it(tmp_path, history):
    """The plan keeps ModelConfig.prefill_bytes free beside the workspace (offload.api.prefill_reserve):
    a 2048-token context through mixtral-small's width, in chunks of 256, must not exceed it on CUDA."""
    from offload.synth import synthesize

    folder = synthesize(tmp_path / "small", "mixtral-small", layers=1)
    model = offload.load(str(folder), device="cuda", max_seq_len=2048, prefill_chunk=256, prefetch="none")
    ids = torch.randint(0, model.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(0))
    model.reset()
    model.forward(ids[:512], 0, last_only=True)  # every expert gets more rows than the kernel takes: the workspace
    model.reset()
    if history:
        model.forward(ids[:history], 0, last_only=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model.forward(ids[history:], history, last_only=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    bound = model.config.prefill_bytes(2048, 256, model.dtype, repeat_kv=True)
    assert peak <= bound, f"peak {peak} over the bound {bound}"


def test_torch_says_where_flash_serves_grouped_heads(tiny):
    """offload.decoder.repeat_kv_policy asks torch whether flash takes an unmasked span: on Ampere and later
    in bfloat16 it does, so only masked spans repeat the key heads; in float32 it never does."""
    from offload.checkpoint import open_hf
    from offload.decoder import repeat_kv_policy

    config = open_hf(tiny).model_config
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    assert repeat_kv_policy(config, torch.device("cuda"), torch.bfloat16) == ("masked" if ampere else "always")
    assert repeat_kv_policy(config, torch.device("cuda"), torch.float32) == "always"


@pytest.mark.parametrize("bits", ["2", "4"])
def test_tiles_on_cuda_equal_dequantize_then_matmul(bits):
    """A prefill's unfused product on Mixtral-8x7B's w1 shape: one bit slot a tile, each multiplied by cuBLAS
    straight into its columns of the output (a strided view)."""
    from quant.hqq import EXPERT_PRESETS, Workspace, dequantize, random_quantized
    from quant.linear import linear

    generator = torch.Generator("cuda").manual_seed(0)
    q = random_quantized((14336, 4096), EXPERT_PRESETS[bits], generator)
    x = torch.randn(37, 4096, generator=generator, device="cuda", dtype=torch.bfloat16)
    workspace = Workspace()
    got = linear(x, q, workspace)
    exact = x.double() @ dequantize(q, torch.float64).T
    torch.testing.assert_close(got.double(), exact, rtol=0.02, atol=0.02 * exact.abs().max().item())
    # the same products as the whole weight's, up to the sum order; a tile is a 2-bit slot (a quarter of
    # the weight), or 4096 rows of a 4-bit one (a half, 29.4M weights, is more than 2**24)
    # (cuBLAS may reduce in bfloat16, split differently for the two shapes: a tolerance scaled to the output)
    whole = x @ dequantize(q, torch.bfloat16).T
    torch.testing.assert_close(got, whole, rtol=0.02, atol=0.02 * whole.abs().max().item())
    tile = {"2": 14336 // 4, "4": 4096}[bits] * 4096
    assert [b.numel() for key, b in workspace._buffers.items() if key[0] == "tile.grid"] == [tile]


def test_the_gpu_reads_the_embedding_table_in_host_memory_in_place():
    """offload/embedding.py: registered host memory is mapped, so a kernel reads a row where it is, eagerly
    and replayed in a graph with new ids; and the mapping works in the model's dtype."""
    from offload.embedding import gather_rows, host_table, reads_host_memory

    assert reads_host_memory(torch.device("cuda"), torch.bfloat16) is None
    table = host_table(torch.randn(32000, 4096, generator=torch.Generator().manual_seed(0)), torch.bfloat16)
    assert table.device.type == "cpu" and table.is_pinned()
    ids = torch.tensor([31999, 0, 17, 17], device="cuda")
    assert torch.equal(gather_rows(table, ids).cpu(), table[ids.cpu()])
    out = torch.empty(4, 4096, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_rows(table, ids, out)
    ids.copy_(torch.tensor([1, 2, 3, 31998]))
    graph.replay()
    assert torch.equal(out.cpu(), table[[1, 2, 3, 31998]])


def test_a_table_in_host_memory_decodes_as_one_on_the_gpu(tiny):
    """The default on CUDA keeps the table in RAM: the plan counts it there, and prefill and graph-replayed
    decode give the logits of the table on the GPU, bit for bit (the rows are the same bytes)."""
    tokens = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1))
    runs = {}
    for host in (True, False):
        model = offload.load(str(tiny), device="cuda", slots=3, expert_bits="2", attn_bits="4", host_embedding=host)
        assert model.prepared.host_embedding is host and (model.plan.host_resident_bytes > 0) is host
        model.reset()
        got = [model.forward(tokens[:8], 0)]
        for pos in range(8, 20):
            got.append(model.forward(tokens[pos : pos + 1], pos))
        runs[host] = torch.cat(got).cpu()
        assert model.decoder.graphs.failed is None
    assert torch.equal(runs[True], runs[False])
    assert offload.load(str(tiny), device="cuda").prepared.host_embedding  # the default


@pytest.mark.parametrize("split_k", [2, 8])
def test_split_k_on_cuda_equals_one_program_a_row_and_replays_in_a_graph(split_k):
    """Mixtral's 2-bit w2, K split over several programs an output: the same outputs as the unsplit launch (up to
    bfloat16's rounding of a sum in another order), from a CUDA graph as eagerly, and nothing allocated on replay
    (the partials are the workspace's)."""
    from quant import gemv
    from quant.hqq import EXPERT_PRESETS, Workspace, random_quantized

    generator = torch.Generator("cuda").manual_seed(0)
    q = random_quantized((4096, 14336), EXPERT_PRESETS["2"], generator)
    x = torch.randn(1, 14336, generator=generator, device="cuda", dtype=torch.bfloat16)
    whole = gemv.gemv(x, q, split_k=1)
    workspace, out = Workspace(), torch.empty_like(whole)
    eager = gemv.gemv(x, q, out, workspace, split_k=split_k).clone()
    torch.testing.assert_close(eager, whole, rtol=0.01, atol=0.01 * whole.abs().max().item())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv.gemv(x, q, out, workspace, split_k=split_k)
    out.zero_()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert torch.equal(out, eager)  # the same order of sums: the same bits
    # the meta loaded ahead of the codes' sums: the same arithmetic, so the same bits
    assert torch.equal(gemv.gemv(x, q, split_k=split_k, early_meta=True), eager)


@pytest.mark.parametrize("split_k", [1, 4])
def test_gated_on_cuda_is_silu_of_w1_times_w3_and_replays_in_a_graph(split_k):
    """Mixtral's 2-bit w1 and w3 as one gated launch, compiled: silu(w1 x) * w3 x from the two launches' float32
    sums (only the gate's rounding differs), the meta early and late giving the same bits, and from a CUDA graph
    as eagerly with nothing allocated on replay."""
    from quant import gemv
    from quant.hqq import EXPERT_PRESETS, Workspace, random_quantized

    generator = torch.Generator("cuda").manual_seed(1)
    w1, w3 = (random_quantized((14336, 4096), EXPERT_PRESETS["2"], generator) for _ in range(2))
    x = torch.randn(1, 4096, generator=generator, device="cuda", dtype=torch.float32)
    first, second = gemv.gemv(x, w1, split_k=split_k), gemv.gemv(x, w3, split_k=split_k)
    expected = torch.nn.functional.silu(first) * second
    workspace, out = Workspace(), torch.empty_like(expected)
    eager = gemv.gated(x, w1, w3, out, workspace, split_k=split_k).clone()
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(gemv.gated(x, w1, w3, split_k=split_k, early_meta=not gemv.GATED_EARLY_META), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv.gated(x, w1, w3, out, workspace, split_k=split_k)
    out.zero_()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert torch.equal(out, eager)


MIXTRAL_MATRICES = {"w1": ((14336, 4096), "2"), "w2": ((4096, 14336), "2"), "q_proj": ((4096, 4096), "4")}


@pytest.mark.parametrize("matrix", MIXTRAL_MATRICES)
@pytest.mark.parametrize("meta_rows", [False, True])
def test_the_kernel_at_mixtrals_shapes_equals_dequantize_then_matmul(matrix, meta_rows):
    """Every other GPU test of the kernel compares it with itself (split against unsplit, gated against two
    launches, tune against the default launch) or runs the tiny model, whose K is one masked step. Here Mixtral's
    matrices take the path real decode takes (unmasked loads, many K steps, the pipelined loop, the codes in the
    mantissa) against dequantize's weights times x in float64, at the default launch and at each variant decode may
    run: K split, the meta early, and for w1 the gated pair; held by packed row where that layout applies."""
    from quant import gemv
    from quant.hqq import ATTN_PRESETS, EXPERT_PRESETS, dequantize, random_quantized
    from quant.packing import by_row, with_meta_by_row

    shape, bits = MIXTRAL_MATRICES[matrix]
    spec = (EXPERT_PRESETS if matrix != "q_proj" else ATTN_PRESETS)[bits]
    generator = torch.Generator("cuda").manual_seed(len(matrix) + meta_rows)
    q, up = (random_quantized(shape, spec, generator) for _ in range(2))
    if meta_rows:
        if not by_row(shape, spec):  # q_proj: 4-bit's scales and zeros are float16, no meta codes
            pytest.skip(f"{matrix}: its scales and zeros are not held by packed row")
        q, up = with_meta_by_row(q), with_meta_by_row(up)
        assert gemv._meta_by_row(q)
    x = torch.randn(1, shape[1], generator=generator, device="cuda", dtype=torch.float32)
    weight = dequantize(q, torch.float32).double()  # [N, K]
    expected = (x.double() @ weight.T).cpu()
    scale = expected.abs().max().item()
    for keywords in ({}, {"split_k": 4}, {"early_meta": True}, {"split_k": 4, "early_meta": True}):
        error = (gemv.gemv(x, q, **keywords).double().cpu() - expected).abs().max().item()
        assert error < 1e-4 * scale, f"{matrix} {keywords}: max |error| {error:.3g} of {scale:.3g}"
        if matrix == "w1":  # with w3 (`up`), as decode's gated launch
            gate, product = torch.nn.functional.silu(expected), (x.double() @ dequantize(up).double().T).cpu()
            error = (gemv.gated(x, q, up, **keywords).double().cpu() - gate * product).abs().max().item()
            bound = 2e-4 * gate.abs().max().item() * product.abs().max().item()  # each factor's error, times the other
            assert error < bound, f"gated {keywords}: max |error| {error:.3g}, bound {bound:.3g}"
    for dtype, relative in ((torch.bfloat16, 0.02), (torch.float16, 5e-3)):  # decode's dtypes: one rounding more
        got = gemv.gemv(x.to(dtype), q).double().cpu()
        reference = (x.to(dtype).double() @ weight.T).cpu()
        error = (got - reference).abs().max().item()
        assert error < relative * scale, f"{matrix} {dtype}: max |error| {error:.3g} of {scale:.3g}"
