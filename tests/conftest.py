"""Shared fixtures: one default tiny checkpoint, and the trained tiny model beside the repo."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (quant/gemv.py) run in Triton's interpreter, so their tests run on the
# CPU. Triton reads this when a kernel is defined, so it is set before any test imports quant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU's kernel keeps tokens float32, so that a model's logits can be held to transformers' within float32
# rounding; tests of int8 tokens (tests/test_cpu_gemv.py) turn them on. Set for the subprocesses tests start too.
os.environ["MOE_OFFLOAD_INT8_TOKENS"] = "0"

from tests.tiny import make_tiny_mixtral

TRAINED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-mixtral-code"


@pytest.fixture(autouse=True)
def tuned_folders(tmp_path_factory, monkeypatch) -> Iterator[tuple[Path, Path]]:
    """Launches tuned for a GPU (quant/gemv.py) are read from the package's folder and the user's cache: in tests,
    from two empty folders of their own, read afresh in each test. Returns (the package's, the user's)."""
    from quant import gemv

    shipped, user = tmp_path_factory.mktemp("gemv-tuned-shipped"), tmp_path_factory.mktemp("gemv-tuned-user")
    monkeypatch.setattr(gemv, "TUNED_FOLDER", shipped)
    monkeypatch.setattr(gemv, "user_tuned_folder", lambda: user)
    gemv.forget_tuned()
    yield shipped, user
    gemv.forget_tuned()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A default tiny random Mixtral in the hub's layout (2 shards, per-expert names, untied)."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral") / "model")


@pytest.fixture(scope="session")
def trained_model_dir() -> Path:
    """The really trained tiny Mixtral (../shared/models/tiny-mixtral-code); skipped where it is absent."""
    if not (TRAINED_MODEL / "config.json").is_file():
        pytest.skip(f"the trained tiny model is not at {TRAINED_MODEL} (it lives in ../shared beside the repo)")
    return TRAINED_MODEL


@pytest.fixture
def planned_slots(monkeypatch):
    """`planned_slots((4, 3, ...))`: the next `offload.load` gets these slots per layer, as the planner
    gives them on CUDA when an even split leaves some over (on the CPU it gives every layer --slots)."""
    import dataclasses

    import offload.api

    planned = offload.api.plan_memory

    def force(slots: tuple[int, ...]) -> None:
        monkeypatch.setattr(offload.api, "plan_memory",
                            lambda **kw: dataclasses.replace(planned(**kw), slots_per_layer=slots))  # fmt: skip

    return force
