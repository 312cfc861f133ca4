"""RMSNorm in one kernel (offload/norm.py), with the residual add before it.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) on CPU tensors. The interpreter rounds
float32 to bfloat16 by truncation, where a GPU rounds to nearest, so bfloat16 is checked on CUDA alone.
"""

import pytest
import torch

import offload
from offload import norm, rope, router
from offload.norm import fused_rms_norm, normed, rms_norm
from tests.test_graphs import assert_static_equals_eager
from tests.test_offload_oracle import DECODE, PROMPT
from tests.test_offload_oracle import run_teacher_forced as teacher_forced
from tests.tiny import hf_model, make_tiny_mixtral

pytestmark = pytest.mark.skipif(norm.triton is None, reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def turn_on(monkeypatch, routing: bool = False) -> None:
    """The decoder's norm and RoPE kernels on, as a CUDA device's first tries find them (norm.works, rope.works),
    and with `routing` the MoE block's routing kernel (router.works): here, interpreted."""
    for module in (norm, rope, router) if routing else (norm, rope):
        monkeypatch.setattr(module, "works", lambda device, dtype: None)


class Launches:
    """Stands in for the kernel in offload/norm.py and counts its launches, and those with an add."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.adds = kernel, [], 0

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.grids.append(grid)
            self.adds += keywords["ADD"]
            return self.kernel[grid](*args, **keywords)

        return run


def ulps(dtype: torch.dtype) -> float:
    """The relative error allowed against transformers' steps: float32's sum in another order, or one rounding
    of a 16-bit result (the normed value's, then the weight's product's)."""
    return 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 4096])  # 96: not a power of two, the tile's tail masked
def test_the_fused_norm_is_transformers_rms_norm(dtype, hidden):
    generator = torch.Generator().manual_seed(hidden)
    x = torch.randn(3, hidden, generator=generator).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(DEVICE, dtype)
    attended = torch.randn(3, hidden, generator=generator).to(DEVICE, dtype)
    expected = rms_norm(x, weight, 1e-5).double()
    got = fused_rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and (got.double() - expected).abs().max() <= ulps(dtype) * expected.abs().max()
    # with the residual add: x becomes x + attended exactly as add_ rounds it, and its norm is written into out
    h, out = x.clone(), torch.full_like(x, float("nan"))
    assert fused_rms_norm(h, weight, 1e-5, out, add=attended) is out
    assert torch.equal(h, x.clone().add_(attended))
    expected = rms_norm(h, weight, 1e-5).double()
    assert (out.double() - expected).abs().max() <= ulps(dtype) * expected.abs().max()


