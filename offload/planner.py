"""The memory planner: free VRAM and RAM -> where the experts live and how many slots each layer gets."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import torch

from quant.errors import MoEOffloadError

GiB = 1 << 30
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 1 << 10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 1 << 20,
    "g": 1e9,
    "gb": 1e9,
    "gib": GiB,
    "t": 1e12,
    "tb": 1e12,
    "tib": 1 << 40,
}
HOST_HEADROOM = 1 * GiB  # left for Python, torch and the tokenizer when the RAM budget is read off the machine
# share of the GPU budget kept back beside the activations the plan reserves by name (`reserve_bytes`): the
# allocator's rounding and fragmentation, cuBLAS's workspace, the CUDA graphs' pools
GPU_HEADROOM = 0.03


def parse_bytes(text: str) -> int:
    """'12GiB', '15GB', '800MiB', '1.5g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise MoEOffloadError(f"cannot read memory size {text!r}; write it like 12GiB, 15GB or 800MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """Two decimals of GiB from 0.1 GiB, one of MiB from 0.1 MiB, one of KiB from 0.1 KiB (a tiny model's
    expert), else bytes (a budget of `--cpu-memory 1`)."""
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    if n >= (1 << 20) / 10:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 / 10 else f"{n:.0f} B"


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "direct", "inclusive" or "exclusive" (see cache/expert_cache.py)
    slots_per_layer: tuple[int, ...] | None
    expert_bytes: int
    host_bytes: int  # the arena
    device_bytes: int  # resident weights + KV cache + slots
    device_budget: int
    host_budget: int
    reserve_bytes: int = 0  # kept free on the GPU for a prefill of the whole context: activations and workspace
    host_resident_bytes: int = 0  # resident weights kept in RAM beside the arena: the embedding table on CUDA

    def describe(self) -> list[tuple[str, str]]:
        slots = "none (computed in place)" if self.slots_per_layer is None else slots_text(self.slots_per_layer)
        facts = [
            ("mode", self.mode),
            ("slots per layer", slots),
            ("bytes per expert", format_bytes(self.expert_bytes)),
            ("arena (host)", f"{format_bytes(self.host_bytes)} of {format_bytes(self.host_budget)}"),
            ("device", f"{format_bytes(self.device_bytes)} of {format_bytes(self.device_budget)}"),
        ]
        if self.reserve_bytes:
            facts.append(("kept for a prefill", format_bytes(self.reserve_bytes)))
        if self.host_resident_bytes:
            facts.append(("resident in RAM", format_bytes(self.host_resident_bytes)))
        return facts


def slots_text(slots: Sequence[int]) -> str:
    """(5, 5, 4) -> '5 in layers 0-1, 4 in layer 2 (14 in all)'; (5, 5) -> '5'."""
    if len(set(slots)) == 1:
        return str(slots[0])
    runs, start = [], 0
    for layer in range(1, len(slots) + 1):
        if layer == len(slots) or slots[layer] != slots[start]:
            where = f"layer {start}" if layer - 1 == start else f"layers {start}-{layer - 1}"
            runs.append(f"{slots[start]} in {where}")
            start = layer
    return f"{', '.join(runs)} ({sum(slots)} in all)"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = name.removeprefix("cuda:")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise MoEOffloadError(f"unknown device {name!r}; choose cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoEOffloadError("--device cuda was asked for, but this torch has no CUDA device; use --device cpu")
    if name.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise MoEOffloadError(f"--device {name}: this machine has {count} GPU{'s' * (count != 1)}, cuda:0 to "
                              f"cuda:{count - 1}")  # fmt: skip
    return torch.device(name)


def budgets(gpu_memory: str | None, cpu_memory: str | None, device: torch.device) -> tuple[int | None, int | None]:
    """--gpu-memory and --cpu-memory in bytes (None: not given), each at most what the machine has free now,
    with a warning where one asks for more: a Colab T4 sold as 16 GB is 14.7 GiB to CUDA, less its context,
    and a Colab's 12.7 GB of RAM is 11.8 GiB."""
    if gpu_memory is None and cpu_memory is None:
        return None, None
    free_device, free_host = free_memory(device)
    return (
        _at_most(gpu_memory, free_device, f"--gpu-memory {gpu_memory} is more than the {{}} free on {device}"),
        _at_most(cpu_memory, free_host, f"--cpu-memory {cpu_memory} is more than the {{}} of RAM available "
                 f"(less {format_bytes(HOST_HEADROOM)} for Python and torch)"),
    )  # fmt: skip


