"""Read a Hugging Face checkpoint, local folder or hub id, one tensor at a time.

Only safetensors are ever read: they are memory-mapped and hold no code. A folder of pickles
(.bin/.pt/.pth) is refused with the command that converts it. Hub downloads fetch only
safetensors, json and tokenizer files, and remote code is never run.

Names come in two kinds: the checkpoint's own (`model.layers.0.block_sparse_moe.gate.weight`,
`names()`, `get()`) and ours (`layers.0.router`, `shapes()`, `get_ours()`, `tensors()`), which the
family's `sanitize` maps from the former.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from offload.decoder import ModelConfig
from offload.families import Family, family_for
from quant.errors import MoEOffloadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What a hub download fetches: weights as safetensors, configs, chat templates, tokenizers. Never pickles.
HUB_PATTERNS = ["model*.safetensors", "*.json", "*.jinja", "tokenizer.model", "tokenizer.model.*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def open_hf(path_or_id: str | Path, revision: str | None = None) -> HFCheckpoint:
    """A local Hugging Face folder, or a hub id (`owner/name`) downloaded with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if revision is not None:
            raise MoEOffloadError(f"--revision {revision!r} applies to hub ids, but {str(path)!r} is a folder")
        return HFCheckpoint(path)
    if isinstance(path_or_id, str) and _HUB_ID.match(path_or_id):
        return HFCheckpoint(_download(path_or_id, revision), source=path_or_id)
    raise MoEOffloadError(f"no such folder: {str(path)!r}; pass a Hugging Face folder or a hub id (owner/name)")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated repo, no such revision: all the user's to fix
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise MoEOffloadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {reason}); "
            "check the id, your connection and `hf auth login`, or pass a local folder"
        ) from error


def _natural(name: str) -> tuple:
    """Sort key: layer 2 before layer 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


class HFCheckpoint:
    """One checkpoint folder: config.json, its family, and lazily memory-mapped tensors."""

    def __init__(self, path: Path, source: str | None = None) -> None:
        self.path = Path(path)
        self.source = source or str(self.path)  # what the user named: folder or hub id
        # a hub snapshot's folder name is its commit hash; a local folder has no revision
        self.revision = self.path.name if source else None
        if not self.path.is_dir():
            raise MoEOffloadError(f"{str(self.path)!r} is a file; pass the checkpoint's folder")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MoEOffloadError(
                f"no config.json in {str(self.path)!r}; moe-offload reads Hugging Face folders "
                "(config.json and safetensors)"
            )
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise MoEOffloadError(f"{str(config_file)!r} is not valid JSON ({error}); re-download it") from None
        if not isinstance(self.config, dict):
            raise MoEOffloadError(f"{str(config_file)!r} is not a JSON object; re-download it")
        self.family: Family = family_for(self.config)
        try:
            self.model_config: ModelConfig = self.family.model_config(self.config)
        except MoEOffloadError as error:  # a bad or unsupported value: name the file it is in
            raise MoEOffloadError(f"{str(config_file)!r}: {error}") from None
        self._files = self._weight_map()  # checkpoint name -> file
        self._handles: dict[str, object] = {}
        self._last: tuple[str, Tensor] | None = None  # the last source tensor get_ours read (fused experts)
        self._ours: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                    raise TypeError("weight_map is not an object of file names")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise MoEOffloadError(f"{str(index)!r} is not a valid index ({error!r}); re-download it") from None
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise MoEOffloadError(
                        f"shard {file!r} named by {INDEX} is missing from {str(self.path)!r}; re-download it"
                    )
            return dict(weight_map)
        files = [self.path / SINGLE] if (self.path / SINGLE).is_file() else sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise MoEOffloadError(
                    f"{str(self.path)!r} holds only pickle weights ({', '.join(pickles)}); moe-offload reads "
                    "safetensors only, because pickles can run code. Convert once, where you trust the files: "
                    "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, "
                    "safe_serialization=True), and the same with AutoTokenizer"
                )
            raise MoEOffloadError(f"no safetensors weights in {str(self.path)!r}; expected {SINGLE} or {INDEX}")
        weight_map = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
        return weight_map

    def _handle(self, name: str):
        if name not in self._files:
            raise KeyError(f"{name!r} is not a tensor of {self.source}")
        file = self._files[name]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            except Exception as error:  # a truncated or corrupt shard
                raise MoEOffloadError(
                    f"cannot read {str(self.path / file)!r} ({error}); the file is damaged, re-download it"
                ) from None
        return self._handles[file]

    # --- the checkpoint's own names -------------------------------------------------------------

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, layer 0 before layer 1 before layer 10."""
        return sorted(self._files, key=_natural)

    def get(self, name: str) -> Tensor:
        """One tensor, read from its memory-mapped shard, in the dtype it is stored in."""
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    # --- ours -----------------------------------------------------------------------------------

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(our name, tensor) through the family's sanitize, reading one checkpoint tensor at a time.

        With tied embeddings, "lm_head" is yielded as the embedding (and any lm_head on disk skipped).
        """
        tied = self.model_config.tie_word_embeddings
        for name in self.names():
            for ours, tensor in self.family.sanitize(name, self.get(name)):
                if ours == "lm_head" and tied:
                    continue
                yield ours, tensor
                if ours == "embed" and tied:
                    yield "lm_head", tensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our name -> shape for every tensor, without reading any (sanitize runs on meta tensors)."""
        return {name: shape for name, (_, shape) in self._our_names().items()}

    def get_ours(self, name: str) -> Tensor:
        """One of our tensors. Experts of a fused file share one read: the last file tensor is kept."""
        source, _ = self._our_names()[name]
        if self._last is None or self._last[0] != source:
            self._last = None  # let the previous one go before reading the next
            self._last = (source, self.get(source))
        for ours, tensor in self.family.sanitize(source, self._last[1]):
            if ours == name or (name == "lm_head" and ours == "embed"):
                return tensor
        raise AssertionError(f"sanitize did not yield {name!r} from {source!r} a second time")

    def expert(self, layer: int, expert: int) -> dict[str, Tensor]:
        """One expert's {"w1": gate [I, D], "w2": down [D, I], "w3": up [I, D]}."""
        return {w: self.get_ours(f"layers.{layer}.experts.{expert}.{w}") for w in ("w1", "w2", "w3")}

    def resident(self) -> dict[str, Tensor]:
        """Every tensor that is not an expert (embeddings, attention, norms, routers, lm_head)."""
        return {name: self.get_ours(name) for name in self._our_names() if ".experts." not in name}

    def _our_names(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Our name -> (checkpoint name it comes from, shape)."""
        if self._ours is None:
            self._ours = {}
            tied = self.model_config.tie_word_embeddings
            for name in self.names():
                meta = torch.empty(self.shape(name), device="meta")
                for ours, tensor in self.family.sanitize(name, meta):
                    if not (ours == "lm_head" and tied):
                        self._ours[ours] = (name, tuple(tensor.shape))
            if tied and "embed" in self._ours:
                self._ours["lm_head"] = self._ours["embed"]
        return self._ours

    def close(self) -> None:
        self._handles.clear()
        self._last = None
