"""The shared decoder: embeddings, RMSNorm, RoPE, GQA attention with a static KV cache, the layer walk.

The MoE block is injected: `moe(layer, x, h_mid) -> Tensor[T, D]` with x the post-attention normed
hidden state and h_mid the residual after attention (the early point for a prefetch guess), and
optionally `moe.layer_done(layer, h)` once layer `layer`'s output is known (the late point). The
residual stream is updated in place, so a block or hook that keeps h_mid or h past its call must copy
it. The decoder knows nothing of caches, quantization formats or families; it matches transformers'
MixtralModel (RMSNorm in float32, rotate_half RoPE, sliding-window mask `k > q - window`).

Nothing here synchronizes the device: positions are Python ints, and a decode step needs no mask
(the key range it reads is the mask). Buffers (KV cache, RoPE tables, positions) are made at init;
the static path's (below) at the first decode step.
With `host_embedding` the embedding table stays in host memory and the GPU reads each token's row in
place (offload/embedding.py): the ids stay on the device all the same.

With `graphs` set (offload/graphs.py), a decode step takes the static path instead: its token and
position live in device buffers, the KV write is an index_copy_ and attention reads a fixed key range
under a mask, so the resident part of each layer is the same kernels at the same addresses every step,
and CUDA graphs replay it. The experts run eagerly between the graphs (see `_decode_static`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.backends.cuda import SDPAParams, can_use_flash_attention

from offload import norm, rope
from offload.embedding import gather_rows, host_table
from offload.graphs import DecodeGraphs, key_range
from offload.norm import normed, takes
from offload.rope import apply_rope
from quant import cpu_gemv
from quant.errors import MoEOffloadError
from quant.hqq import Workspace
from quant.linear import linear

# A prefill's attention takes this many queries at a time, and each expert this many of its tokens (the MoE
# block), so a long prompt's activations grow with the chunk, not the prompt, and the plan keeps them free
# (offload.api.prefill_reserve). A layer still loads each expert once: the chunks run one layer at a time.
PREFILL_CHUNK = 1024
# Beyond any context this runs: a chunk longer than the prompt takes it whole. torch's split overflows past int64.
MAX_PREFILL_CHUNK = 2**20
# On the CPU in float32, these tables stay at the checkpoint's width when it is float16 or bfloat16 (Mixtral's
# is): each embedding row is widened as it is read, and the lm_head's products widen each weight (quant/linear.py).
# Half their RAM (Mixtral-8x7B: 262 MB each), and the lm_head, which a decode step reads whole, reads half the bytes
NARROW_TABLES = ("embed", "lm_head")


def keeps_width(name: str, weight: Any, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether resident weight `name` stays at its checkpoint's width: a float16 or bfloat16 table of
    NARROW_TABLES, on the CPU in float32."""
    return (
        name in NARROW_TABLES and isinstance(weight, Tensor) and weight.dtype in cpu_gemv.WIDE_DTYPES
        and torch.device(device).type == "cpu" and dtype == torch.float32
    )  # fmt: skip


def check_prefill_chunk(chunk: int) -> None:
    if chunk < 1:
        raise MoEOffloadError(f"--prefill-chunk must be at least 1, got {chunk}")
    if chunk > MAX_PREFILL_CHUNK:
        raise MoEOffloadError(
            f"--prefill-chunk must be at most {MAX_PREFILL_CHUNK} (a chunk longer than the prompt takes it whole), "
            f"got {chunk}"
        )


def positive_int(value: Any) -> bool:
    return type(value) is int and value > 0  # JSON's true is no count, nor 2.0 or "2"


# ModelConfig's sizes and counts
_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "num_experts", "vocab_size", "max_position")  # fmt: skip