def _at_most(text: str | None, free: int, too_much: str) -> int | None:
    if text is None:
        return None
    budget = parse_bytes(text)
    if budget <= free:
        return budget
    warnings.warn(f"{too_much.format(format_bytes(free))}; planning for {format_bytes(free)}", stacklevel=4)
    return free


def free_memory(device: torch.device) -> tuple[int, int]:
    """(device bytes free, host bytes available) on this machine."""
    host = max(psutil.virtual_memory().available - HOST_HEADROOM, 0)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], host
    return host, host


def plan_memory(
    *,
    device: torch.device,
    num_layers: int,
    num_experts: int,
    expert_bytes: int,
    resident_bytes: int,
    kv_bytes: int,
    reserve_bytes: int = 0,
    host_resident_bytes: int = 0,
    slots: int | None = None,
    device_budget: int | None = None,
    host_budget: int | None = None,
    mode: str = "auto",
) -> MemoryPlan:
    """Choose the mode and the slots per layer; raise MoEOffloadError naming what to change.

    `mode` "auto" takes inclusive when RAM holds every expert, else exclusive; "inclusive" or
    "exclusive" forces one (on the CPU too, with slots, to measure a swap on any machine).
    `reserve_bytes` is kept free on the GPU beside GPU_HEADROOM: what a prefill of the whole context
    needs at its peak (offload.api.prefill_reserve). The CPU's plan has no use for it.
    `host_resident_bytes` are resident weights that stay in RAM on a GPU plan (the embedding table): the
    arena shares the RAM budget with them. On the CPU everything is in `resident_bytes`.
    """
    if mode not in ("auto", "inclusive", "exclusive"):
        raise MoEOffloadError(f"unknown cache mode {mode!r}; choose auto, inclusive or exclusive")
    if device_budget is None or host_budget is None:
        free_device, free_host = free_memory(device)
        device_budget = free_device if device_budget is None else device_budget
        host_budget = free_host if host_budget is None else host_budget
    if device.type == "cpu":  # one memory: the arena is where compute happens
        return _plan_cpu(num_layers, num_experts, expert_bytes, resident_bytes=resident_bytes, kv_bytes=kv_bytes,
                         slots=slots, host_budget=host_budget, mode=mode)  # fmt: skip
    return _plan_gpu(num_layers, num_experts, expert_bytes, fixed=resident_bytes + kv_bytes,
                     reserve_bytes=reserve_bytes, host_resident_bytes=host_resident_bytes, slots=slots,
                     device_budget=device_budget, host_budget=host_budget, mode=mode)  # fmt: skip


def _plan_cpu(
    num_layers: int, num_experts: int, expert_bytes: int, *, resident_bytes: int, kv_bytes: int, slots: int | None,
    host_budget: int, mode: str,
) -> MemoryPlan:  # fmt: skip
    """plan_memory on the CPU: without slots every expert is computed in place ("direct"); with them, a cache in
    RAM that counts hits and misses as a GPU's would."""
    all_experts = num_layers * num_experts * expert_bytes
    if slots is not None and not 1 <= slots <= num_experts:
        raise MoEOffloadError(f"--slots must be between 1 and {num_experts} (the experts per layer), got {slots}")
    if slots is None and mode != "auto":
        raise MoEOffloadError(
            f"--cache-mode {mode} needs --slots on the CPU: without slots the experts are computed in place"
        )
    mode = "direct" if slots is None else "inclusive" if mode == "auto" else mode
    in_slots = 0 if slots is None else num_layers * slots * expert_bytes
    spare = expert_bytes if mode == "exclusive" else 0  # a swap's spare row, in the arena and in the slots
    host_bytes = all_experts - in_slots + spare if mode == "exclusive" else all_experts
    need = resident_bytes + kv_bytes + host_bytes + in_slots + spare
    if need > host_budget:
        raise MoEOffloadError(
            f"the model needs {format_bytes(need)} of RAM (experts {format_bytes(host_bytes + in_slots + spare)}, "
            f"KV cache {format_bytes(kv_bytes)}, other weights {format_bytes(resident_bytes)}) and "
            f"{format_bytes(host_budget)} is available; lower --max-seq-len, quantize to fewer bits or raise "
            "--cpu-memory"
        )
    per_layer = None if slots is None else (slots,) * num_layers
    # the CPU is the device, and its memory is the RAM: its budget is the host's
    return MemoryPlan(mode, per_layer, expert_bytes, host_bytes, need, host_budget, host_budget)