def test_normed_takes_the_kernel_where_asked_and_it_serves(monkeypatch):
    """normed: the kernel where `fused` and the tensors suit it (contiguous, one dtype), else transformers' steps,
    bit for bit; the add in place either way."""
    launches = Launches(norm._rms_norm_kernel)
    monkeypatch.setattr(norm, "_rms_norm_kernel", launches)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, generator=generator).to(DEVICE)
    weight = torch.rand(64, generator=generator).to(DEVICE)
    attended = torch.randn(2, 64, generator=generator).to(DEVICE)
    strided = torch.randn(2, 128, generator=generator).to(DEVICE)[:, ::2]  # every other input: not contiguous
    normed(x.clone(), weight, 1e-5, fused=True)
    assert len(launches.grids) == 1 and launches.grids[-1] == (2,)
    for refused in (dict(fused=False), dict(fused=True, weight=weight.double()), dict(fused=True, x=strided)):
        given = {"x": x, "weight": weight, **refused}
        got = normed(given["x"], given["weight"], 1e-5, fused=given["fused"])
        assert torch.equal(got, rms_norm(given["x"], given["weight"], 1e-5))
    h, sum_ = x.clone(), x.clone().add_(attended)
    assert torch.equal(normed(h, weight, 1e-5, fused=False, add=attended), rms_norm(sum_, weight, 1e-5))
    assert torch.equal(h, sum_) and len(launches.grids) == 1


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py decodes on CUDA")
def test_decode_with_the_fused_norm_equals_transformers(tmp_path, monkeypatch):
    """A whole model with every norm in the kernel (the decoder's, and the prefetcher's guess, as on CUDA), on the
    eager path: the prefill's and each decode step's logits against transformers', and the launches: per layer the
    input norm and the post-attention norm, the late guess's norm in each decode step, then the head's."""
    turn_on(monkeypatch)  # as a CUDA device's first tries find
    launches = Launches(norm._rms_norm_kernel)
    monkeypatch.setattr(norm, "_rms_norm_kernel", launches)
    path = make_tiny_mixtral(tmp_path / "m", layers=2, seed=4)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(4))
    model = offload.load(str(path), device="cpu", slots=2, prefetch="late")
    assert model.decoder.fused_norm and model.moe.prefetcher.fused_norm
    got = teacher_forced(model, tokens)
    with torch.no_grad():
        expected = hf_model(path)(tokens[None]).logits[0]
    assert (got - expected).abs().max().item() < 1e-4
    layers = model.config.num_layers
    guesses = DECODE * (layers - 1)  # the last layer guesses no next one
    assert len(launches.grids) == (1 + DECODE) * (2 * layers + 1) + guesses
    assert launches.adds == 0  # the eager path adds the attention's output before the norm


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py replays on CUDA")
def test_the_static_path_with_the_fused_norm_equals_the_eager_one(tmp_path, monkeypatch):
    """The static decode path (its graphs run eagerly on the CPU) adds the attention's output into the residual
    stream in the post-attention norm's kernel, and the MoE block's output in the next layer's input norm's (the
    last layer's in the head's), where the eager path adds each before: the same logits, cache decisions and
    trace."""
    turn_on(monkeypatch)
    launches = Launches(norm._rms_norm_kernel)
    monkeypatch.setattr(norm, "_rms_norm_kernel", launches)
    path = make_tiny_mixtral(tmp_path / "m", layers=2, seed=6)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(6))
    static = assert_static_equals_eager(path, tokens, slots=2, prefetch="late")
    layers = static.config.num_layers
    assert static.decoder.fused_norm and launches.adds == DECODE * 2 * layers  # the static steps'


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA the first tries run at load: tests/test_cuda.py")
def test_first_tries_decide_whether_the_decoder_takes_the_kernels(tmp_path, monkeypatch):
    """works: off CUDA, why not, in words. first_try (what a CUDA device runs once, here interpreted): None where
    the kernel runs and agrees with transformers' steps, else why not; a decoder whose tries fail takes torch's."""
    cpu = torch.device("cpu")
    assert norm.works(cpu, torch.float32) == rope.works(cpu, torch.float32) == "not a CUDA device"
    assert norm.first_try(cpu, torch.float32) is None and rope.first_try(cpu, torch.float16) is None

    def unsupported(*args):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120")

    monkeypatch.setattr(norm, "fused_rms_norm", unsupported)
    monkeypatch.setattr(rope, "rotate", lambda x, cos, sin, positions: 2 * x)
    assert norm.first_try(cpu, torch.float32) == "RuntimeError: PTX .version 8.7 does not support .target sm_120"
    assert rope.first_try(cpu, torch.float32) == "the kernel's rotation differs from transformers' steps"
    monkeypatch.setattr(norm, "works", norm.first_try)  # as on a CUDA device
    monkeypatch.setattr(rope, "works", rope.first_try)
    path = make_tiny_mixtral(tmp_path / "m", layers=1, seed=9)
    with pytest.warns(UserWarning) as warned:
        model = offload.load(str(path), device="cpu")
    assert not model.decoder.fused_norm and not model.decoder.fused_rope
    assert [str(w.message) for w in warned if "first try" in str(w.message)] == [
        "RMSNorm runs in torch's steps here: its kernel's first try failed (RuntimeError: PTX .version 8.7 does not "
        "support .target sm_120)",
        "RoPE runs in torch's steps here: its kernel's first try failed (the kernel's rotation differs from "
        "transformers' steps)",
    ]
