"""From a Hugging Face checkpoint to our quantized folder, and the sources `load()` reads from.

`quantize_model` streams the source one layer of experts at a time (peak RAM near one layer, never the
whole model), writes each file under a temporary name and renames it, and resumes after a kill: every
finished file is in the writer's journal and is skipped on the next run of the same job.

A source is what a model is built from: an HF folder (quantized in memory when asked) or a quantized
folder. Both answer the same questions, so `load()` has one path.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from offload.checkpoint import HFCheckpoint, open_hf
from offload.decoder import ModelConfig
from offload.families import Family, family_for
from offload.planner import format_bytes, resolve_device
from quant.bnb import NF4Spec, quantize_nf4
from quant.bnb import from_tensors as nf4_from_tensors
from quant.bnb import shape_problem as nf4_shape_problem
from quant.bnb import tensor_shapes as nf4_tensor_shapes
from quant.checkpoint import (
    FORMAT_VERSION,
    JOURNAL,
    MANIFEST,
    RESIDENT,
    CheckpointWriter,
    QuantizedCheckpoint,
    expert_file,
    is_quantized_checkpoint,
    read_journal,
    rerun_hint,
)
from quant.errors import MoEOffloadError
from quant.hqq import ATTN_PRESETS, EXPERT_PRESETS, Quantized, QuantSpec, from_tensors, preset, quantize
from quant.hqq import shape_problem as hqq_shape_problem
from quant.hqq import tensor_shapes as hqq_tensor_shapes
from quant.linear import map_tensors, weight_to_tensors
from quant.packing import ExpertFormat

# Non-expert weights that are quantized: the attention projections. Embeddings, lm_head, norms and
# routers stay in full precision: they are small beside the experts, and the routers decide the cache.
QUANTIZED_RESIDENT = re.compile(r"layers\.\d+\.[qkvo]_proj$")
# Copied beside the weights, so a quantized folder is a whole model (tokenizer, chat template, stop ids).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

Progress = Callable[[str, int, int], None]  # (what, done, total): before the first unit, then after each
AttnSpec = QuantSpec | NF4Spec | None
ATTN_QUANT = ("hqq", "bnb")


def no_progress(what: str, done: int, total: int) -> None:
    pass


def attn_spec(attn_bits: str, attn_quant: str) -> AttnSpec:
    """The attention projections' format: HQQ at --attn-bits, or bitsandbytes NF4 (4-bit only)."""
    if attn_quant not in ATTN_QUANT:
        raise MoEOffloadError(f"unknown --attn-quant {attn_quant!r}; choose hqq or bnb")
    if attn_quant == "bnb":
        if attn_bits != "4":
            raise MoEOffloadError(f"--attn-quant bnb is 4-bit NF4 only; use --attn-bits 4, not {attn_bits}")
        return NF4Spec()
    return preset(ATTN_PRESETS, attn_bits, "--attn-bits")


def spec_from_dict(d: dict | None) -> AttnSpec:
    if d is None:
        return None
    return NF4Spec.from_dict(d) if d.get("method") == "bnb-nf4" else QuantSpec.from_dict(d)


def describe_spec(spec: AttnSpec) -> str:
    if spec is None:
        return "unquantized"
    return f"bitsandbytes NF4, block {spec.blocksize}" if isinstance(spec, NF4Spec) else spec.describe()


def quantize_resident(weights: dict[str, torch.Tensor], spec: AttnSpec) -> dict[str, torch.Tensor | Quantized]:
    """Quantize the attention projections with `spec`; leave everything else as it is."""
    if spec is None:
        return dict(weights)
    method = quantize_nf4 if isinstance(spec, NF4Spec) else quantize
    return {name: method(w, spec) if QUANTIZED_RESIDENT.search(name) else w for name, w in weights.items()}