def _plan_gpu(
    num_layers: int, num_experts: int, expert_bytes: int, *, fixed: int, reserve_bytes: int, host_resident_bytes: int,
    slots: int | None, device_budget: int, host_budget: int, mode: str,
) -> MemoryPlan:  # fmt: skip
    """plan_memory on a GPU: the most slots the budget holds (spread over the layers, or `slots` in each), then
    the mode whose arena fits in RAM. `fixed`: the resident weights and the KV cache, both on the GPU."""
    all_experts = num_layers * num_experts * expert_bytes
    forced = slots is not None
    if slots is not None and slots > num_experts:
        raise MoEOffloadError(f"--slots {slots} is more than the {num_experts} experts per layer")
    if slots is not None and slots < 1:  # else the memory message below would say 1 slot and to lower --slots
        raise MoEOffloadError(f"--slots must be between 1 and {num_experts} (the experts per layer), got {slots}")
    # less the spare row of a swap
    room = int(device_budget * (1 - GPU_HEADROOM)) - fixed - reserve_bytes - expert_bytes
    total = room // expert_bytes if room > 0 else 0  # slots the GPU can hold, all layers together
    fit = total // num_layers  # slots per layer, the same in every layer
    if slots is None:
        slots = min(fit, num_experts)
    if slots < 1 or slots > fit:
        need = fixed + reserve_bytes + (num_layers * max(slots, 1) + 1) * expert_bytes
        raise MoEOffloadError(
            f"{max(slots, 1)} expert slots per layer need {format_bytes(need / (1 - GPU_HEADROOM))} of GPU memory "
            f"(resident weights and KV cache {format_bytes(fixed)}, kept for a prefill {format_bytes(reserve_bytes)}), "
            f"and the budget is {format_bytes(device_budget)}; "
            "lower --slots or --max-seq-len, quantize to fewer bits, or raise --gpu-memory (up to what is free)"
        )
    per_layer = (slots,) * num_layers if forced else spread(total, num_layers, num_experts)
    in_slots = sum(per_layer) * expert_bytes
    exclusive_arena = all_experts - in_slots + expert_bytes  # each expert once, plus the spare row
    arena_budget = host_budget - host_resident_bytes
    if all_experts <= arena_budget and mode != "exclusive":
        mode, host_bytes = "inclusive", all_experts
    elif exclusive_arena <= arena_budget and mode != "inclusive":
        mode, host_bytes = "exclusive", exclusive_arena
    else:
        need = exclusive_arena if mode != "inclusive" else all_experts
        beside = f" and {format_bytes(host_resident_bytes)} of resident weights" if host_resident_bytes else ""
        raise MoEOffloadError(
            f"the experts need {format_bytes(need)} of RAM beside the {format_bytes(in_slots)} in GPU slots"
            f"{beside}, and {format_bytes(host_budget)} is available; quantize to fewer bits or raise --cpu-memory"
        )
    device_bytes = fixed + in_slots + (expert_bytes if mode == "exclusive" else 0)
    return MemoryPlan(
        mode, per_layer, expert_bytes, host_bytes, device_bytes, device_budget, host_budget,
        reserve_bytes=reserve_bytes, host_resident_bytes=host_resident_bytes,
    )  # fmt: skip


def spread(total: int, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """`total` slots (at least one a layer: plan_memory checks) over `num_layers` layers, at most
    `num_experts` each: the remainder of an even split goes one a layer to the first layers.

    Which layers take it matters little: on the Mixtral trace a sixth slot gains 45 to 89 hits a layer
    (LRU; the last five layers a little more than the rest), and giving the remainder to the last layers
    instead changes the hit rate by 0.0024 at most (benchmarks/planned_slots.py). The first take it
    because the gate prefetcher never guesses layer 0 (no router runs before it), and there a sixth slot
    gains the most."""
    base = min(total // num_layers, num_experts)
    extra = 0 if base == num_experts else total - base * num_layers
    return (base + 1,) * extra + (base,) * (num_layers - extra)
