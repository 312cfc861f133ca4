"""Benchmark scripts: each prints a table and writes its figures as JSON, with the device, commit and command."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from offload.bench import synchronize
from quant.errors import MoEOffloadError


def run_script(main: Callable[[], None]) -> None:
    """A script's entry: a user error (a missing file, a bad option) is one line and exit code 2, as the CLI's."""
    try:
        main()
    except MoEOffloadError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def ms_per_call(call: Callable[[], object], calls: int, device: torch.device | None = None) -> float:
    """Milliseconds a call of `call`, after one call to warm up; on a CUDA `device`, the work it queued counted."""
    device = device or torch.device("cpu")
    call()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - begin) / calls * 1000
