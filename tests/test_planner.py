"""The memory planner: mode and slots from budgets, and errors that say what to change."""

import pytest
import torch

import offload
from offload.planner import GiB, format_bytes, parse_bytes, plan_memory, spread
from quant.errors import MoEOffloadError

CUDA = torch.device("cuda")
# Mixtral-8x7B with 2-bit experts (group 16, 8-bit scales and zeros): ~68 MB an expert, 17.4 GB in all
MIXTRAL_2BIT = dict(num_layers=32, num_experts=8, expert_bytes=68_000_000)


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * GiB
    assert parse_bytes("15GB") == 15_000_000_000
    assert parse_bytes("800MiB") == 800 << 20
    sizes = (12 << 30, 800 << 20, 80 << 20, 37_632, 512, 1)  # 1: `--cpu-memory 1`, which read "0.0 KiB"
    assert [format_bytes(n) for n in sizes] == ["12.00 GiB", "0.78 GiB", "80.0 MiB", "36.8 KiB", "0.5 KiB", "1 B"]
    with pytest.raises(MoEOffloadError, match=r"cannot read memory size '12 parsecs'; write it like 12GiB"):
        parse_bytes("12 parsecs")


def test_free_colab_fits_2bit_mixtral_in_exclusive_mode():
    # T4: 15 GiB VRAM, 12.7 GB RAM; resident (4-bit attention, embeddings, lm_head) ~1.6 GB, KV 0.5 GB, and
    # 0.5 GB kept for a 4096-token prefill (offload.api.prefill_reserve)
    plan = plan_memory(
        device=CUDA,
        **MIXTRAL_2BIT,
        resident_bytes=1_600_000_000,
        kv_bytes=500_000_000,
        reserve_bytes=500_000_000,
        device_budget=15 * GiB,
        host_budget=12 * GiB,
    )
    assert plan.mode == "exclusive"
    # (0.97 x 15 GiB - 2.1 GB - 0.5 GB - the spare row) / 68 MB = 190 experts on the GPU: 5 a layer, and
    # the 30 left over one each in layers 0-29
    assert plan.slots_per_layer == (6,) * 30 + (5,) * 2
    assert plan.host_bytes == (256 - 190 + 1) * 68_000_000  # each expert once, plus the spare row
    assert plan.device_bytes == 2_100_000_000 + (190 + 1) * 68_000_000  # the reserve is kept free, not used
    described = dict(plan.describe())
    assert described["slots per layer"] == "6 in layers 0-29, 5 in layers 30-31 (190 in all)"
    assert described["kept for a prefill"] == "0.47 GiB"
    # inclusive at the same GPU budget (RAM uncapped) gets the same slots: the swap is all that differs
    inclusive = plan_memory(device=CUDA, **MIXTRAL_2BIT, resident_bytes=1_600_000_000, kv_bytes=500_000_000,
                            reserve_bytes=500_000_000, device_budget=15 * GiB, host_budget=32 * GiB,
                            mode="inclusive")  # fmt: skip
    assert (inclusive.mode, inclusive.slots_per_layer) == ("inclusive", plan.slots_per_layer)


def test_the_slots_an_even_split_leaves_go_to_the_first_layers():
    # 12 GiB at a 4096-token context (KV 0.54 GB), resident 1.28 GB, and kept for a prefill of the whole
    # context 0.33 GB, as synthetic Mixtral-8x7B: 154 slots fit; an even split alone would use 128 of them
    common = dict(device=CUDA, **MIXTRAL_2BIT | dict(expert_bytes=66_748_416), kv_bytes=536_870_912,
                  reserve_bytes=326_533_120, device_budget=12 * GiB, host_budget=32 * GiB)  # fmt: skip
    plan = plan_memory(**common, resident_bytes=1_281_892_352)
    assert plan.slots_per_layer == (5,) * 26 + (4,) * 6
    assert dict(plan.describe())["slots per layer"] == "5 in layers 0-25, 4 in layers 26-31 (154 in all)"
    # the embedding table (32000 x 4096 in bfloat16) in RAM instead (offload/embedding.py): four slots more
    in_ram = plan_memory(**common, resident_bytes=1_281_892_352 - 262_144_000, host_resident_bytes=262_144_000)
    described = dict(in_ram.describe())
    assert described["slots per layer"] == "5 in layers 0-29, 4 in layers 30-31 (158 in all)"
    assert described["resident in RAM"] == "0.24 GiB"
    # room for one more slot in every layer gives 5 everywhere; never more than the experts
    assert spread(160, 32, 8) == (5,) * 32
    assert spread(300, 32, 8) == (8,) * 32
    assert spread(3, 2, 8) == (2, 1)


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
    # asked for: 4 in every layer, though 148 in all would fit
    assert plan.device_bytes == 2_100_000_000 + 128 * 68_000_000


