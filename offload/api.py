"""The public Python API: `load()` and the model object users hold.

import offload
model = offload.load("path/to/Mixtral-8x7B-Instruct-quantized", slots=4)
result = model.generate("def fibonacci(n):", max_new_tokens=64, temperature=0)
print(result.text, model.stats.hit_rate)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.expert_cache import ExpertCache
from cache.policies import make_policies, make_policy
from cache.stats import CacheStats, LayerStats
from offload import router
from offload.convert import Progress, describe_spec, open_source
from offload.decoder import PREFILL_CHUNK, Decoder, ModelConfig, check_prefill_chunk, keeps_width
from offload.embedding import reads_host_memory
from offload.generate import GenerationResult, SamplingConfig, Timing, check_prompt, generate, generate_text
from offload.graphs import DecodeGraphs
from offload.moe import MoEBlock
from offload.norm import takes
from offload.planner import MemoryPlan, budgets, plan_memory, resolve_device, slots_text
from offload.prefetch import WHEN, Prefetcher
from offload.tokenizer import chat_prompt_ids, check_text, load_tokenizer, read_generation_config, stop_ids
from quant import cpu_gemv, gemv
from quant.bnb import NF4Quantized
from quant.errors import MoEOffloadError, whole_number
from quant.hqq import Quantized, Workspace
from quant.linear import CPU, DEQUANTIZE, TRITON, Kernel, Weight, map_tensors, weight_nbytes, workspace_bytes
from quant.packing import ExpertFormat

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFETCH = ("none", *WHEN)


@dataclass(frozen=True)
class LoadOptions:
    """Everything `load()` takes besides the model. The CLI's options map onto these one to one."""

    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on GPUs from sm_80, float16 on older ones, float32 on the CPU
    slots: int | None = None  # expert slots per layer; None: the planner's choice (CUDA), in place (CPU)
    gpu_memory: str | None = None  # budget on the GPU, e.g. "12GiB"; None: what is free
    cpu_memory: str | None = None  # budget in RAM for the arena; None: what is available
    expert_bits: str = "none"  # HF folders only: quantize experts in memory ("2", "3", "4", "none")
    attn_bits: str = "none"  # HF folders only: quantize attention in memory ("4", "8", "none")
    attn_quant: str = "hqq"  # how attention is quantized: hqq, or bnb (bitsandbytes NF4, 4-bit)
    # none | early | late | both (early guess, corrected at the output). late: the best hit rate for the fewest
    # bytes on the trained tiny model (benchmarks/prefetch_points.py); both moves 26% more for +0.006
    prefetch: str = "late"
    # layers ahead the output guess reaches (offload/prefetch.py): 2 starts each load a layer earlier, for a first
    # guess right less often that the next layer's output corrects
    prefetch_ahead: int = 1
    policy: str = "lru"  # eviction policy (cache/policies.py)
    cache_mode: str = "auto"  # auto | inclusive | exclusive (see offload/planner.py)
    max_seq_len: int | None = None  # context size; None: the model's, at most 4096
    verify: bool = True  # check a quantized folder's sha256 sums on load
    # decode's HQQ products through a fused dequantize+GEMV kernel: Triton on CUDA (quant/gemv.py), C on the CPU
    # (quant/cpu_gemv.py). None: where it runs (Triton installed; a C compiler). False: dequantize, then multiply
    fused_gemv: bool | None = None
    # decode's resident part (attention, norms, router, guesses, head) replayed as CUDA graphs (offload/graphs.py);
    # None: on CUDA. False: every kernel launched from Python
    cuda_graphs: bool | None = None
    # a prefill's tokens that each layer's attention and each expert take at once (offload/decoder.py): a long
    # prompt's activations grow with this, not with the prompt, and the planner keeps them back
    prefill_chunk: int = PREFILL_CHUNK
    # the embedding table in RAM, each token's row read in place by the GPU (offload/embedding.py), which frees
    # its GPU memory for expert slots; None: on CUDA where the GPU can, unless lm_head is the same table
    host_embedding: bool | None = None
    # on CUDA, the experts' 8-bit scales and zeros by packed row, as the fused kernel reads them in fewer, wider loads
    # (quant/packing.py; quant/gemv.py, META_ROWS), each expert repacked from its file's grid order as it is read.
    # None: gemv.META_ROWS_BY_DEFAULT. On the CPU they lie by output, for its own loop, whatever this says
    meta_rows: bool | None = None

    def __post_init__(self) -> None:
        """A value of the wrong type from Python (the CLI's are parsed already) is one line naming the option,
        not a TypeError deep in the load. A torch.device or torch.dtype is taken for its name."""
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        if isinstance(self.dtype, torch.dtype):  # an unknown one (torch.int8) is refused by name at the load
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        for option in dataclasses.fields(self):
            value, annotation = getattr(self, option.name), str(option.type)
            optional = annotation.endswith(" | None")
            kind, words = OPTION_TYPES[annotation.removesuffix(" | None")]
            if value is None and optional:
                continue
            if kind is numbers.Integral and (number := whole_number(value)) is not None:
                object.__setattr__(self, option.name, number)  # numpy's too; True is no count
            elif not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise MoEOffloadError(f"{option.name} must be {words}{' or None' if optional else ''}, got {value!r}")


# LoadOptions' field types, as its annotations spell them: the type each takes, in words
OPTION_TYPES = {"str": (str, "a string"), "int": (numbers.Integral, "a whole number"), "bool": (bool, "True or False")}


