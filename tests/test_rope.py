"""RoPE in one kernel (offload/rope.py).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) on CPU tensors; it truncates float32 to
bfloat16 where a GPU rounds to nearest, so bfloat16 is checked on CUDA alone. tests/test_norm.py's model tests run
with this kernel too (Decoder.fused_rope comes with fused_norm).
"""

import pytest
import torch

import offload
import offload.decoder
from offload import rope
from offload.rope import apply_rope, rotate
from tests.test_norm import turn_on
from tests.test_offload_oracle import DECODE, PROMPT
from tests.test_offload_oracle import run_teacher_forced as teacher_forced
from tests.tiny import hf_model, make_tiny_mixtral

pytestmark = pytest.mark.skipif(rope.triton is None, reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


class Launches:
    """Stands in for the kernel in offload/rope.py and records the grids it is launched on."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.grids.append(grid)
            return self.kernel[grid](*args, **keywords)

        return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 128), (1, 8, 128), (3, 6, 12), (2, 1, 16)], ids=str)  # [T, heads, S]
def test_the_fused_rotation_is_transformers_bit_for_bit(dtype, shape):
    """Each product rounded to the dtype, then the sum, as transformers' steps round; at positions out of order
    (a decode step's comes from a device tensor), heads and a head size not powers of two (6 of 12)."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    cos, sin = (torch.randn(20, shape[2], generator=generator).to(DEVICE, dtype) for _ in range(2))
    positions = torch.tensor([5, 0, 19][: shape[0]], device=DEVICE)
    expected = apply_rope(x, cos[positions], sin[positions])
    got = rotate(x, cos, sin, positions)
    if dtype == torch.float32 and DEVICE.type == "cuda":  # ptxas may fuse a product into the sum (FMA)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)


def test_the_decoder_rotates_in_the_kernel_where_it_takes_the_tensors(monkeypatch):
    """Decoder._rotate: the kernel where fused_rope and the tables are x's dtype, else transformers' steps on the
    tables' rows, a view of them from `start` or gathered at the positions."""
    launches = Launches(rope._rope_kernel)
    monkeypatch.setattr(rope, "_rope_kernel", launches)
    decoder = offload.decoder.Decoder.__new__(offload.decoder.Decoder)  # _rotate reads the tables and the flag only
    generator = torch.Generator().manual_seed(3)
    decoder.cos, decoder.sin = (torch.randn(12, 16, generator=generator).to(DEVICE) for _ in range(2))
    x = torch.randn(2, 4, 16, generator=generator).to(DEVICE)
    positions = torch.tensor([3, 4], device=DEVICE)
    expected = apply_rope(x, decoder.cos[3:5], decoder.sin[3:5])
    decoder.fused_rope = False
    assert torch.equal(decoder._rotate(x, positions, 3), expected) and torch.equal(
        decoder._rotate(x, positions), expected
    )
    assert launches.grids == []
    decoder.fused_rope = True
    assert torch.equal(decoder._rotate(x, positions), expected) and launches.grids == [(2,)]
    assert torch.equal(
        decoder._rotate(x.double(), positions, 3), apply_rope(x.double(), decoder.cos[3:5], decoder.sin[3:5])
    )
    assert launches.grids == [(2,)]  # float64 queries against float32 tables: transformers' steps


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreted on CPU tensors; tests/test_cuda.py decodes on CUDA")
def test_a_model_rotating_in_the_kernel_equals_transformers(tmp_path, monkeypatch):
    """A whole model with its queries and keys rotated in the kernel (as on CUDA), on the eager path: logits against
    transformers', two launches a layer and forward."""
    turn_on(monkeypatch)
    launches = Launches(rope._rope_kernel)
    monkeypatch.setattr(rope, "_rope_kernel", launches)
    path = make_tiny_mixtral(tmp_path / "m", layers=2, seed=8)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(8))
    model = offload.load(str(path), device="cpu")
    assert model.decoder.fused_rope
    got = teacher_forced(model, tokens)
    with torch.no_grad():
        expected = hf_model(path)(tokens[None]).logits[0]
    assert (got - expected).abs().max().item() < 1e-4
    layers = model.config.num_layers
    assert launches.grids == ([(PROMPT,)] * 2 * layers) + [(1,)] * 2 * layers * DECODE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 3])
