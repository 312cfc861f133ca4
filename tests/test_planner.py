"""The memory planner: mode and slots from budgets, and errors that say what to change."""

import pytest
import torch

from offload.planner import GiB, parse_bytes, plan_memory
from quant.errors import MoEOffloadError

CUDA = torch.device("cuda")
# Mixtral-8x7B with 2-bit experts (group 16, 8-bit scales and zeros): ~68 MB an expert, 17.4 GB in all
MIXTRAL_2BIT = dict(num_layers=32, num_experts=8, expert_bytes=68_000_000)


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * GiB
    assert parse_bytes("15GB") == 15_000_000_000
    assert parse_bytes("800MiB") == 800 << 20
    with pytest.raises(MoEOffloadError, match=r"cannot read memory size '12 parsecs'; write it like 12GiB"):
        parse_bytes("12 parsecs")


def test_free_colab_fits_2bit_mixtral_in_exclusive_mode():
    # T4: 15 GiB VRAM, 12.7 GB RAM; resident (4-bit attention, embeddings, lm_head) ~1.6 GB, KV 0.5 GB
    plan = plan_memory(
        device=CUDA,
        **MIXTRAL_2BIT,
        resident_bytes=1_600_000_000,
        kv_bytes=500_000_000,
        device_budget=15 * GiB,
        host_budget=12 * GiB,
    )
    assert plan.mode == "exclusive"
    assert plan.slots_per_layer == (6,) * 32  # 192 experts on the GPU
    assert plan.host_bytes == (256 - 192 + 1) * 68_000_000  # each expert once, plus the spare row


def test_inclusive_when_ram_holds_every_expert():
    plan = plan_memory(
        device=CUDA,
        **MIXTRAL_2BIT,
        resident_bytes=1_600_000_000,
        kv_bytes=500_000_000,
        device_budget=12 * GiB,
        host_budget=32 * GiB,
        slots=4,
    )
    assert (plan.mode, plan.slots_per_layer, plan.host_bytes) == ("inclusive", (4,) * 32, 256 * 68_000_000)


def test_too_many_slots_say_what_to_change():
    with pytest.raises(
        MoEOffloadError, match=r"6 expert slots per layer need 14.9. GiB of GPU memory .*lower --slots"
    ):
        plan_memory(
            device=CUDA,
            **MIXTRAL_2BIT,
            resident_bytes=1_600_000_000,
            kv_bytes=500_000_000,
            device_budget=12 * GiB,
            host_budget=32 * GiB,
            slots=6,
        )
    with pytest.raises(MoEOffloadError, match="--slots 9 is more than the 8 experts per layer"):
        plan_memory(
            device=CUDA,
            **MIXTRAL_2BIT,
            resident_bytes=0,
            kv_bytes=0,
            device_budget=80 * GiB,
            host_budget=32 * GiB,
            slots=9,
        )


def test_nothing_fits():
    with pytest.raises(MoEOffloadError, match=r"the experts need .* of RAM beside .* raise --cpu-memory"):
        plan_memory(
            device=CUDA,
            **MIXTRAL_2BIT,
            resident_bytes=1_600_000_000,
            kv_bytes=500_000_000,
            device_budget=15 * GiB,
            host_budget=4 * GiB,
        )
    with pytest.raises(MoEOffloadError, match=r"the model needs .* of RAM and 1.00 GiB is available"):
        plan_memory(
            device=torch.device("cpu"),
            **MIXTRAL_2BIT,
            resident_bytes=0,
            kv_bytes=0,
            device_budget=GiB,
            host_budget=GiB,
        )


def test_cpu_direct_and_cpu_slots():
    cpu = torch.device("cpu")
    small = dict(
        num_layers=2,
        num_experts=8,
        expert_bytes=1000,
        resident_bytes=0,
        kv_bytes=0,
        device_budget=GiB,
        host_budget=GiB,
    )
    assert plan_memory(device=cpu, **small).mode == "direct"
    plan = plan_memory(device=cpu, **small, slots=3)
    assert (plan.mode, plan.slots_per_layer) == ("inclusive", (3, 3))