@dataclass
class RunStats:
    """Every figure of a run: the cache counters per layer, and the generations' tokens per second."""

    cache: CacheStats
    timing: Timing = field(default_factory=Timing)
    in_place: bool = False  # experts computed in place (no slots): every request counts as a hit, so none is shown

    @property
    def total(self) -> LayerStats:
        return self.cache.total()

    @property
    def hit_rate(self) -> float:
        return self.total.hit_rate

    @property
    def recall(self) -> float | None:
        return self.total.recall

    @property
    def decode_tokens(self) -> int:
        return self.timing.decode_tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return self.timing.decode_tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.timing.prefill_tokens_per_s

    def to_dict(self) -> dict:
        """Totals at the top level (hit_rate, hits, misses, ...), tokens/s, then `per_layer`."""
        cache = self.cache.to_dict()
        per_layer = cache.pop("per_layer")
        return {**cache, **self.timing.to_dict(), "per_layer": per_layer}

    def summary(self, cache: bool | None = None) -> str:
        """The totals in one line, as `--stats` and `/stats` print them above the table of layers; without `cache`
        (experts computed in place, where every request counts as a hit) the speeds alone."""
        cache = not self.in_place if cache is None else cache
        s = self.to_dict()
        speeds = (f"prefill {s['prefill_tokens']} tok at {s['prefill_tokens_per_s']:.1f} tok/s · "
                  f"decode {s['decode_tokens']} tok at {s['decode_tokens_per_s']:.1f} tok/s")  # fmt: skip
        if not cache:
            return speeds
        recall = "-" if s["recall"] is None else f"{s['recall']:.3f}"
        return (
            f"{speeds} · hit rate {s['hit_rate']:.3f} · prefetch recall {recall} · "
            f"prefetches {s['prefetches_issued']} issued, {s['prefetches_used']} used, {s['prefetches_wasted']} "
            f"wasted · {s['h2d_bytes'] / 2**20:.1f} MiB copied · stalled {s['stall_s']:.3f} s"
        )

    def __repr__(self) -> str:  # the dataclass's would print every layer's counters
        return f"RunStats({self.summary()}; {len(self.cache.per_layer)} layers in .cache.per_layer)"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        # a T4 (sm_75) "supports" bfloat16 by emulation, where cuBLAS and SDPA's fused kernels do not
        # run it: float16 there, as on every GPU before sm_80
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if name not in DTYPES:
        raise MoEOffloadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _to_device(weight: Weight, device: torch.device, dtype: torch.dtype) -> Weight:
    """Resident weights on the compute device: float tensors in `dtype`, quantized ones as stored."""
    if isinstance(weight, torch.Tensor):
        return weight.to(device, dtype)
    return map_tensors(weight, lambda tensor: tensor.to(device))


def held_bytes(name: str, weight: Weight, device: torch.device, dtype: torch.dtype) -> int:
    """The bytes resident weight `name` takes once load() has put it on the device: a float tensor in `dtype`
    (but a table kept at its width), a quantized one as stored (_to_device)."""
    if isinstance(weight, torch.Tensor) and not keeps_width(name, weight, device, dtype):
        return weight.numel() * dtype.itemsize
    return weight_nbytes(weight)


@dataclass
class Prepared:
    """A model opened and planned, before any expert is read: what `info` shows and `load` builds on."""

    source: object  # offload.convert.HFSource or QuantizedSource
    options: LoadOptions
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int
    expert_format: ExpertFormat
    resident: dict  # emptied by load() once the weights are on the device
    plan: MemoryPlan
    fused_gemv: bool  # decode's HQQ products run the fused kernel (LoadOptions.fused_gemv, resolved)
    cuda_graphs: bool  # decode's resident part runs as CUDA graphs (LoadOptions.cuda_graphs, resolved)
    host_embedding: bool  # the embedding table stays in RAM (LoadOptions.host_embedding, resolved)
    tokenizer: object | None = None  # loaded by prepare(text=...) to check it, and kept for the model

    @property
    def config(self) -> ModelConfig:
        return self.source.config


def check_prefetch(when: str, ahead: int, num_layers: int) -> None:
    """The prefetch options' errors, in the CLI's words."""
    if whole_number(ahead) is None:
        raise MoEOffloadError(f"--prefetch-ahead must be a whole number, got {ahead!r}")
    if ahead > 1 and when in ("early", "none"):
        raise MoEOffloadError(f"--prefetch-ahead {ahead} guesses at each layer's output: use --prefetch late or both")
    most = max(1, num_layers - 1)
    if not 1 <= ahead <= most:
        raise MoEOffloadError(f"--prefetch-ahead must be between 1 and {most} (the layers but one), got {ahead}")


TEXT = (None, "plain", "chat")  # what `load(text=...)` checks the tokenizer can do before anything long