def test_the_arena_shares_the_ram_with_weights_kept_there():
    every_expert = 256 * 68_000_000
    common = dict(device=CUDA, **MIXTRAL_2BIT, resident_bytes=1_600_000_000, kv_bytes=500_000_000,
                  device_budget=12 * GiB, host_budget=every_expert)  # fmt: skip
    assert plan_memory(**common).mode == "inclusive"
    squeezed = plan_memory(**common, host_resident_bytes=262_144_000)  # every expert no longer fits beside it
    in_slots = sum(squeezed.slots_per_layer) * 68_000_000
    assert (squeezed.mode, squeezed.host_bytes) == ("exclusive", every_expert - in_slots + 68_000_000)
    with pytest.raises(MoEOffloadError) as error:
        plan_memory(**common, host_resident_bytes=262_144_000, mode="inclusive")
    assert str(error.value) == (
        "the experts need 16.21 GiB of RAM beside the 9.56 GiB in GPU slots and 0.24 GiB of resident weights, "
        "and 16.21 GiB is available; quantize to fewer bits or raise --cpu-memory"
    )


def test_too_many_slots_say_what_to_change():
    with pytest.raises(
        MoEOffloadError,
        match=r"6 expert slots per layer need 15.10 GiB of GPU memory \(resident weights and KV cache 1.96 GiB, "
        r"kept for a prefill 0.47 GiB\), and the budget is 12.00 GiB; lower --slots",
    ):
        plan_memory(
            device=CUDA,
            **MIXTRAL_2BIT,
            resident_bytes=1_600_000_000,
            kv_bytes=500_000_000,
            reserve_bytes=500_000_000,
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
            reserve_bytes=500_000_000,
            device_budget=15 * GiB,
            host_budget=4 * GiB,
        )
    with pytest.raises(MoEOffloadError) as error:  # what takes the RAM, so that the user knows what to lower
        plan_memory(device=torch.device("cpu"), **MIXTRAL_2BIT, resident_bytes=GiB, kv_bytes=2 * GiB,
                    device_budget=GiB, host_budget=GiB)  # fmt: skip
    assert str(error.value) == (
        "the model needs 19.21 GiB of RAM (experts 16.21 GiB, KV cache 2.00 GiB, other weights 1.00 GiB) and "
        "1.00 GiB is available; lower --max-seq-len, quantize to fewer bits or raise --cpu-memory"
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
    # the CPU's one memory is the RAM: info's device row reads against the host budget
    plan = plan_memory(device=cpu, **{**small, "device_budget": 1024}, slots=3)
    assert plan.device_budget == plan.host_budget == GiB
    assert dict(plan.describe())["device"] == f"{format_bytes(plan.device_bytes)} of 1.00 GiB"


def test_the_cpu_plan_counts_the_arena_and_slots_the_cache_makes(trained_model_dir):
    """On the CPU the plan's figures are what ExpertCache allocates: an exclusive arena holds each expert not in
    a slot once, and each side a swap's spare row; the rest (resident weights, KV cache) is the same."""
    rest = set()
    for mode, rows in (("inclusive", 48), ("exclusive", 48 - 12 + 1)):  # 6 layers x 8 experts, 2 slots a layer
        model = offload.load(str(trained_model_dir), device="cpu", slots=2, cache_mode=mode)
        cache, plan = model.cache, model.plan
        assert plan.mode == mode
        assert plan.host_bytes == cache.arena.numel() == rows * cache.expert_bytes
        rest.add(plan.device_bytes - cache.arena.numel() - cache.slot_rows.numel())
    assert len(rest) == 1 and rest.pop() > 0


def test_a_cache_mode_on_the_cpu_needs_slots():
    message = r"^--cache-mode exclusive needs --slots on the CPU: without slots the experts are computed in place$"
    with pytest.raises(MoEOffloadError, match=message):
        plan_memory(device=torch.device("cpu"), num_layers=2, num_experts=8, expert_bytes=1, resident_bytes=0,
                    kv_bytes=0, device_budget=GiB, host_budget=GiB, mode="exclusive")  # fmt: skip


def test_a_budget_over_what_is_free_plans_for_what_is_free(monkeypatch):
    """A Colab T4's `--gpu-memory 15GiB --cpu-memory 12GiB` on the machine itself: 14.7 GiB to CUDA, less its
    context, and 12.7 GB of RAM."""
    from offload import planner

    monkeypatch.setattr(planner, "free_memory", lambda device: (14 * GiB + 600 * (1 << 20), 10 * GiB))
    assert planner.budgets(None, None, CUDA) == (None, None)
    assert planner.budgets("12GiB", "8GiB", CUDA) == (12 * GiB, 8 * GiB)
    with pytest.warns(UserWarning) as caught:
        assert planner.budgets("15GiB", "12GiB", CUDA) == (14 * GiB + 600 * (1 << 20), 10 * GiB)
    assert [str(w.message) for w in caught] == [
        "--gpu-memory 15GiB is more than the 14.59 GiB free on cuda; planning for 14.59 GiB",
        "--cpu-memory 12GiB is more than the 10.00 GiB of RAM available (less 1.00 GiB for Python and torch); "
        "planning for 10.00 GiB",
    ]


def test_a_cuda_device_that_is_not_there_is_one_line(monkeypatch):
    from offload.planner import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MoEOffloadError) as error:
        resolve_device("cuda:3")
    assert str(error.value) == "--device cuda:3: this machine has 1 GPU, cuda:0 to cuda:0"
    for name in ("cuda:x", "cuda:", "gpu"):
        with pytest.raises(MoEOffloadError) as error:
            resolve_device(name)
        assert str(error.value) == f"unknown device {name!r}; choose cpu, cuda, cuda:N or auto"