def test_the_keys_rotation_writes_the_kv_cache(dtype, tokens):
    """rotate_into_cache: the keys rotated as apply_rope rotates them, into the key cache at each token's position
    (out of order, as a decode step's comes from the device), and the values copied into theirs; every other row of
    both caches as it was."""
    generator = torch.Generator().manual_seed(tokens)
    keys, values = (torch.randn(tokens, 2, 12, generator=generator).to(DEVICE, dtype) for _ in range(2))
    cos, sin = (torch.randn(20, 12, generator=generator).to(DEVICE, dtype) for _ in range(2))
    key_cache, value_cache = (torch.randn(2, 20, 12, generator=generator).to(DEVICE, dtype) for _ in range(2))
    positions = torch.tensor([7, 0, 19][:tokens], device=DEVICE)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    expected_keys[:, positions] = apply_rope(keys, cos[positions], sin[positions]).transpose(0, 1)
    expected_values[:, positions] = values.transpose(0, 1)
    rope.rotate_into_cache(keys, values, cos, sin, positions, key_cache, value_cache)
    if dtype == torch.float32 and DEVICE.type == "cuda":  # ptxas may fuse a product into the sum (FMA)
        torch.testing.assert_close(key_cache, expected_keys, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(key_cache, expected_keys)
    assert torch.equal(value_cache, expected_values)


def test_the_decoder_writes_the_kv_cache_in_the_kernel_where_it_takes_the_tensors(monkeypatch):
    """Decoder._write_kv: one launch where fused_rope and the caches are the keys' dtype, else the rotation and the
    copies (a prefill's into the slice from its start, a decode step's by index_copy_): the same cache either way."""
    launches = Launches(rope._rope_kernel)
    monkeypatch.setattr(rope, "_rope_kernel", launches)
    decoder = offload.decoder.Decoder.__new__(offload.decoder.Decoder)  # _write_kv reads the tables, caches and flag
    generator = torch.Generator().manual_seed(4)
    decoder.cos, decoder.sin = (torch.randn(12, 16, generator=generator).to(DEVICE) for _ in range(2))
    decoder.k_cache, decoder.v_cache = (torch.zeros(2, 2, 12, 16, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(3, 2, 16, generator=generator).to(DEVICE) for _ in range(2))
    positions = torch.tensor([4, 5, 6], device=DEVICE)
    caches = []
    for fused, start in ((False, 4), (False, None), (True, 4), (True, None)):
        decoder.fused_rope = fused
        decoder.k_cache.zero_(), decoder.v_cache.zero_()
        decoder._write_kv(1, k, v, positions, start)
        caches.append((decoder.k_cache.clone(), decoder.v_cache.clone()))
    assert launches.grids == [(3,), (3,)]  # the fused writes, one launch each
    rotated = apply_rope(k, decoder.cos[4:7], decoder.sin[4:7]).transpose(0, 1)
    for key_cache, value_cache in caches:
        assert torch.equal(key_cache[1, :, 4:7], rotated) and torch.equal(value_cache[1, :, 4:7], v.transpose(0, 1))
        assert key_cache[0].abs().sum() == key_cache[1, :, :4].abs().sum() == value_cache[1, :, 7:].abs().sum() == 0
    decoder.k_cache, decoder.v_cache = decoder.k_cache.double(), decoder.v_cache.double()
    decoder._write_kv(1, k.double(), v.double(), positions)  # float64 keys against float32 tables: torch's steps
    assert launches.grids == [(3,), (3,)] and torch.equal(decoder.v_cache[1, :, 4:7], v.double().transpose(0, 1))
