"""The embedding table in host memory (offload/embedding.py): the rows gather_rows reads, a model that keeps
its table there, and when the table may stay in RAM. On the CPU the kernel runs under Triton's interpreter;
tests/test_cuda.py reads registered host memory from a real GPU."""

import pytest
import torch
import torch.nn.functional as F

import offload
from offload import api
from offload import decoder as decoder_module
from offload.decoder import Decoder
from offload.embedding import BLOCK, gather_rows, host_table
from quant.errors import MoEOffloadError
from tests.test_graphs import CountedGraphs
from tests.test_offload_oracle import DECODE, PROMPT
from tests.test_offload_oracle import run_teacher_forced as teacher_forced
from tests.tiny import make_tiny_mixtral

CUDA = torch.device("cuda")
# where the kernel runs: the GPU when there is one (host_table then registers the table), else the CPU under
# Triton's interpreter (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [8, BLOCK + 3, 2 * BLOCK])
def test_gather_rows_are_the_tables_rows(dtype, hidden):
    table = host_table(torch.randn(50, hidden, generator=torch.Generator().manual_seed(hidden)), dtype)
    ids = torch.tensor([7, 0, 49, 7, 13])  # a repeat, the first and the last row
    want = F.embedding(ids, table)
    assert torch.equal(gather_rows(table, ids.to(DEVICE)).cpu(), want)
    assert torch.equal(gather_rows(table, ids.int().to(DEVICE)).cpu(), want)  # int32 ids, as F.embedding takes
    strided = torch.stack([ids, ids + 1], dim=1)[:, 0]  # every other element of its storage
    assert torch.equal(gather_rows(table, strided.to(DEVICE)).cpu(), want)
    out = torch.full((5, hidden), float("nan"), dtype=dtype, device=DEVICE)
    assert gather_rows(table, ids.to(DEVICE), out) is out and torch.equal(out.cpu(), want)


def test_an_id_outside_the_table_reads_zeros_not_memory_past_it():
    table = host_table(torch.ones(4, 8), torch.float32)
    got = gather_rows(table, torch.tensor([4, -1, 3], device=DEVICE)).cpu()
    assert torch.equal(got, torch.tensor([[0.0] * 8, [0.0] * 8, [1.0] * 8]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_mixtral(tmp_path_factory.mktemp("tiny"), layers=2, seed=5)
    tokens = torch.randint(3, 128, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(5))
    return path, tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU model; tests/test_cuda.py has its CUDA twin")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_a_table_in_host_memory_gives_the_same_logits_bit_for_bit(tiny, monkeypatch, graphs):
    """The host table on the CPU is the same memory as the device one, so only the lookup differs: gather_rows
    at the prefill and at every decode step (in the first layer's graph piece on the static path)."""
    path, tokens = tiny
    on_device = offload.load(str(path), device="cpu", slots=2, expert_bits="2")
    monkeypatch.setattr(api, "resolve_host_embedding", lambda option, config, device, dtype: True)
    in_ram = offload.load(str(path), device="cpu", slots=2, expert_bits="2")
    calls = []
    monkeypatch.setattr(decoder_module, "gather_rows", lambda *args: calls.append(args[1].shape) or gather_rows(*args))
    for model in (on_device, in_ram):
        model.decoder.graphs = CountedGraphs() if graphs else None
    assert torch.equal(teacher_forced(in_ram, tokens), teacher_forced(on_device, tokens))
    assert calls == [(PROMPT,)] + [(1,)] * DECODE
    assert in_ram.info()["embedding"] == "in RAM, read in place by the GPU"
    assert on_device.info()["embedding"] == "with the resident weights"


def test_a_tied_table_stays_with_lm_head(tmp_path):
    path = make_tiny_mixtral(tmp_path / "tied", tie=True)
    model = offload.load(str(path), device="cpu")
    with pytest.raises(ValueError, match="the embedding is lm_head too"):
        Decoder(model.config, model.decoder.weights, model.moe, host_embedding=True)


def test_when_the_table_stays_in_ram(tiny, tmp_path):
    config = offload.load(str(tiny[0]), device="cpu").config
    tied = make_tiny_mixtral(tmp_path / "tied", tie=True)
    tied_config = offload.load(str(tied), device="cpu").config
    resolve = api.resolve_host_embedding
    assert resolve(None, config, torch.device("cpu"), torch.float32) is False  # the CPU: the table is in RAM
    assert resolve(False, config, CUDA, torch.bfloat16) is False
    assert resolve(None, tied_config, CUDA, torch.bfloat16) is False  # lm_head reads it whole every step
    with pytest.raises(MoEOffloadError) as error:
        resolve(True, config, torch.device("cpu"), torch.float32)
    assert str(error.value) == "--host-embedding runs on CUDA only; on the CPU the table is in RAM already"
    with pytest.raises(MoEOffloadError) as error:
        resolve(True, tied_config, CUDA, torch.bfloat16)
    assert str(error.value) == (
        "--host-embedding: this model's lm_head is its embedding table, which the GPU reads whole at every step, "
        "so the table stays on the GPU; leave the option out"
    )


def test_where_the_gpu_cannot_read_ram_the_table_stays_on_it(tiny, monkeypatch):
    config = offload.load(str(tiny[0]), device="cpu").config
    monkeypatch.setattr(api, "reads_host_memory", lambda device, dtype: "Triton is not installed")
    assert api.resolve_host_embedding(None, config, CUDA, torch.bfloat16) is False
    with pytest.raises(MoEOffloadError) as error:
        api.resolve_host_embedding(True, config, CUDA, torch.bfloat16)
    assert str(error.value) == "--host-embedding: the GPU cannot read the table in RAM here (Triton is not installed)"


def test_the_plan_counts_the_table_in_ram_not_on_the_gpu(tiny, monkeypatch):
    """prepare() gives the planner the table's bytes apart, in the dtype the table will have."""
    path, _ = tiny
    asked = []
    real_plan_memory = api.plan_memory
    monkeypatch.setattr(api, "plan_memory", lambda **kwargs: asked.append(kwargs) or real_plan_memory(**kwargs))
    api.prepare(str(path), device="cpu", slots=2, dtype="float16")
    monkeypatch.setattr(api, "resolve_host_embedding", lambda option, config, device, dtype: True)
    prepared = api.prepare(str(path), device="cpu", slots=2, dtype="float16")
    config = prepared.config
    table = config.vocab_size * config.hidden_size
    assert asked[1]["host_resident_bytes"] == table * 2  # float16, though the checkpoint holds float32
    assert asked[0]["host_resident_bytes"] == 0
    assert asked[0]["resident_bytes"] - asked[1]["resident_bytes"] == table * 2  # moved out, at the same width