def quantize_model(
    source: str,
    out: str | Path,
    *,
    revision: str | None = None,
    expert_bits: str = "2",
    attn_bits: str = "4",
    attn_quant: str = "hqq",
    device: str = "auto",
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Write `source` (an HF folder, or a hub id at `revision`: a branch, tag or commit) as a quantized
    folder at `out`; returns `out`.

    hqq runs on `device` ("auto": CUDA when there is one): on a GPU a Mixtral expert matrix takes well
    under a second, on a CPU about 17 s. The bytes differ between the two (hqq optimizes in the
    device's arithmetic), so the device is part of the job: a resume never mixes them.
    """
    where = resolve_device(device)
    expert_spec = preset(EXPERT_PRESETS, expert_bits, "--expert-bits")
    resident_spec = attn_spec(attn_bits, attn_quant)
    refuse_quantized(source)
    checkpoint = open_hf(source, revision)
    config = checkpoint.model_config
    storage_dtype = checkpoint.expert(0, 0)["w1"].dtype  # unquantized experts keep the source's dtype
    expert_format = ExpertFormat.build(config.hidden_size, config.intermediate_size, expert_spec, storage_dtype)
    check_resident(checkpoint.shapes(), resident_spec)  # before the experts, which take hours on a CPU
    experts = config.num_layers * config.num_experts * expert_format.nbytes
    resident_bytes = resident_nbytes(checkpoint.resident_shapes(), resident_spec, storage_dtype.itemsize)
    check_free_space(Path(out), experts + resident_bytes, "quantize")
    origin = checkpoint.source if checkpoint.revision else str(checkpoint.path.resolve())  # however SRC is spelt
    job = {
        "source": origin,
        "revision": checkpoint.revision,
        "expert_bits": expert_bits,
        "attn_bits": attn_bits,
        "attn_quant": attn_quant,
        "device": where.type,
        "format_version": FORMAT_VERSION,
    }
    journal = read_journal(Path(out))
    if journal is not None and journal.get("job") == {**job, "source": checkpoint.source}:
        job = journal["job"]  # a run started before jobs named SRC by its resolved path: resume it as it was
    writer = CheckpointWriter(Path(out), job=job, force=force)

    steps = config.num_layers + 1  # each layer's experts, then the resident weights
    progress("layers", 0, steps)
    for layer in range(config.num_layers):
        name = expert_file(layer)
        if not writer.done(name):
            packed = {}
            for e in range(config.num_experts):
                weights = {name: w.to(where) for name, w in checkpoint.expert(layer, e).items()}
                packed[str(e)] = expert_format.pack(**weights).cpu()
            writer.write(name, packed)
        progress("layers", layer + 1, steps)

    resident = checkpoint.resident()
    quantized: dict[str, dict] = {}
    if not writer.done(RESIDENT):
        tensors: dict[str, torch.Tensor] = {}
        on_device = {name: w.to(where) if QUANTIZED_RESIDENT.search(name) else w for name, w in resident.items()}
        for name, weight in quantize_resident(on_device, resident_spec).items():
            tensors.update(weight_to_tensors(map_tensors(weight, torch.Tensor.cpu), name))
        writer.write(RESIDENT, tensors)
    if resident_spec is not None:
        quantized = {
            name: {"shape": list(resident[name].shape)} for name in resident if QUANTIZED_RESIDENT.search(name)
        }
    progress("resident", steps, steps)

    for side in SIDE_FILES:
        path = checkpoint.path / side
        if path.is_file() and not writer.done(side):
            writer.write_bytes(side, path.read_bytes())
    quantization = {"expert_bits": expert_bits, "attn_bits": attn_bits, "attn_quant": attn_quant}
    source = {"model": origin, "revision": checkpoint.revision}
    writer.finish(build_manifest(source, config, expert_format, resident_spec, quantized, quantization))
    return Path(out)


def check_resident(shapes: dict[str, tuple[int, ...]], spec: AttnSpec) -> None:
    """Refuse an attention format that a projection's shape cannot take, naming the options that can."""
    if spec is None:
        return
    problem = nf4_shape_problem if isinstance(spec, NF4Spec) else hqq_shape_problem
    for name, shape in shapes.items():
        if QUANTIZED_RESIDENT.search(name) and (bad := problem(shape, spec)):
            raise MoEOffloadError(f"{name}: {bad}; pass another --attn-bits (none: unquantized) or --attn-quant")


def build_manifest(
    source: dict,
    config: ModelConfig,
    expert_format: ExpertFormat,
    resident_spec: AttnSpec,
    quantized: dict[str, dict],
    quantization: dict,
) -> dict:
    """What a quantized folder's manifest.json says of its model (CheckpointWriter adds the files).

    `quantized` names the resident tensors stored quantized with `resident_spec`, with their shapes.
    """
    return {
        "source": source,
        "model_type": config.model_type,
        "config": config.to_dict(),
        "expert_format": expert_format.to_dict(),
        "resident": {"spec": None if resident_spec is None else resident_spec.to_dict(), "quantized": quantized},
        "quantization": quantization,
    }


class HFSource:
    """An HF folder or hub id, quantized in memory when asked (`--expert-bits`, `--attn-bits`)."""

    def __init__(self, checkpoint: HFCheckpoint, expert_bits: str, attn_bits: str, attn_quant: str) -> None:
        self.checkpoint = checkpoint
        self.family: Family = checkpoint.family
        self.config: ModelConfig = checkpoint.model_config
        self.folder = checkpoint.path
        self.expert_spec = preset(EXPERT_PRESETS, expert_bits, "--expert-bits")
        self.attn_spec = attn_spec(attn_bits, attn_quant)
        check_resident(checkpoint.shapes(), self.attn_spec)
        self.description = f"{checkpoint.source} (experts {expert_bits}, attention {describe_spec(self.attn_spec)})"

    def expert_format(self, dtype: torch.dtype) -> ExpertFormat:
        c = self.config
        return ExpertFormat.build(c.hidden_size, c.intermediate_size, self.expert_spec, dtype)

    def resident(self) -> dict[str, torch.Tensor | Quantized]:
        return quantize_resident(self.checkpoint.resident(), self.attn_spec)

    def packed_expert(
        self, layer: int, expert: int, expert_format: ExpertFormat, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return expert_format.pack(**self.checkpoint.expert(layer, expert), out=out)


class QuantizedSource:
    """A folder written by `quantize`: checked against its manifest, experts read from memory maps."""

    def __init__(self, checkpoint: QuantizedCheckpoint) -> None:
        manifest = checkpoint.manifest
        self.checkpoint = checkpoint
        self.folder = checkpoint.path
        try:
            self.config = ModelConfig.from_dict(manifest["config"])
            self._format = ExpertFormat.from_dict(manifest["expert_format"])
            self.attn_spec = spec_from_dict(manifest["resident"]["spec"])
            self.quantized = manifest["resident"]["quantized"]
            problem = self._disagreement()
        except MoEOffloadError as error:  # a config value the decoder cannot run (offload.decoder.check_config)
            problem = str(error)
        except (KeyError, TypeError, ValueError) as error:
            problem = repr(error)
        if problem:
            raise MoEOffloadError(f"corrupt manifest in {self.folder}: {problem}; {rerun_hint(manifest)}")
        self.family = family_for({"model_type": self.config.model_type, "num_local_experts": self.config.num_experts})
        quant = manifest.get("quantization", {})
        self.description = (
            f"{self.folder} (quantized from {manifest['source']['model']}: experts {quant.get('expert_bits')}, "
            f"attention {quant.get('attn_bits')})"
        )

    def _disagreement(self) -> str | None:
        """What in the manifest disagrees with itself or with the expert files' headers, if anything: the
        hashes cover the files but not the manifest, and a wrong layer count or layout would otherwise
        surface mid-load as a KeyError or a bad view."""
        fmt, config, files = self._format, self.config, self.checkpoint.manifest["files"]
        if (fmt.hidden_size, fmt.intermediate_size) != (config.hidden_size, config.intermediate_size):
            return "expert_format's sizes differ from the config's"
        if ExpertFormat.build(fmt.hidden_size, fmt.intermediate_size, fmt.spec, fmt.dtype).layout != fmt.layout:
            return "expert_format's layout does not follow from its sizes and quantization"
        if RESIDENT not in files:
            return f"{RESIDENT} is not listed"
        shapes = config.resident_shapes()
        for name, meta in self.quantized.items():
            if name not in shapes:
                return f"it lists a quantized weight {name}, which the config has no place for"
            if tuple(meta["shape"]) != shapes[name]:
                return f"it lists {name} with shape {tuple(meta['shape'])}, but the config gives it {shapes[name]}"
        for layer in range(config.num_layers):
            name = expert_file(layer)
            if name not in files:
                return f"the config has {config.num_layers} layers, but {name} is not listed"
            experts = self.checkpoint.read(name)
            for expert in range(config.num_experts):
                if str(expert) not in experts or experts.nbytes(str(expert)) != fmt.nbytes:
                    return f"{name} holds no {fmt.nbytes}-byte expert {expert}, which the config and layout call for"
        return None

    def expert_format(self, dtype: torch.dtype) -> ExpertFormat:
        """The stored format; unquantized experts (--expert-bits none) in `dtype`, since they are computed in it
        (bfloat16 stored, float32 on the CPU or float16 on a T4, say)."""
        fmt = self._format
        if fmt.spec is None and fmt.dtype != dtype:
            return ExpertFormat.build(fmt.hidden_size, fmt.intermediate_size, None, dtype)
        return fmt

    def resident(self) -> dict[str, torch.Tensor | Quantized]:
        tensors = self.checkpoint.read(RESIDENT)
        weights: dict[str, torch.Tensor | Quantized] = {}
        unpack = nf4_from_tensors if isinstance(self.attn_spec, NF4Spec) else from_tensors
        for name, meta in self.quantized.items():
            weights[name] = unpack(tensors, name, self.attn_spec, tuple(meta["shape"]))
        taken = tuple(f"{name}." for name in self.quantized)
        for name in tensors:
            if not name.startswith(taken):
                weights[name] = tensors[name]
        return weights

    def packed_expert(
        self, layer: int, expert: int, expert_format: ExpertFormat, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The expert in `expert_format`, into `out` when given (a cache row: no buffer between), else the stored
        bytes where the format is the files'. Another format (the compute dtype's, or scales by output) repacks."""
        stored = self.checkpoint.expert(layer, expert)
        if expert_format is not self._format:
            return expert_format.pack(**self._format.unpack(stored), out=out)
        return stored if out is None else out.copy_(stored)


def resident_nbytes(shapes: dict[str, tuple[int, ...]], spec: AttnSpec, itemsize: int) -> int:
    """The bytes quantize writes for the resident weights: attention as `spec` packs it, the rest as stored
    (`itemsize` bytes a weight)."""
    total = 0
    for name, shape in shapes.items():
        if spec is not None and QUANTIZED_RESIDENT.search(name):
            layout = (nf4_tensor_shapes if isinstance(spec, NF4Spec) else hqq_tensor_shapes)(shape, spec, name)
            total += sum(math.prod(size) * dtype.itemsize for size, dtype in layout.values())
        else:
            total += math.prod(shape) * itemsize
    return total


def check_free_space(out: Path, need: int, command: str) -> None:
    """Refuse a run the disk under `out` cannot hold, before its first file: Mixtral takes hours to quantize
    and a few minutes to synthesize, and a full disk would stop either late. Files already in `out` (a run
    being resumed, or overwritten with --force) count as room."""
    try:  # a link or a sparse file frees no room when the run replaces it: count real files' blocks only
        files = list(out.iterdir()) if out.is_dir() else []
        existing = sum(f.stat().st_blocks * 512 for f in files if f.is_file() and not f.is_symlink())
    except OSError:  # unreadable: CheckpointWriter says so in one line
        existing = 0
    place = out
    while not place.exists():  # the folder is made by the run: ask the disk it will be on
        place = place.parent
    free = shutil.disk_usage(place).free
    if need - existing > free:
        raise MoEOffloadError(
            f"{command} writes {format_bytes(need)} to {out}, and {place} has {format_bytes(free)} free; free some "
            "space or write elsewhere"
        )


def refuse_quantized(source: str) -> None:
    """quantize's source is a Hugging Face folder: refuse one of ours, finished or not, before reading it."""
    refuse_unfinished(source)
    if is_quantized_checkpoint(source):
        raise MoEOffloadError(
            f"{source} is already a quantized folder; quantize reads a Hugging Face folder (use this one as it is)"
        )


def refuse_unfinished(path: str) -> None:
    """A quantized folder without its manifest (written last, after every file it lists): a killed run,
    which its journal lets the same command finish, or else a damaged folder."""
    if is_quantized_checkpoint(path):
        return
    if (Path(path) / JOURNAL).is_file():
        raise MoEOffloadError(f"{path} is an unfinished quantize or synth run; run the same command again to finish it")
    if (Path(path) / RESIDENT).is_file():
        raise MoEOffloadError(
            f"{path} holds a quantized folder's files but no {MANIFEST}, which is written last: the folder is "
            "incomplete or damaged; delete it, then quantize or synth again"
        )


def open_source(
    model: str, *, expert_bits: str = "none", attn_bits: str = "none", attn_quant: str = "hqq", verify: bool = True
):
    """A quantized folder when `model` holds a manifest.json, else an HF folder or hub id."""
    refuse_unfinished(model)
    if is_quantized_checkpoint(model):
        if (expert_bits, attn_bits) != ("none", "none"):
            raise MoEOffloadError(
                f"{model} is already quantized; --expert-bits and --attn-bits apply to Hugging Face folders only"
            )
        return QuantizedSource(QuantizedCheckpoint.open(Path(model), verify=verify))
    return HFSource(open_hf(model), expert_bits, attn_bits, attn_quant)
