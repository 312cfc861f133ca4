"""The embedding table in host memory, read by the GPU in place.

A step reads one row of the embedding table per token: 8 KB of Mixtral-8x7B's 262 MB in bfloat16 (32000 x
4096). On the GPU those 262 MB would be four 2-bit expert slots that a step barely touches. So on CUDA the
table stays in RAM, in registered host memory, which the GPU maps into its address space (cudaHostRegister
maps it on every system with unified addressing, that is every 64-bit one). `gather_rows`, a Triton kernel,
reads each token's row over PCIe straight into the residual stream:
  - the ids stay on the device, so nothing synchronizes: bench's decode loop never waits for its token;
  - there is no staging buffer and no copy to order, and a decode step's lookup is one kernel that the first
    layer's CUDA graph captures like any other.
llama.cpp keeps its input embeddings in host memory for the same reason. The output layer (lm_head) reads
its whole table at every step, so it stays on the GPU; a model whose lm_head is the embedding
(tie_word_embeddings) keeps the table there too.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from cache.expert_cache import pin_in_place

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the table stays on the GPU then
    triton = None

BLOCK = 1024  # table entries per program: a Mixtral row (4096) is four programs, each reading 2 KB in bfloat16


def host_table(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The table [V, D] in `dtype`, in host memory that the GPU can read in place (plain host memory where
    there is no CUDA: under Triton's interpreter in tests). A fresh buffer, never a view of a memory-mapped
    checkpoint: registering a file's pages would lock the file."""
    table = torch.empty(weight.shape, dtype=dtype)
    table.copy_(weight)
    return pin_in_place(table) if torch.cuda.is_available() else table


def gather_rows(table: Tensor, ids: Tensor, out: Tensor | None = None) -> Tensor:
    """table[ids] -> [T, D], into `out` when given (no allocation then). ids [T] int64 or int32 on the device;
    an id outside the table gives a row of zeros (F.embedding would fail a device-side assert)."""
    # T = tokens, V = vocab, D = hidden
    assert triton is not None, "gather_rows needs Triton"
    assert ids.dim() == 1 and ids.dtype in (torch.long, torch.int), (ids.shape, ids.dtype)
    ids = ids.contiguous()  # the kernel reads id t at ids + t
    vocab, hidden = table.shape
    if out is None:
        out = torch.empty(ids.shape[0], hidden, dtype=table.dtype, device=ids.device)
    assert out.shape == (ids.shape[0], hidden) and out.dtype == table.dtype and out.is_contiguous(), out.shape
    _gather_rows_kernel[(ids.shape[0], triton.cdiv(hidden, BLOCK))](ids, table, out, vocab, hidden, BLOCK=BLOCK)
    return out


@functools.cache
def reads_host_memory(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a kernel on `device` reads registered host memory in place, as gather_rows does; else why
    not, in words. Tried once per device and dtype, on a 16 x 64 table: sizes that are multiples of 16, as
    a real vocabulary and hidden size are, so Triton compiles the variant the model runs (16-byte loads)."""
    if triton is None:
        return "Triton is not installed"
    try:
        table = host_table(torch.arange(16 * 64).view(16, 64), dtype)
        got = gather_rows(table, torch.tensor([9, 0, 15], device=device)).cpu()
    except Exception as error:  # noqa: BLE001 -- any failure means one thing: keep the table on the GPU
        return f"{type(error).__name__}: {error}"
    return None if torch.equal(got, table[[9, 0, 15]]) else "the rows read in place differ from the table"


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(ids_ptr, table_ptr, out_ptr, V, D, BLOCK: tl.constexpr):
        t = tl.program_id(0)  # the token
        d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] entries of its row
        row = tl.load(ids_ptr + t) + tl.zeros([BLOCK], dtype=tl.int64)  # [BLOCK] its id, int64: no overflow
        inside = (d < D) & (row >= 0) & (row < V)
        values = tl.load(table_ptr + row * D + d, mask=inside, other=0)
        tl.store(out_ptr + t * D + d, values, mask=d < D)
