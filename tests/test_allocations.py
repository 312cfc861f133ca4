"""A decode step's expert part makes no tensor (STYLE.md rule 5): checked on the CPU by watching every
operator's outputs for storage that none of its inputs had. tests/test_cuda.py counts the allocator's
own requests on a GPU."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import offload
from offload.moe import expert_mlp
from quant import cpu_gemv
from quant.hqq import EXPERT_PRESETS, Workspace
from quant.linear import CPU
from quant.packing import ExpertFormat
from tests.tiny import make_tiny_mixtral


class FreshTensors(TorchDispatchMode):
    """Counts, by operator, outputs whose storage is new: not a view of an input, not an `out=`."""

    def __init__(self) -> None:
        super().__init__()
        self.made: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        result = func(*args, **kwargs)
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made[str(func)] += 1
        return result


def test_a_decode_experts_mlp_makes_no_tensor_and_equals_the_allocating_one():
    fmt = ExpertFormat.build(64, 128, EXPERT_PRESETS["2"], torch.float32)
    weights = fmt.unpack(fmt.random(torch.Generator().manual_seed(0)))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    workspace = Workspace()
    expected = expert_mlp(x, weights)
    expert_mlp(x, weights, workspace, reuse=True)  # the first call makes the buffers
    with FreshTensors() as fresh:
        got = expert_mlp(x, weights, workspace, reuse=True)
    assert fresh.made == {}
    assert torch.equal(got, expected)


def test_a_decode_steps_moe_block_makes_only_the_routers_tensors(tmp_path):
    """Through the cache (2 slots of 4 experts), loading on a miss: the router makes a few small tensors;
    with routing given (as `bench --route-trace` gives it), the block makes none."""
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=64, intermediate=128, layers=2, experts=4, seed=3)
    model = offload.load(str(tiny), device="cpu", expert_bits="2", slots=2, prefetch="none")
    assert model.moe.workspace.kernel is (CPU if cpu_gemv.available() else None)  # the experts' fused kernel
    model.reset()
    model.forward(torch.tensor([5, 6, 7]), 0)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    routings = [(torch.tensor([[a, b]]), torch.tensor([[0.6, 0.4]])) for a, b in ((0, 1), (2, 3))]
    with torch.inference_mode():  # as in Decoder.forward, where the workspace's buffers were made
        model.moe(1, x)
        with FreshTensors() as fresh:
            model.moe(1, x)
        # the router's logits, softmax, top-k and renormalisation: what CUDA graphs are to take over
        assert fresh.made == {
            "aten.linear.default": 1, "aten.softmax.int": 1, "aten.topk.default": 2, "aten.sum.dim_IntList": 1,
            "aten.div.Tensor": 1,
        }  # fmt: skip
        for step in range(3):  # warm-up on both routings
            model.moe.routing = lambda layer, x, step=step: routings[step % 2]
            model.moe(1, x)
        misses = model.stats.total.misses
        model.moe.routing = lambda layer, x: routings[1]
        with FreshTensors() as fresh:
            out = model.moe(1, x)  # the slots hold experts 0 and 1: this loads 2 and 3
    assert model.stats.total.misses == misses + 2
    assert fresh.made == {}
    assert out.data_ptr() == model.moe.workspace.buffer("moe.out", (1, 64), x.dtype, x.device).data_ptr()