def prepare(model: str, *, text: str | None = None, **options) -> Prepared:
    """Open `model`, read its resident weights and plan the memory; no expert is read yet. `text`: "plain"
    refuses first a folder whose tokenizer cannot be loaded, "chat" also one that cannot format a conversation
    (no chat template): an error that would otherwise come after every expert was read (minutes, for Mixtral)."""
    model, opts, device = _check_options(model, text, options)
    dtype = resolve_dtype(opts.dtype, device)
    source = open_source(
        model, expert_bits=opts.expert_bits, attn_bits=opts.attn_bits, attn_quant=opts.attn_quant, verify=opts.verify
    )
    config: ModelConfig = source.config
    check_prefetch(opts.prefetch, opts.prefetch_ahead, config.num_layers)
    max_seq_len = _context(opts.max_seq_len, config)
    check_prefill_chunk(opts.prefill_chunk)  # before the long part
    fused = resolve_fused_gemv(opts.fused_gemv, device)
    expert_format = source.expert_format(dtype).in_order(meta_order(opts.meta_rows, device, fused))
    resident = source.resident()
    kv_bytes = config.kv_cache_bytes(max_seq_len, dtype)
    reserve = prefill_reserve(config, resident, expert_format, max_seq_len, opts.prefill_chunk, dtype, device)
    host_embedding = resolve_host_embedding(opts.host_embedding, config, device, dtype)
    in_ram = weights_in_ram(host_embedding)
    device_budget, host_budget = budgets(opts.gpu_memory, opts.cpu_memory, device)
    plan = plan_memory(
        device=device,
        num_layers=config.num_layers,
        num_experts=config.num_experts,
        expert_bytes=expert_format.nbytes,
        resident_bytes=sum(held_bytes(name, w, device, dtype) for name, w in resident.items() if name not in in_ram),
        host_resident_bytes=sum(w.numel() * dtype.itemsize for name, w in resident.items() if name in in_ram),
        kv_bytes=kv_bytes,
        reserve_bytes=reserve,
        slots=opts.slots,
        device_budget=device_budget,
        host_budget=host_budget,
        mode=opts.cache_mode,
    )
    if plan.mode == "direct":
        _warn_without_slots(opts)
    graphs = resolve_cuda_graphs(opts.cuda_graphs, device)
    tokenizer = None
    if text is not None:  # the options' own errors first
        tokenizer = load_tokenizer(source.folder)
        if text == "chat":
            chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    return Prepared(
        source, opts, device, dtype, max_seq_len, expert_format, resident, plan, fused, graphs, host_embedding,
        tokenizer,
    )  # fmt: skip


def _check_options(model: object, text: object, options: dict) -> tuple[str, LoadOptions, torch.device]:
    """prepare's errors that need no file read: the model's name, the options' names, types and values, and the
    device (which a `cuda:N` makes current). Returns the model as a string, the options and the device."""
    if text not in TEXT:
        raise MoEOffloadError(f"text must be one of {', '.join(map(repr, TEXT))}, got {text!r}")
    unknown = sorted(set(options) - {option.name for option in dataclasses.fields(LoadOptions)})
    if unknown:
        known = ", ".join(option.name for option in dataclasses.fields(LoadOptions))
        raise MoEOffloadError(f"unknown load option {unknown[0]!r}; the options are {known}")
    if not isinstance(model, str | os.PathLike) or not str(model).strip():  # "" would read the current folder
        raise MoEOffloadError(f"give a model: a quantized folder, a Hugging Face folder or a hub id, got {model!r}")
    model = os.fspath(model)
    opts = LoadOptions(**options)
    if opts.prefetch not in PREFETCH:
        raise MoEOffloadError(f"unknown prefetch {opts.prefetch!r}; choose one of {', '.join(PREFETCH)}")
    make_policy(opts.policy)  # an unknown name fails here, before the long part
    device = resolve_device(opts.device)
    if device.type == "cpu" and opts.gpu_memory is not None:
        raise MoEOffloadError("--gpu-memory is a GPU's budget, and this runs on the CPU, where everything is in RAM: "
                              "give --cpu-memory")  # fmt: skip
    if device.type == "cuda" and device.index is not None:
        # graph capture, Triton's launches and a bare "cuda" all mean the current device: make it this one
        torch.cuda.set_device(device)
    return model, opts, device


def _warn_without_slots(opts: LoadOptions) -> None:
    """Cache options given to experts computed in place (the CPU without --slots) do nothing: say so."""
    defaults = LoadOptions()
    idle = [
        f"--{name.replace('_', '-')} {getattr(opts, name)}"
        for name in ("policy", "prefetch", "prefetch_ahead")  # --cache-mode without slots is an error
        if getattr(opts, name) not in (getattr(defaults, name), "none")
    ]
    if idle:
        warnings.warn(f"{' and '.join(idle)} {'does' if len(idle) == 1 else 'do'} nothing here: without --slots the "
                      "CPU computes experts in place, with no cache; --slots K routes them through K slots a layer",
                      stacklevel=3)  # fmt: skip


def _context(max_seq_len: int | None, config: ModelConfig) -> int:
    """--max-seq-len checked, or the model's context capped at 4096 (the KV cache is made whole, at load)."""
    context = min(config.max_position, 4096) if max_seq_len is None else max_seq_len
    if context < 2:
        raise MoEOffloadError(f"--max-seq-len must be at least 2, got {context}")
    if context > config.max_position:  # allowed: a user may know better (rope scaling in another runtime)
        warnings.warn(f"a context of {context} tokens (--max-seq-len) is beyond the {config.max_position} "
                      "positions this model was trained for; what it writes past them is likely nonsense",
                      stacklevel=3)  # fmt: skip
    return context


def prefill_reserve(
    config: ModelConfig, resident: dict, expert_format: ExpertFormat, max_seq_len: int, chunk: int,
    dtype: torch.dtype, device: torch.device,
) -> int:  # fmt: skip
    """What the GPU keeps free for a prefill of the whole context: its activations (ModelConfig.prefill_bytes)
    and the dequantization workspaces it fills in tiles, the attention's (HQQ or NF4) and the experts'
    (quant.linear.workspace_bytes)."""
    quantized = (Quantized, NF4Quantized)
    experts = expert_format.meta_weights().values()
    return (
        config.prefill_bytes(max_seq_len, chunk, dtype, repeat_kv=device.type == "cuda")
        + workspace_bytes([w for w in resident.values() if isinstance(w, quantized)], dtype, device)
        + workspace_bytes([w for w in experts if isinstance(w, quantized)], dtype, device)
    )