def check_config(values: Mapping[str, Any], names: Mapping[str, str]) -> None:
    """Refuse values the decoder cannot run, which would otherwise fail mid-load or run silently wrong.
    `values` are keyed by ModelConfig's fields; `names` spells a field as the user's file does, where it differs."""

    def name(field: str) -> str:
        return names.get(field, field)

    def refuse(field: str, rule: str) -> NoReturn:
        raise MoEOffloadError(f"{name(field)} {values.get(field)!r} {rule}")

    for field in _POSITIVE_INTS:
        if not positive_int(values.get(field)):
            refuse(field, "must be a positive integer")
    experts, kv_heads = values["num_experts"], values["num_kv_heads"]
    if not (positive_int(values.get("top_k")) and values["top_k"] <= experts):
        refuse("top_k", f"must be between 1 and {name('num_experts')} ({experts})")
    if values["num_heads"] % kv_heads:  # each key head serves a whole group of query heads (GQA)
        refuse("num_heads", f"must be a multiple of {name('num_kv_heads')} ({kv_heads})")
    if values["head_dim"] % 2:  # as transformers (past 4): rope_tables would be a column wider than a head
        refuse("head_dim", "must be even: rotary embeddings turn its dimensions in pairs")
    for field in ("rms_norm_eps", "rope_theta"):
        if not (type(values.get(field)) in (int, float) and 0 < values[field] < math.inf):
            refuse(field, "must be a positive finite number")
    if values.get("sliding_window") is not None and not positive_int(values["sliding_window"]):
        refuse("sliding_window", "must be a positive integer or null")
    if type(values.get("tie_word_embeddings")) is not bool:
        refuse("tie_word_embeddings", "must be true or false")
    if values.get("bos_token_id") is not None and type(values["bos_token_id"]) is not int:
        refuse("bos_token_id", "must be an integer or null")
    eos = values.get("eos_token_ids", ())
    if not (type(eos) is int or (isinstance(eos, (list, tuple)) and all(type(i) is int for i in eos))):
        refuse("eos_token_ids", "must be an integer or a list of integers")


