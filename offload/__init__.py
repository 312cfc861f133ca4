"""moe-offload: run Mixture-of-Experts models with experts streamed through a per-layer cache."""

from offload.api import LoadOptions, OffloadedModel, RunStats, load, prepare
from quant.errors import MoEOffloadError

__all__ = ["LoadOptions", "MoEOffloadError", "OffloadedModel", "RunStats", "load", "prepare"]