def weights_in_ram(host_embedding: bool) -> frozenset[str]:
    """The resident weights that stay in host memory: the plan counts them in RAM, and load leaves them there."""
    return frozenset({"embed"}) if host_embedding else frozenset()


def embedding_place(host_embedding: bool) -> str:
    return "in RAM, read in place by the GPU" if host_embedding else "with the resident weights"


def decode_kernel(fused_gemv: bool, device: torch.device) -> Kernel | None:
    """The fused dequantize+GEMV that decode's HQQ products run on `device`, or None: dequantize them."""
    if not fused_gemv:
        return None
    return TRITON if device.type == "cuda" else CPU


def kernel_name(prepared: Prepared) -> str:
    """The kernel decode's products run, as `info` and `bench` name it: on the CPU, ", int8 tokens" where the
    experts' layout takes them (not 3-bit's padded grid, whose loop keeps its tokens float32); with Triton, ", tuned"
    where `moe-offload tune` has tuned the experts' shapes for this GPU (w1 and w3 as gemv.gated's pair, and w2)."""
    kernel = decode_kernel(prepared.fused_gemv, prepared.device)
    if kernel is None:
        return DEQUANTIZE
    fmt = prepared.expert_format
    shapes = ((fmt.intermediate_size, fmt.hidden_size), (fmt.hidden_size, fmt.intermediate_size))  # w1/w3, w2
    if kernel is TRITON and fmt.spec is not None and gemv.USE_TUNED:
        tuned = gemv.tuned_launches(prepared.device)
        gated = (gemv.GATED, False)  # decode's w1 and w3 as gemv.gated's pair, where GATED
        keys = [gemv.tuning_key(fmt.spec, shape, prepared.dtype, g, fmt.meta_by_row(shape))
                for shape, g in zip(shapes, gated, strict=True)]  # fmt: skip
        if all(key in tuned for key in keys):
            return f"{kernel.name}, tuned"
    if kernel is CPU and cpu_gemv.int8_tokens() and fmt.spec is not None:
        if all(cpu_gemv.int8_reads(shape, fmt.spec) for shape in shapes):
            return f"{kernel.name}, int8 tokens"
    return kernel.name


def resolve_fused_gemv(option: bool | None, device: torch.device) -> bool:
    """LoadOptions.fused_gemv -> whether to use the kernel; asking for it where it cannot run is an error.
    On the CPU the default builds the C kernel (quant/cpu_gemv.py) and, where it cannot, warns and dequantizes."""
    if device.type == "cuda":
        if option and gemv.triton is None:
            raise MoEOffloadError("--fused-gemv needs Triton, which CUDA builds of torch ship with; pip install triton")
        return gemv.triton is not None if option is None else option
    if option is False:
        return False
    try:
        cpu_gemv.library()
    except cpu_gemv.KernelUnavailable as error:
        if option:
            raise MoEOffloadError(f"--fused-gemv on the CPU builds a C kernel, and could not: {error}") from None
        warnings.warn(f"decode dequantizes each expert, several times slower than the CPU's fused kernel: {error}",
                      stacklevel=3)  # fmt: skip
        return False
    return True


def meta_order(meta_rows: bool | None, device: torch.device, fused: bool) -> str:
    """LoadOptions.meta_rows -> how the experts' scales and zeros lie in memory (quant/packing.py, META_ORDERS): on
    the CPU by output, which its loop reads; on CUDA by packed row (meta_rows; None: gemv.META_ROWS_BY_DEFAULT) where
    the fused kernel runs, else in grid order, as files hold them. Asking for rows where no kernel reads them is an
    error."""
    if meta_rows and device.type != "cuda":
        raise MoEOffloadError("--meta-rows lays experts out for the GPU's kernel; on the CPU their scales and zeros "
                              "lie by output, for the CPU's own loop")  # fmt: skip
    if meta_rows and not fused:
        raise MoEOffloadError("--meta-rows lays experts out for the fused GEMV kernel, which is off here "
                              "(--no-fused-gemv, or no Triton)")  # fmt: skip
    if device.type == "cpu":  # computed where they lie, by the CPU's loop
        return "output"
    return kernel_meta_order(meta_rows) if fused else "grid"


def kernel_meta_order(meta_rows: bool | None) -> str:
    """The meta order the GPU's fused kernel is given its experts in: by packed row with `meta_rows` (None:
    gemv.META_ROWS_BY_DEFAULT), else grid order."""
    return "row" if (gemv.META_ROWS_BY_DEFAULT if meta_rows is None else meta_rows) else "grid"


def resolve_cuda_graphs(option: bool | None, device: torch.device) -> bool:
    """LoadOptions.cuda_graphs -> whether decode replays graphs; asking for them off CUDA is an error."""
    if option and device.type != "cuda":
        raise MoEOffloadError("--cuda-graphs runs on CUDA only; on the CPU every kernel is called from Python")
    return device.type == "cuda" if option is None else option