@dataclass(frozen=True)
class ModelConfig:
    """What the shared decoder, the MoE block and the planner need, whatever the family."""

    model_type: str
    hidden_size: int  # D
    intermediate_size: int  # I, per expert
    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # K; H % K == 0 (GQA)
    head_dim: int  # S
    num_experts: int  # E, per layer
    top_k: int  # experts per token
    vocab_size: int  # V
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None  # None: full causal attention
    max_position: int  # max_position_embeddings: the longest context the model was trained for
    tie_word_embeddings: bool  # lm_head is the embedding
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """A layer's attention projections and their shapes [out, in]."""
        D, H, K, S = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        return {"q_proj": (H * S, D), "k_proj": (K * S, D), "v_proj": (K * S, D), "o_proj": (D, H * S)}

    def resident_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight that stays on the device (all but the experts), by our name, with its shape."""
        D, V = self.hidden_size, self.vocab_size
        shapes = {"embed": (V, D), "norm": (D,), "lm_head": (V, D)}
        for layer in range(self.num_layers):
            prefix = f"layers.{layer}."
            shapes[prefix + "input_norm"] = (D,)
            shapes |= {prefix + name: shape for name, shape in self.attention_shapes().items()}
            shapes |= {prefix + "post_norm": (D,), prefix + "router": (self.num_experts, D)}
        return shapes

    def kv_cache_bytes(self, max_seq_len: int, dtype: torch.dtype) -> int:
        """The static KV cache Decoder allocates: keys and values of every layer, [K, max_seq_len, S] each."""
        return 2 * self.num_layers * self.num_kv_heads * max_seq_len * self.head_dim * dtype.itemsize

    def prefill_bytes(self, tokens: int, chunk: int, dtype: torch.dtype, repeat_kv: bool = False) -> int:
        """A bound on the activations of a prefill of `tokens` tokens at its peak, beyond the weights, the KV
        cache and the dequantization workspace (quant.linear.workspace_bytes): what Decoder.forward and the
        MoE block hold at once, `chunk` tokens at a time (PREFILL_CHUNK). `repeat_kv`: a masked span
        repeats the key heads (Decoder._attention, on CUDA). benchmarks/prefill_memory.py measures it."""
        # T = tokens, c = chunk, b = bytes per element; the float32 of RMSNorm and of routing is 4
        T, c, b = tokens, min(chunk, tokens), dtype.itemsize
        D, I, E, k = self.hidden_size, self.intermediate_size, self.num_experts, self.top_k
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # the residual stream, the MoE block's input and its output; the router's logits, choices and weights
        stream = T * (3 * D * b + E * (b + 4) + k * 32)
        # a span's norm in float32 (two copies), its queries with their rotation, keys, values, and output;
        # a masked span's boolean mask [c, T] and the bias SDPA makes of it
        attention = c * (2 * D * 4 + (2 * q_width + 3 * kv_width + D) * b) + c * T * (1 + b)
        if repeat_kv and self.num_heads != self.num_kv_heads:
            attention += 2 * T * q_width * b  # the repeated keys and values
        # an expert's chunk of tokens, its two [c, I] products and its output; and a float32 [c, D] more, which
        # the measurement finds beside them
        expert = c * ((2 * I + 2 * D) * b + D * 4)
        return stream + max(attention, expert)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], names: Mapping[str, str] = {}) -> ModelConfig:
        """Our field names (a manifest's config), checked (check_config); `names`: how the user's file spells them."""
        if not isinstance(data, Mapping):
            raise MoEOffloadError(f"config {data!r} must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        check_config(data, names)
        eos = data.get("eos_token_ids", ())
        eos = (eos,) if type(eos) is int else tuple(eos)  # a tuple, so that the frozen config hashes
        return cls(**{**data, "rope_theta": float(data["rope_theta"]), "eos_token_ids": eos})


def rope_tables(config: ModelConfig, max_seq_len: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, S], computed in float32 exactly as transformers does, then cast."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [S/2]
    freqs = torch.arange(max_seq_len, dtype=torch.float)[:, None] * inv_freq[None, :]  # [N, S/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, S]
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def repeat_kv_policy(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Which prefill spans with grouped key heads repeat them for SDPA: "masked", "always" or none.

    CUDA's SDPA runs grouped heads in its flash and math kernels only. Flash takes no mask (a later prefill
    chunk, a chat turn), and serves no GPU before Ampere (a Colab T4) and no float32; the math kernel makes
    float32 scores [H, T, N]. Repeated key heads let the memory-efficient kernel run instead, as
    transformers does. Whether flash serves an unmasked span is asked of torch itself, with this model's
    heads. The CPU's fused kernel takes grouped heads under a mask as they are. A decode step's single
    query never repeats: one_query_attention gives each key head its group of queries instead."""
    if device.type != "cuda" or config.num_heads == config.num_kv_heads:
        return None
    return "masked" if _flash_serves(config, device, dtype) else "always"


def _flash_serves(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA's flash kernel takes an unmasked causal span of this model's grouped heads here."""
    q = torch.empty(1, config.num_heads, 2, config.head_dim, device=device, dtype=dtype)
    kv = torch.empty(1, config.num_kv_heads, 2, config.head_dim, device=device, dtype=dtype)
    return can_use_flash_attention(SDPAParams(q, kv, kv, None, 0.0, True, True), False)  # causal, grouped


def one_query_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
    """One token's attention: q [H, S] over keys and values [K, N, S], under `mask` [N] (True: attend) -> [H, S].

    The query heads that share a key head are taken as that key head's H/K queries, so SDPA sees plain
    attention over K heads, 4-D, as its fused kernels want it: no key is repeated, and on CUDA a masked call
    (the static path's) or a T4's runs the memory-efficient kernel. With the heads as they are and enable_gqa,
    those ran the math kernel, which repeats the keys and values to every query head in float32: 192 MiB held a
    layer for Mixtral at 4096 keys (benchmarks/decode_attention.py).
    """
    # H = heads, K = kv heads, S = head dim, N = keys
    heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    grouped = q.reshape(1, kv_heads, heads // kv_heads, head_dim)  # head h: key head h // (H/K), as repeat_kv
    mask = None if mask is None else mask.view(1, 1, 1, -1)  # 4-D as well: the CPU's kernel takes no other
    return F.scaled_dot_product_attention(grouped, keys[None], values[None], attn_mask=mask).view(heads, head_dim)


class Decoder:
    """Resident weights, the static KV cache and the layer walk, for one sequence (batch 1)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Any],
        moe,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
        workspace: Workspace | None = None,
        graphs: DecodeGraphs | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        host_embedding: bool = False,
    ) -> None:
        check_prefill_chunk(prefill_chunk)
        if host_embedding and config.tie_word_embeddings:
            raise ValueError("the embedding is lm_head too, which reads all of it every step: it stays on the device")
        self.config = config
        self.prefill_chunk = prefill_chunk
        self.moe = moe
        # quantized weights dequantize into these buffers, made on first use: no weight-sized allocation per step
        self.workspace = workspace or Workspace()
        self.layer_done = getattr(moe, "layer_done", None)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_seq_len = max_seq_len or min(config.max_position, 4096)
        self.eps = config.rms_norm_eps
        # on CUDA, each RMSNorm (and the residual add before the MoE block's) in one kernel (offload/norm.py), and
        # the queries' and keys' rotation in one each (offload/rope.py)
        self.fused_norm = takes("RMSNorm", norm.works(self.device, dtype))
        self.fused_rope = takes("RoPE", rope.works(self.device, dtype))
        # the table in host memory, each token's row read in place by gather_rows (offload/embedding.py)
        self.host_embedding = host_embedding
        assert config.num_heads % config.num_kv_heads == 0, (config.num_heads, config.num_kv_heads)

        self.weights: dict[str, Any] = {}
        for name, shape in config.resident_shapes().items():
            if name == "lm_head" and config.tie_word_embeddings and name not in weights:
                self.weights[name] = self.weights["embed"]
                continue
            if name not in weights:
                raise MoEOffloadError(f"the checkpoint has no tensor {name!r}; it is incomplete, re-download it")
            self.weights[name] = self._resident(name, weights[name], shape)

        # static KV cache, allocated once: [layers, K, max_seq_len, S] each, so a layer's keys are a view
        cache_shape = (config.num_layers, config.num_kv_heads, self.max_seq_len, config.head_dim)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
        self.cos, self.sin = rope_tables(config, self.max_seq_len, self.device, dtype)
        self.positions = torch.arange(self.max_seq_len, device=self.device)  # for prefill masks
        self.repeat_kv = repeat_kv_policy(config, self.device, dtype)  # which prefill spans repeat the key heads
        # the static decode path (module docstring): on when graphs are given and the MoE block has its halves
        self.graphs = graphs if graphs is not None and hasattr(moe, "route_into") else None
        self._static: StaticStep | None = None

    def _resident(self, name: str, weight: Any, shape: tuple[int, ...]) -> Any:
        """A plain tensor goes to the device and dtype; a quantized one stays as given. Both shapes checked."""
        if tuple(weight.shape) != shape:
            raise MoEOffloadError(
                f"tensor {name!r} has shape {tuple(weight.shape)} but config.json implies {shape}; "
                "the checkpoint and its config.json do not belong together"
            )
        if not isinstance(weight, Tensor):
            return weight
        if name == "embed" and self.host_embedding:
            try:
                return host_table(weight, self.dtype)
            except RuntimeError as error:  # cudaHostRegister refused: a memlock limit, say
                raise MoEOffloadError(
                    f"could not keep the embedding table in RAM ({error}); run with --no-host-embedding"
                ) from error
        if keeps_width(name, weight, self.device, self.dtype):  # each row or product widened as it is read
            return weight.to(self.device)
        return weight.to(self.device, self.dtype)

    def router(self, layer: int) -> Tensor:
        return self.weights[f"layers.{layer}.router"]  # [E, D]

    def post_norm(self, layer: int) -> Tensor:
        return self.weights[f"layers.{layer}.post_norm"]  # [D]

    def reset(self) -> None:
        """Forget the sequence. Positions past the last forward are never read, so this is for tidiness."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, start_pos: int, *, last_only: bool = False) -> Tensor:
        """Logits [T, V] (or [1, V] with last_only) in float32 for tokens at start_pos .. start_pos+T-1.

        A layer's attention runs over spans of `prefill_chunk` queries, each added into the residual stream
        in place: a span's keys and values are in the cache before a later span reads them, and a span
        reads only its own rows of the stream, so the result is that of all queries at once.
        """
        # T = tokens, D = hidden, V = vocab
        tokens = input_ids.shape[0]
        end = start_pos + tokens
        if tokens == 0:
            raise MoEOffloadError("no tokens to run; give at least one")
        if end > self.max_seq_len:
            raise MoEOffloadError(
                f"{tokens} tokens at position {start_pos} need a context of {end}, but it holds "
                f"{self.max_seq_len}; shorten the prompt or raise max_seq_len"
            )
        if tokens == 1 and self.graphs is not None:
            return self._decode_static(input_ids, start_pos)
        w = self.weights
        h = self._embed(input_ids)  # [T, D], the residual stream, added to in place
        spans = [(s, min(s + self.prefill_chunk, tokens)) for s in range(0, tokens, self.prefill_chunk)]
        x = torch.empty_like(h) if len(spans) > 1 else None  # each layer's MoE input, a span at a time
        for layer in range(self.config.num_layers):
            input_norm, post_norm = w[f"layers.{layer}.input_norm"], w[f"layers.{layer}.post_norm"]
            for s, e in spans:
                part = h[s:e]  # a view: the add writes h
                mask = self._mask(start_pos + s, e - s)  # None: decode, or a fresh full-causal span
                part += self._attention(layer, self._norm(part, input_norm), start_pos + s, mask)
                if len(spans) == 1:  # one span (every decode step): no copy
                    x = self._norm(part, post_norm)
                else:
                    self._norm(part, post_norm, out=x[s:e])
            h += self.moe(layer, x, h)
            if self.layer_done is not None:
                self.layer_done(layer, h)
        if last_only:
            h = h[-1:]
        return linear(self._norm(h, w["norm"]), w["lm_head"], self.workspace).float()  # [T, V]

    def _norm(self, x: Tensor, weight: Tensor, out: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        """offload/norm.py's normed, in one kernel where fused_norm: with `add` (the attention's output), the
        residual stream's add first. The static path adds so; the eager one adds before, where the attention's
        output is freed before the norm's float32 copies are made (prefill_bytes bounds a prefill's peak so)."""
        return normed(x, weight, self.eps, fused=self.fused_norm, out=out, add=add)

    __call__ = forward

    def _embed(self, ids: Tensor, out: Tensor | None = None) -> Tensor:
        """The rows of ids [T] -> [T, D] on the device, into `out` when given."""
        table = self.weights["embed"]
        if self.host_embedding:
            return gather_rows(table, ids, out)
        rows = F.embedding(ids, table)
        return rows.to(self.dtype) if out is None else out.copy_(rows)

    def _rotate(self, x: Tensor, positions: Tensor, start: int | None = None) -> Tensor:
        """Queries or keys x [T, heads, S] rotated at `positions` [T], on the device: in one kernel where fused_rope
        (offload/rope.py), else in transformers' steps on the tables' rows, a view of them where the positions are
        start, start + 1, ... (a prefill's), else gathered (a decode step's, whose position is a device tensor)."""
        if self.fused_rope and rope.supports(x, self.cos, positions):
            return rope.rotate(x, self.cos, self.sin, positions)
        if start is None:
            return apply_rope(x, self.cos.index_select(0, positions), self.sin.index_select(0, positions))
        return apply_rope(x, self.cos[start : start + x.shape[0]], self.sin[start : start + x.shape[0]])

    def _write_kv(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, start: int | None = None) -> None:
        """Keys k [T, K, S] rotated at `positions` [T] and values v [T, K, S] into layer `layer`'s KV cache at those
        positions: in the keys' rotation kernel where fused_rope takes them (offload/rope.py, rotate_into_cache),
        else rotated by _rotate and copied, into the slice from `start` (a prefill's) or by index_copy_ (a decode
        step's position, a device tensor)."""
        key_cache, value_cache = self.k_cache[layer], self.v_cache[layer]  # [K, N, S] each
        if (self.fused_rope and rope.supports(k, self.cos, positions)
                and rope.supports_cache(k, v, key_cache, value_cache)):  # fmt: skip
            rope.rotate_into_cache(k, v, self.cos, self.sin, positions, key_cache, value_cache)
            return
        k = self._rotate(k, positions, start)
        if start is None:
            key_cache.index_copy_(1, positions, k.transpose(0, 1))
            value_cache.index_copy_(1, positions, v.transpose(0, 1))
        else:
            key_cache[:, start : start + k.shape[0]] = k.transpose(0, 1)
            value_cache[:, start : start + v.shape[0]] = v.transpose(0, 1)

    def _mask(self, start_pos: int, tokens: int) -> Tensor | None:
        """Boolean [T, start_pos+T] (True = attend) where a key range and is_causal cannot say it."""
        if tokens == 1:
            return None  # one query: the key range itself is the mask (see _attention)
        if start_pos == 0 and self.config.sliding_window is None:
            return None  # plain causal: is_causal lets SDPA pick its fastest kernel
        q_pos = self.positions[start_pos : start_pos + tokens, None]  # [T, 1]
        k_pos = self.positions[None, : start_pos + tokens]  # [1, start_pos+T]
        mask = k_pos <= q_pos
        if self.config.sliding_window is not None:
            mask &= k_pos > q_pos - self.config.sliding_window
        return mask

    def _attention(self, layer: int, x: Tensor, start_pos: int, mask: Tensor | None) -> Tensor:
        # T = tokens, D = hidden, H = heads, K = kv heads, S = head dim, N = attended positions
        c, w = self.config, self.weights
        tokens, end = x.shape[0], start_pos + x.shape[0]
        prefix = f"layers.{layer}."
        ws = self.workspace
        at = self.positions[start_pos:end]  # [T]
        q = self._rotate(linear(x, w[prefix + "q_proj"], ws).view(tokens, c.num_heads, c.head_dim), at, start_pos)
        k = linear(x, w[prefix + "k_proj"], ws).view(tokens, c.num_kv_heads, c.head_dim)  # [T, K, S]
        v = linear(x, w[prefix + "v_proj"], ws).view(tokens, c.num_kv_heads, c.head_dim)
        self._write_kv(layer, k, v, at, start_pos)

        first = 0  # the first key any query here can see
        if c.sliding_window is not None:
            first = max(0, start_pos - c.sliding_window + 1)
        if mask is not None:
            mask = mask[:, first:]
        keys = self.k_cache[layer, :, first:end]  # [K, N, S], a view: no copy
        values = self.v_cache[layer, :, first:end]
        if tokens == 1:  # a decode step (its mask is None: the key range is the mask)
            out = one_query_attention(q[0], keys, values, mask)  # [H, S]
            return linear(out.reshape(1, c.num_heads * c.head_dim), w[prefix + "o_proj"], ws)
        grouped = c.num_heads != c.num_kv_heads
        repeat = self.repeat_kv == "always" or (self.repeat_kv == "masked" and mask is not None)
        if grouped and repeat:  # see repeat_kv_policy
            keys = keys.repeat_interleave(c.num_heads // c.num_kv_heads, dim=0)  # [H, N, S]
            values = values.repeat_interleave(c.num_heads // c.num_kv_heads, dim=0)
            grouped = False
        # 4-D, batch 1: SDPA's fused kernels (flash, memory-efficient, the CPU's) take nothing else, and its
        # math kernel would make the float32 scores [H, T, N], 2 GiB for 4096 Mixtral queries at once.
        # out: [H, T, S]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None,
            enable_gqa=grouped,
        )[0]  # fmt: skip
        return linear(out.transpose(0, 1).reshape(tokens, c.num_heads * c.head_dim), w[prefix + "o_proj"], ws)

    # -- the static decode path ------------------------------------------------------------------------

    def _decode_static(self, input_ids: Tensor, start_pos: int) -> Tensor:
        """One token through the static path: logits [1, V], a buffer valid until the next step.

        Per layer: graph "attention" (embedding at layer 0, the previous layer's MoE output added into the
        residual stream by the input norm's kernel, attention, post-norm, the MoE block's routing into its
        buffers), then the host reads the routing and the cache serves the experts, each an "expert" graph of
        its slot row, then, where the prefetcher guesses at the layer's output on the device, graph "guess" (its
        guess from the residual stream and the MoE output, not yet added). At the end, graph "head" (the last
        layer's MoE output added in its norm). Each graph is run eagerly the first time, then captured
        (offload/graphs.py); after the first step every slot row's expert graphs are captured at once.
        """
        s = self._static
        if s is None:
            s = self._static = StaticStep(self.config, self.device, self.dtype)
        if self.moe.version != s.version:  # a new prefetcher guesses elsewhere: the graphs must be captured anew
            self.graphs.reset()
            s.version, s.experts_captured = self.moe.version, False
        s.ids.copy_(input_ids)
        s.pos.fill_(start_pos)  # a kernel, no host value in any graph
        keys = key_range(start_pos + 1, self.max_seq_len)
        run = self.graphs.run
        for layer in range(self.config.num_layers):
            run(("attention", layer, keys), lambda layer=layer: self._static_attention(layer, keys))
            s.moe_out = self.moe.decode_experts(layer, s.x, run)  # [1, D], a buffer at a fixed address
            if self.moe.guesses_late(layer):
                run(("guess", layer), lambda layer=layer: self.moe.guess_into(layer, s.h, s.moe_out))
            self.moe.start_guess(layer, s.h)
        run(("head",), self._static_head)
        if self.graphs.capture and not s.experts_captured:
            self.moe.capture_experts(self.graphs.capture_only, s.x)  # every slot row's, this once
            s.experts_captured = True
        return s.logits

    def _static_attention(self, layer: int, keys: int) -> None:
        s, w, prefix = self._static, self.weights, f"layers.{layer}."
        if layer == 0:
            self._embed(s.ids, out=s.h)
        # the previous layer's MoE output joins the residual stream here, in the input norm's kernel (its add)
        x = self._norm(s.h, w[prefix + "input_norm"], add=None if layer == 0 else s.moe_out)
        attended = self._attention_at(layer, x, s.pos, keys)
        self._norm(s.h, w[prefix + "post_norm"], out=s.x, add=attended)
        self.moe.route_into(layer, s.x, s.h)

    def _static_head(self) -> None:
        s = self._static
        normed = self._norm(s.h, self.weights["norm"], add=s.moe_out)  # the last layer's MoE output added first
        s.logits.copy_(linear(normed, self.weights["lm_head"], self.workspace))

    def _attention_at(self, layer: int, x: Tensor, pos: Tensor, keys: int) -> Tensor:
        """One token's attention, its position a device tensor [1]: keys 0..keys-1 read, later ones masked."""
        # D = hidden, H = heads, K = kv heads, S = head dim
        c, w, ws = self.config, self.weights, self.workspace
        prefix = f"layers.{layer}."
        q = self._rotate(linear(x, w[prefix + "q_proj"], ws).view(1, c.num_heads, c.head_dim), pos)  # [1, H, S]
        k = linear(x, w[prefix + "k_proj"], ws).view(1, c.num_kv_heads, c.head_dim)  # [1, K, S]
        v = linear(x, w[prefix + "v_proj"], ws).view(1, c.num_kv_heads, c.head_dim)
        self._write_kv(layer, k, v, pos)
        key_pos = self.positions[:keys]
        mask = key_pos <= pos  # [keys]
        if c.sliding_window is not None:
            mask &= key_pos > pos - c.sliding_window
        out = one_query_attention(q[0], self.k_cache[layer, :, :keys], self.v_cache[layer, :, :keys], mask)  # [H, S]
        return linear(out.reshape(1, c.num_heads * c.head_dim), w[prefix + "o_proj"], ws)


class StaticStep:
    """The static decode path's buffers: the graphs read and write these addresses at every step."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.ids = torch.zeros(1, dtype=torch.long, device=device)  # the token
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # its position
        self.h = torch.zeros(1, config.hidden_size, device=device, dtype=dtype)  # the residual stream
        self.x = torch.zeros(1, config.hidden_size, device=device, dtype=dtype)  # the MoE block's input
        self.logits = torch.zeros(1, config.vocab_size, device=device, dtype=torch.float32)
        self.moe_out: Tensor | None = None  # the MoE block's output buffer, added into h by the next norm
        self.version = 0  # the MoE block's version the graphs were captured with
        self.experts_captured = False  # whether every slot row's expert graphs are, since the last reset
