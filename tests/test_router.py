"""A decode step's routing in one kernel (offload/router.py), and the prefetcher's guess with its norm.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) on CPU tensors; it truncates float32 to
bfloat16 where a GPU rounds to nearest, so bfloat16 is checked on CUDA alone.
"""

import pytest
import torch
import torch.nn.functional as F

import offload
from offload import norm, router
from offload.families import mixtral
from offload.norm import rms_norm
from offload.router import fused_route
from tests.test_graphs import assert_static_equals_eager
from tests.test_norm import turn_on
from tests.test_offload_oracle import DECODE, PROMPT
from tests.test_rope import Launches
from tests.tiny import make_tiny_mixtral

pytestmark = pytest.mark.skipif(router.triton is None, reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# [T, D] by [E, D], k: Mixtral's router; experts and a width not powers of two (the tiles' tails masked); every
# expert chosen; the most experts a program takes
SHAPES = [(2, 4096, 8, 2), (3, 96, 60, 4), (1, 16, 3, 3), (2, 64, 256, 8)]


def problem(tokens: int, hidden: int, experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x, a router whose logits have std 1 (as a trained router's: no near ties) and a post-attention norm."""
    generator = torch.Generator().manual_seed(tokens + hidden + experts)
    x = torch.randn(tokens, hidden, generator=generator)
    weight = torch.randn(experts, hidden, generator=generator) / hidden**0.5
    post_norm = 1 + 0.1 * torch.randn(hidden, generator=generator)
    return tuple(t.to(DEVICE, dtype) for t in (x, weight, post_norm))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", ["routed", "normed", "added"])
def test_the_fused_routing_is_transformers(dtype, shape, form):
    """The same experts in the same order as Mixtral's route on F.linear's logits (of the rms-normed row, with a
    norm; of the residual stream plus the MoE output, normed, as a late guess reads them), and the same
    renormalized weights to float32's rounding in another order of sums."""
    tokens, hidden, experts, k = shape
    x, weight, post_norm = problem(tokens, hidden, experts, dtype)
    added = torch.randn(x.shape, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
    given = x.clone()
    ids, weights = (torch.full((tokens * k,), float("nan"), device=DEVICE) for _ in range(2))
    norm, add = (None, None) if form == "routed" else (post_norm, added if form == "added" else None)
    fused_route(x, weight, ids, weights, norm=norm, eps=1e-5, add=add)
    assert torch.equal(x, given)  # the residual stream is read, not written
    row = x if add is None else x + add  # rounded to the dtype, as add_ rounds it
    row = row if norm is None else rms_norm(row, norm, 1e-5)
    expected_ids, expected_weights = mixtral.route(F.linear(row, weight), k)
    assert torch.equal(ids.view(tokens, k), expected_ids.float())
    torch.testing.assert_close(weights.view(tokens, k), expected_weights, rtol=1e-6, atol=1e-6)


def test_a_nan_in_the_row_still_routes_to_distinct_experts():
    """A NaN in the hidden state (a float16 overflow, say) makes every logit NaN: torch.topk still gives k experts
    of the layer, and so must the kernel, whose ids the cache serves (a max over NaNs matched no expert, and the
    id was EXPERTS, one past the last). The lowest ids, as the kernel's ties go."""
    x, weight, _ = problem(2, 4096, 8, torch.float32)
    x[1, 7] = float("nan")
    ids = torch.full((4,), -1.0, device=DEVICE)
    fused_route(x, weight, ids, None)
    expected_ids, _ = mixtral.route(F.linear(x[:1], weight), 2)
    assert ids.tolist() == expected_ids[0].float().tolist() + [0.0, 1.0]


def test_without_a_weights_buffer_only_the_ids_are_written():
    """The prefetcher's guesses, and replayed routing's steps, read the ids alone: no weights are stored."""
    x, weight, _ = problem(1, 64, 8, torch.float32)
    ids = torch.full((2,), float("nan"), device=DEVICE)
    fused_route(x, weight, ids)
    assert ids.tolist() == mixtral.route(F.linear(x, weight), 2)[0][0].tolist()


def test_it_computes_mixtrals_route_alone_and_takes_contiguous_tensors_of_one_dtype():
    x, weight, post_norm = problem(1, 64, 8, torch.float32)
    assert router.computes(mixtral.route) and not router.computes(lambda logits, k: mixtral.route(logits, k))
    assert router.supports(x, weight) and router.supports(x, weight, post_norm)
    assert not router.supports(x, weight.half())  # of another dtype
    assert not router.supports(x, weight.t().contiguous().t())  # not contiguous
    assert not router.supports(x, weight[:, :32])  # another width
    assert not router.supports(x, torch.zeros(router.MAX_EXPERTS + 1, 64, device=DEVICE))
    assert not router.supports(x, weight, post_norm[:32])
    assert router.supports(x, weight, post_norm, x) and not router.supports(x, weight, post_norm, x.double())


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA the first try runs at load: tests/test_cuda.py")
def test_the_first_try_decides_whether_the_moe_block_takes_the_kernel(tmp_path, monkeypatch):
    """works: off CUDA, why not. first_try (what a CUDA device runs once, here interpreted): None where the kernel
    runs and agrees with transformers' steps, else why not; a model whose try fails routes in torch's steps."""
    cpu = torch.device("cpu")
    assert router.works(cpu, torch.float32) == "not a CUDA device"
    assert router.first_try(cpu, torch.float32) is None and router.first_try(cpu, torch.float16) is None

    def reversed_ids(x, weight, ids, weights=None, **options):  # the experts chosen, in the wrong order
        original(x, weight, ids, weights, **options)
        flipped = ids.view(x.shape[0], -1).flip(-1)  # a copy
        ids.view_as(flipped).copy_(flipped)

    original = router.fused_route
    monkeypatch.setattr(router, "fused_route", reversed_ids)
    assert router.first_try(cpu, torch.float32) == "the kernel's routing differs from transformers' steps"

    def unsupported(*args, **options):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120")

    monkeypatch.setattr(router, "fused_route", unsupported)
    assert router.first_try(cpu, torch.float32) == "RuntimeError: PTX .version 8.7 does not support .target sm_120"
    monkeypatch.setattr(router, "works", router.first_try)  # as on a CUDA device
    path = make_tiny_mixtral(tmp_path / "m", layers=2, seed=9)
    with pytest.warns(UserWarning) as warned:
        model = offload.load(str(path), device="cpu", slots=2, prefetch="late")
    assert not model.moe.fused_route and not model.moe.prefetcher.fused_route
    assert [str(w.message) for w in warned if "first try" in str(w.message)] == [
        "routing runs in torch's steps here: its kernel's first try failed (RuntimeError: PTX .version 8.7 does not "
        "support .target sm_120)"
    ]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py replays on CUDA")
def test_the_static_path_routes_and_guesses_in_the_kernel(tmp_path, monkeypatch):
    """With the kernel on (as a CUDA device's first try finds), the static decode path routes each layer in one
    launch, the early guess of the next layer in another, and the late guesses in one a target, the norm inside:
    the same logits, cache decisions and trace as the eager path (which routes in torch's steps), and no norm
    kernel for any guess."""
    turn_on(monkeypatch, routing=True)
    routes, norms = Launches(router._route_kernel), Launches(norm._rms_norm_kernel)
    monkeypatch.setattr(router, "_route_kernel", routes)
    monkeypatch.setattr(norm, "_rms_norm_kernel", norms)
    path = make_tiny_mixtral(tmp_path / "m", layers=3, seed=6)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(6))
    static = assert_static_equals_eager(path, tokens, slots=2, prefetch="both", prefetch_ahead=2)
    assert static.moe.fused_route and static.moe.prefetcher.fused_route
    layers = static.config.num_layers
    late = 2 + 1  # layer 0's output guesses layers 1 and 2, layer 1's layer 2, the last layer's none
    early = layers - 1
    eager_step, static_step = early + late, layers + early + late  # the eager path routes in torch's steps
    assert len(routes.grids) == DECODE * (eager_step + static_step) and set(routes.grids) == {(1,)}
    # the norms: the prefill's (2 a layer and the head's) and each decode step's, in both models; no guess's
    assert len(norms.grids) == 2 * (1 + DECODE) * (2 * layers + 1)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="counts on the CPU, interpreted")
def test_the_launch_count_benchmark_counts_the_routings_kernels(tmp_path):
    """benchmarks/decode_launches.py: with the routing kernel, a layer's routing is two launches (the kernel, and
    the clearing of the experts' sum) and each late guess one; in torch's steps, more."""
    from benchmarks.decode_launches import PATHS, count
    from offload.demo import write_random_mixtral

    path = write_random_mixtral(tmp_path / "m", layers=3, seed=1)
    fused = count(path, PATHS["norm, rope, routing"], "late", steps=2)
    unfused = count(path, PATHS["norm, rope"], "late", steps=2)
    assert (fused["route_into"], fused["guess_into"]) == (2 * 3, 3 - 1)
    assert unfused["route_into"] > fused["route_into"] and unfused["guess_into"] > fused["guess_into"]
    assert unfused["attention"] == fused["attention"] and fused["total"] == sum(
        n for section, n in fused.items() if section != "total"
    )