def resolve_host_embedding(option: bool | None, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """LoadOptions.host_embedding -> whether the table stays in RAM; asking for it where it cannot is an error."""
    if option is False or (option is None and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise MoEOffloadError("--host-embedding runs on CUDA only; on the CPU the table is in RAM already")
    if config.tie_word_embeddings:
        if option is None:
            return False
        raise MoEOffloadError(
            "--host-embedding: this model's lm_head is its embedding table, which the GPU reads whole at every "
            "step, so the table stays on the GPU; leave the option out"
        )
    why_not = reads_host_memory(device, dtype)
    if why_not is not None and option:
        raise MoEOffloadError(f"--host-embedding: the GPU cannot read the table in RAM here ({why_not})")
    return why_not is None


def load(model: str, progress: Progress | None = None, *, text: str | None = None, **options) -> OffloadedModel:
    """Load `model` (a quantized folder, an HF folder or a hub id) with `LoadOptions` as keywords; `text`, as
    `prepare` takes it, checks first that its tokenizer can serve plain text or a chat. `progress(what, done,
    total)` is called before the first expert is read and after each (offload.convert.Progress).

    The options and their defaults (LoadOptions' comments, and `moe-offload generate --help`, say what each does):
    """
    if progress is not None and not callable(progress):  # before the experts, not at the first of them
        raise MoEOffloadError(f"progress must be a function (what, done, total) or None, got {progress!r}")
    prepared = prepare(model, text=text, **options)
    config, plan, expert_format = prepared.config, prepared.plan, prepared.expert_format
    family = prepared.source.family
    cache = ExpertCache(
        num_layers=config.num_layers,
        num_experts=config.num_experts,
        expert_bytes=expert_format.nbytes,
        device=prepared.device,
        slots_per_layer=plan.slots_per_layer,
        mode=plan.mode,
        policies=make_policies(prepared.options.policy, config.num_layers, config.num_experts),
    )
    total = config.num_layers * config.num_experts
    if progress is not None:
        progress("experts", 0, total)
    for layer in range(config.num_layers):
        for expert in range(config.num_experts):
            prepared.source.packed_expert(layer, expert, expert_format, out=cache.place(layer, expert))
            if progress is not None:
                progress("experts", layer * config.num_experts + expert + 1, total)
    cache.placed()

    kernel = decode_kernel(prepared.fused_gemv, prepared.device)
    if kernel is TRITON and expert_format.spec is not None and gemv.GATED:  # w1 and w3 at once, where it works
        shape = (expert_format.intermediate_size, expert_format.hidden_size)
        why_not = gemv.gated_first_try(prepared.device, prepared.dtype, expert_format.spec, shape,
                                       expert_format.meta_by_row(shape))  # fmt: skip
        if why_not is not None:
            warnings.warn(f"an expert's w1 and w3 launch apart here: the gated kernel's first try failed ({why_not})",
                          stacklevel=2)  # fmt: skip
    # a decode step's routing in one kernel (offload/router.py), where it computes the family's and works here
    fused_route = router.computes(family.route) and takes("routing", router.works(prepared.device, prepared.dtype))
    moe = MoEBlock(
        routers=[], route=family.route, top_k=config.top_k, cache=cache, expert_format=expert_format,
        workspace=Workspace(kernel), prefill_chunk=prepared.options.prefill_chunk, fused_route=fused_route,
    )  # fmt: skip
    in_ram = weights_in_ram(prepared.host_embedding)
    weights = {  # a table kept in RAM, or at its width, goes to the decoder as it is (offload/decoder.py)
        name: w if name in in_ram or keeps_width(name, w, prepared.device, prepared.dtype)
        else _to_device(w, prepared.device, prepared.dtype)
        for name, w in prepared.resident.items()
    }  # fmt: skip
    prepared.resident.clear()  # on CUDA the host copies would otherwise stay alive beside the device ones
    decoder = Decoder(
        config, weights, moe, device=prepared.device, dtype=prepared.dtype, max_seq_len=prepared.max_seq_len,
        workspace=Workspace(kernel), graphs=DecodeGraphs() if prepared.cuda_graphs else None,
        prefill_chunk=prepared.options.prefill_chunk, host_embedding=prepared.host_embedding,
    )  # fmt: skip
    moe.routers = [decoder.router(layer) for layer in range(config.num_layers)]
    model = OffloadedModel(prepared, decoder=decoder, moe=moe, cache=cache)
    model.set_prefetch(prepared.options.prefetch, prepared.options.prefetch_ahead)
    return model


# the options' list, from the dataclass so that it cannot drift from it
_defaults = (f"        {option.name}={option.default!r}" for option in dataclasses.fields(LoadOptions))
if load.__doc__ is not None:  # python -OO strips docstrings
    load.__doc__ = f"{load.__doc__.rstrip()}\n" + "\n".join(_defaults)


class OffloadedModel:
    """A loaded model: logits, generation (streaming or not), chat, and the run's statistics."""

    def __init__(self, prepared: Prepared, *, decoder: Decoder, moe: MoEBlock, cache: ExpertCache) -> None:
        self.prepared = prepared
        self.source, self.plan, self.options = prepared.source, prepared.plan, prepared.options
        self.decoder, self.moe, self.cache = decoder, moe, cache
        self.config: ModelConfig = decoder.config
        self.device, self.dtype = decoder.device, decoder.dtype
        self.max_seq_len = decoder.max_seq_len
        self.stats = RunStats(cache.stats, in_place=cache.mode == "direct")
        self._tokenizer = prepared.tokenizer  # None: loaded when first needed
        self.sequence = -1  # sequences started; traces number them
        self.decode_step = 0  # decode forwards in the current sequence; traces number tokens by it
        self.context_ids: list[int] = []  # the ids the KV cache holds: a chat's next turn reuses their prefix
        self.broken: str | None = None  # why this model can run no more (an exclusive-mode step cut short)
        # the GPU it runs on, by index: a bare "cuda" is the device current at load, which a later load may change
        self.gpu: int | None = None
        if self.device.type == "cuda":
            self.gpu = torch.cuda.current_device() if self.device.index is None else self.device.index

    def _on_device(self) -> contextlib.AbstractContextManager:
        """This model's GPU made the current device while it runs: graph capture, Triton's launches and a bare
        "cuda" mean the current one, and another model loaded since (on another GPU) made its own current."""
        return contextlib.nullcontext() if self.gpu is None else torch.cuda.device(self.gpu)

    def __repr__(self) -> str:
        slots = "experts in place" if self.plan.slots_per_layer is None else (
            f"{slots_text(self.plan.slots_per_layer)} slots per layer, {self.plan.mode}")  # fmt: skip
        dtype = str(self.dtype).removeprefix("torch.")
        return f"OffloadedModel({self.source.description} on {self.device}, {dtype}, {slots})"

    def set_prefetch(self, when: str, ahead: int = 1) -> None:
        """Where the prefetcher guesses (none, early, late or both), and how many layers ahead at the output."""
        if when not in PREFETCH:
            raise MoEOffloadError(f"unknown prefetch {when!r}; choose one of {', '.join(PREFETCH)}")
        check_prefetch(when, ahead, self.config.num_layers)
        ahead = int(ahead)  # a numpy integer, say
        # what info() says
        self.prepared.options = dataclasses.replace(self.prepared.options, prefetch=when, prefetch_ahead=ahead)
        if when == "none" or self.cache.mode == "direct":  # no slots: nothing to prefetch into
            self.moe.prefetcher = None
            return
        c = self.config
        self.moe.prefetcher = Prefetcher(
            routers=self.moe.routers,
            post_norms=[self.decoder.post_norm(layer) for layer in range(c.num_layers)],
            eps=c.rms_norm_eps,
            route=self.moe.route,
            top_k=c.top_k,
            cache=self.cache,
            when=when,
            ahead=ahead,
            fused_norm=self.decoder.fused_norm,
            fused_route=self.moe.fused_route,
        )

    # -- the LanguageModel protocol (offload/generate.py) --------------------------------------------

    def reset(self) -> None:
        """A new sequence: empty KV cache, and expert caches empty as the trace rules say (exclusive mode: the
        slots keep what they hold, since a slot may hold an expert's only copy)."""
        self.decoder.reset()
        self.cache.reset()
        self.sequence += 1
        self.decode_step = 0
        self.context_ids = []

    def forward(
        self, input_ids: torch.Tensor, start_pos: int, *, last_only: bool = False, copy: bool = True
    ) -> torch.Tensor:
        """input_ids [T] at positions start_pos.. -> float32 logits [T, V] ([1, V] with `last_only`).

        copy=False: a decode step on CUDA graphs returns the graphs' logits buffer itself, valid until the
        next forward; `bench` uses it so that a step allocates nothing.
        """
        if self.broken is not None:
            raise MoEOffloadError(self.broken)
        try:
            with self._on_device():
                logits = self.decoder.forward(input_ids.to(self.device), start_pos, last_only=last_only)
        except MoEOffloadError:  # a check before any work: nothing was cut
            raise
        except BaseException:  # Ctrl-C or an error part-way through the step
            self._step_cut()
            raise
        if input_ids.shape[0] == 1:
            self.decode_step += 1
            if copy and self.decoder.graphs is not None:
                logits = logits.clone()
        return logits

    def _step_cut(self) -> None:
        """A step stopped part-way: a slot table may name an expert whose copy never ran. Inclusive mode forgets
        every slot (each loads again from the arena when asked for); in exclusive mode a slot may hold an
        expert's only copy, half swapped, so the model refuses to go on. The KV cache starts over."""
        self.context_ids = []
        if self.cache.mode == "exclusive":
            self.broken = (
                "a step of this model was interrupted in exclusive mode, where an expert's only copy may have been "
                "half swapped: load the model again (stop a generation with stop= instead)"
            )
        else:
            self.cache.reset()

    def logits(self, input_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Logits [T, V] of a fresh sequence (prefill only)."""
        ids = self.token_ids(input_ids)
        self.reset()
        return self.forward(torch.tensor(ids, dtype=torch.long), 0)

    def token_ids(self, ids: torch.Tensor | Sequence[int]) -> list[int]:
        """Token ids a caller gave, checked: whole numbers the embedding has a row for (on CUDA, an index past
        the table is a device-side assert, after which the process can use the GPU no more)."""
        shape = getattr(ids, "shape", None)  # a tensor or an array
        if shape is not None and len(shape) != 1:
            raise MoEOffloadError(f"give token ids as a list or a 1-D tensor, got one of shape {tuple(shape)}")
        if isinstance(ids, str | bytes | bytearray) or not isinstance(ids, Iterable):
            raise MoEOffloadError(f"give token ids as a list or a 1-D tensor, got {type(ids).__name__}")
        ids = ids.tolist() if shape is not None else list(ids)  # numpy's ints become Python's
        vocab = self.config.vocab_size
        for i in ids:
            if whole_number(i) is None:
                raise MoEOffloadError(f"token ids must be whole numbers, got {i!r}")
            if not 0 <= i < vocab:
                raise MoEOffloadError(f"token id {i} is not in this model's vocabulary (0 to {vocab - 1})")
        return [int(i) for i in ids]

    # -- text ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source.folder)
        return self._tokenizer

    def stop_ids(self, tokenizer=None) -> set[int]:
        """The ids that end a generation; with no tokenizer (token ids in, token ids out) the configs' alone."""
        return stop_ids(tokenizer, read_generation_config(self.source.folder), self.config.eos_token_ids)

    def encode(self, prompt: str, what: str = "the prompt") -> list[int]:
        check_text(prompt, what)
        return self._in_vocabulary(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation, through the chat template."""
        return self._in_vocabulary(chat_prompt_ids(self.tokenizer, messages))

    def _in_vocabulary(self, ids: list[int]) -> list[int]:
        """The tokenizer's ids, checked against the embedding as a caller's are (token_ids): a tokenizer larger
        than the model's vocabulary is another model's, and its ids would index past the table."""
        vocab = self.config.vocab_size
        past = [i for i in ids if not 0 <= i < vocab]
        if past:
            raise MoEOffloadError(
                f"the tokenizer gave token id {past[0]}, but this model's vocabulary is {vocab} tokens (0 to "
                f"{vocab - 1}): the tokenizer files in {self.source.folder} belong to another model"
            )
        return ids

    def generate(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict] | None = None,
        max_new_tokens: int = SamplingConfig.max_new_tokens,
        temperature: float = SamplingConfig.temperature,
        top_p: float = SamplingConfig.top_p,
        seed: int | None = SamplingConfig.seed,
        on_text: Callable[[str], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Continue `prompt` (text or ids), or answer `messages` through the chat template.

        `on_text` streams the text as it is generated. `stop()`, asked before each decode step, ends the
        generation there when it returns True (stop_reason "stopped"): the way to interrupt it, since an
        exception inside a step leaves the expert cache to be rebuilt (see `forward`). The result carries the
        ids, the text and timings; `model.stats` accumulates every generation's cache counters and tokens per
        second.
        """
        if (prompt is None) == (messages is None):
            raise MoEOffloadError("give either a prompt or chat messages")
        for name, callback in (("on_text", on_text), ("stop", stop)):  # before the prefill, not at the first token
            if callback is not None and not callable(callback):
                raise MoEOffloadError(f"{name} must be a function or None, got {callback!r}")
        if messages is not None and (isinstance(messages, str | Mapping) or not isinstance(messages, Sequence)):
            raise MoEOffloadError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                                  f"{type(messages).__name__}")  # fmt: skip
        # ids in and no streaming: a folder without tokenizer files can still generate ids
        tokenizer = self.tokenizer if isinstance(prompt, str) or messages or on_text else None
        if messages is not None:
            prompt_ids = self.encode_chat(messages)
            if len(prompt_ids) >= self.max_seq_len:
                raise MoEOffloadError(
                    f"the conversation is {len(prompt_ids)} tokens but the context holds {self.max_seq_len}, which "
                    "leaves no room for a reply; start a new one (chat: /reset), or load with a larger --max-seq-len"
                )
        elif isinstance(prompt, str):
            prompt_ids = self.encode(prompt)
        else:
            prompt_ids = self.token_ids(prompt)
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        synchronize = None if self.gpu is None else functools.partial(torch.cuda.synchronize, self.gpu)
        stops = self.stop_ids(tokenizer)
        # a conversation going on: the KV cache already holds the turns so far, so prefill only what is new
        cached = 0 if messages is None else min(_common_prefix(self.context_ids, prompt_ids), len(prompt_ids) - 1)
        # all the KV cache is sure to hold until this call returns: an exception (Ctrl-C) may stop its prefill
        # half-way, and the next turn must not take the old conversation's ids past this for what is cached
        self.context_ids = prompt_ids[:cached]
        if tokenizer is None:
            result = generate(self, prompt_ids, config, stops, synchronize=synchronize, should_stop=stop)
        else:  # a plain prompt is continued exactly (its last space kept); a chat reply stands alone
            result = generate_text(
                self, tokenizer, prompt_ids, config, stops, on_text,
                continue_prompt=messages is None, synchronize=synchronize, cached=cached, should_stop=stop,
            )  # fmt: skip
        self.context_ids = prompt_ids + result.token_ids[: result.decode_tokens]  # every id fed to the model
        self.stats.timing.add(result)
        return result

    # -- traces and statistics ----------------------------------------------------------------------

    def record_trace(self, writer, first_sequence: int = 0) -> None:
        """Send every cache request to `writer.record(...)` (cache/trace.py's TraceWriter); None stops.
        Sequences are numbered from `first_sequence`'s 0 (by default, from this model's first)."""
        if writer is None:
            self.moe.recorder = None
            return

        def record(layer: int, experts: list[int], weights: list[float], guess, prefill: bool) -> None:
            writer.record(
                sequence=self.sequence - first_sequence,
                token_idx=self.decode_step - 1 if prefill else self.decode_step,  # prefill: after the last decode
                layer=layer,
                experts=experts,
                gating_probs=weights,
                guess=guess,
                phase="prefill" if prefill else "decode",
            )

        self.moe.recorder = record

    def trace(
        self, prompts: list[str], out, *, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
        progress: Progress | None = None,
    ) -> Path:  # fmt: skip
        """Generate from each prompt (one sequence each) and write every cache request to `out`; `progress("prompts",
        done, total)` before the first and after each, as `load`'s. The file is written whole at the end: an error or
        Ctrl-C writes none.

        The trace uses shared/traces' fields plus `guess` and `phase` (cache/trace.py); replaying it
        through `simulate` with the same slots, policy and cache mode counts the same hits as this run (in
        exclusive mode, on a model fresh from load: its slots start with experts 0..K-1, as the replay's do).
        """
        from cache.trace import TraceWriter

        if self.cache.mode == "exclusive" and self.sequence >= 0:
            warnings.warn("this model has run before, and in exclusive mode its slots still hold what that left, "
                          "where a replay (simulate --cache-mode exclusive) starts with experts 0..K-1: load it "
                          "afresh for a trace whose replay counts the same", stacklevel=2)  # fmt: skip
        if isinstance(prompts, str):  # list("abc") would trace a sequence per character
            raise MoEOffloadError("trace takes a list of prompts, got one string: pass [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise MoEOffloadError("trace needs at least one prompt")
        if not isinstance(out, str | os.PathLike):
            raise MoEOffloadError(f"trace writes to a file: give its path, got {out!r}")
        for number, prompt in enumerate(prompts, 1):  # all of them before the first is generated
            name = f"prompt {number}" if len(prompts) > 1 else "the prompt"
            if not isinstance(prompt, str):
                raise MoEOffloadError(f"trace takes text prompts, and {name} is a {type(prompt).__name__}")
            check_prompt(len(self.encode(prompt, name)), self.max_seq_len, name)
        with TraceWriter(Path(out), dataset="moe-offload") as writer:  # an error or Ctrl-C drops the temporary file
            self.record_trace(writer, first_sequence=self.sequence + 1)  # 0 is the next: as `moe-offload trace` writes
            try:
                for done, prompt in enumerate(prompts):
                    if progress is not None:
                        progress("prompts", done, len(prompts))
                    self.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
                if progress is not None:
                    progress("prompts", len(prompts), len(prompts))
            finally:
                self.record_trace(None)
            self.cache.reset()  # the last sequence ends: its unused prefetches count as wasted, as in a replay
        return writer.path

    def reset_stats(self) -> None:
        """Zero every counter. Experts prefetched before it count as loaded after it: a request that finds
        one is a plain hit, neither a prefetch used nor, at the next reset, one wasted in the new window."""
        self.cache.settle_prefetches()
        self.cache.stats.reset()
        self.stats.timing = Timing()  # the same RunStats: a reference kept to `model.stats` reads the new window

    def info(self) -> dict[str, object]:
        """What `moe-offload info` prints, in words; `facts()` is the same for a script."""
        return describe(self.prepared)

    def facts(self) -> dict[str, object]:
        """`moe-offload info --json`: the model, its formats and the plan in snake_case keys and plain numbers."""
        return facts(self.prepared)


def describe_prefetch(options: LoadOptions) -> str:
    """The prefetch setting in words: `late`, or `late, 2 layers ahead`."""
    if options.prefetch == "none" or options.prefetch_ahead == 1:
        return options.prefetch
    return f"{options.prefetch}, {options.prefetch_ahead} layers ahead"


def facts(prepared: Prepared) -> dict[str, object]:
    """`info --json`: describe()'s facts for a script, keyed in snake_case, with numbers and bytes as numbers."""
    c, plan, options = prepared.config, prepared.plan, prepared.options
    words = describe(prepared)
    return {
        "model": words["model"], "family": c.model_type, "num_layers": c.num_layers, "num_experts": c.num_experts,
        "top_k": c.top_k, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "experts": words["experts"], "meta_order": prepared.expert_format.meta_order, "attention": words["attention"],
        "device": str(prepared.device), "dtype": str(prepared.dtype).removeprefix("torch."),
        "kernel": words["decode kernel"], "cuda_graphs": prepared.cuda_graphs,
        "host_embedding": prepared.host_embedding,
        "max_seq_len": prepared.max_seq_len, "prefill_chunk": options.prefill_chunk,
        "mode": plan.mode, "slots_per_layer": None if plan.slots_per_layer is None else list(plan.slots_per_layer),
        "expert_bytes": plan.expert_bytes, "host_bytes": plan.host_bytes, "host_budget_bytes": plan.host_budget,
        "device_bytes": plan.device_bytes, "device_budget_bytes": plan.device_budget,
        "prefill_reserve_bytes": plan.reserve_bytes, "host_resident_bytes": plan.host_resident_bytes,
        "prefetch": "none" if plan.mode == "direct" else options.prefetch,
        "prefetch_ahead": options.prefetch_ahead, "policy": options.policy,
    }  # fmt: skip


def describe(prepared: Prepared) -> dict[str, object]:
    """What `moe-offload info` prints: the model, its formats and the memory plan."""
    c, fmt = prepared.config, prepared.expert_format
    experts = "unquantized " + str(fmt.dtype).removeprefix("torch.") if fmt.spec is None else fmt.spec.describe()
    if fmt.meta_words is not None:  # by output on the CPU, by packed row with meta_rows (quant/packing.py)
        experts += ", scales and zeros by " + fmt.meta_words
    return {
        "model": prepared.source.description,
        "family": c.model_type,
        "layers": c.num_layers,
        "experts per layer": f"{c.num_experts} (top {c.top_k})",
        "hidden / expert intermediate": f"{c.hidden_size} / {c.intermediate_size}",
        "experts": experts,
        "attention": describe_spec(prepared.source.attn_spec),
        "device / dtype": f"{prepared.device} / {str(prepared.dtype).removeprefix('torch.')}",
        "decode kernel": kernel_name(prepared),
        "decode graphs": "CUDA graphs" if prepared.cuda_graphs else "off",
        "embedding": embedding_place(prepared.host_embedding),
        "context": prepared.max_seq_len,
        "prefill chunk": f"{prepared.options.prefill_chunk} tokens",
        **dict(prepared.plan.describe()),
        "prefetch": describe_prefetch(prepared.options) if prepared.plan.mode != "direct" else "none (no slots)",
        "policy": prepared.options.policy,
    }
