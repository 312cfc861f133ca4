"""Read a Hugging Face checkpoint, local folder or hub id, one tensor at a time.

Only safetensors are ever read: they are memory-mapped and hold no code. A folder of pickles
(.bin/.pt/.pth) is refused with the command that converts it. Hub downloads fetch only
safetensors, json and tokenizer files, and remote code is never run.

Names come in two kinds: the checkpoint's own (`model.layers.0.block_sparse_moe.gate.weight`,
`names()`, `get()`) and ours (`layers.0.router`, `shapes()`, `get_ours()`, `tensors()`), which the
family's `sanitize` maps from the former.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections import Counter
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
        # our name -> (checkpoint name, the name sanitize yields from it, shape); tied names share an entry
        self._ours: dict[str, tuple[str, str, tuple[int, ...]]] | None = None
        self._our_names()  # now: it settles whether the embeddings are tied, which model_config then says
        self._check_complete()

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
        """(our name, tensor) for every tensor, in checkpoint order; with tied embeddings "embed" and "lm_head"
        are the same tensor."""
        ours = self._our_names()
        names_of = Counter(entry[:2] for entry in ours.values())  # (source, yielded) -> our names reading it
        shared = {}  # a tied tensor, read once for both of its names
        for name, entry in ours.items():
            if names_of[entry[:2]] == 1:
                yield name, self.get_ours(name)
            else:
                yield name, shared.setdefault(entry[:2], self.get_ours(name))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our name -> shape for every tensor, without reading any (sanitize runs on meta tensors)."""
        return {name: shape for name, (_, _, shape) in self._our_names().items()}

    def get_ours(self, name: str) -> Tensor:
        """One of our tensors. Experts of a fused file share one read: the last file tensor is kept."""
        source, yielded, _ = self._our_names()[name]
        if self._last is None or self._last[0] != source:
            self._last = None  # let the previous one go before reading the next
            self._last = (source, self.get(source))
        for ours, tensor in self.family.sanitize(source, self._last[1]):
            if ours == yielded:
                return tensor
        raise AssertionError(f"sanitize did not yield {yielded!r} from {source!r} a second time")

    def expert(self, layer: int, expert: int) -> dict[str, Tensor]:
        """One expert's {"w1": gate [I, D], "w2": down [D, I], "w3": up [I, D]}."""
        return {w: self.get_ours(f"layers.{layer}.experts.{expert}.{w}") for w in ("w1", "w2", "w3")}

    def resident(self) -> dict[str, Tensor]:
        """Every tensor that is not an expert (embeddings, attention, norms, routers, lm_head). A tied lm_head is
        left out: the decoder makes it the embedding, not a second copy of it."""
        return {name: self.get_ours(name) for name in self.resident_shapes()}

    def resident_shapes(self) -> dict[str, tuple[int, ...]]:
        """resident()'s names and shapes, without reading a tensor."""
        tied = self.model_config.tie_word_embeddings
        return {name: shape for name, shape in self.shapes().items()
                if ".experts." not in name and not (tied and name == "lm_head")}  # fmt: skip

    def _our_names(self) -> dict[str, tuple[str, str, tuple[int, ...]]]:
        """Our name -> (checkpoint name it comes from, the name sanitize yields it as, shape)."""
        if self._ours is None:
            ours_map = {}
            for name in self.names():
                meta = torch.empty(self.shape(name), device="meta")
                for ours, tensor in self.family.sanitize(name, meta):
                    ours_map[ours] = (name, ours, tuple(tensor.shape))
            self._ours = ours_map
            self._tie(ours_map)
        return self._ours

    def _check_complete(self) -> None:
        """Every tensor config.json calls for, at its shape, before one is read: a missing expert or a config of
        another size was a KeyError, or an error after a load read every expert (hours, in a CPU quantize). Any
        other tensor is dropped, with a warning."""
        c = self.model_config
        expected = c.resident_shapes()
        D, I = c.hidden_size, c.intermediate_size
        for layer in range(c.num_layers):
            for e in range(c.num_experts):
                prefix = f"layers.{layer}.experts.{e}."
                expected |= {prefix + "w1": (I, D), prefix + "w2": (D, I), prefix + "w3": (I, D)}
        shapes = self.shapes()
        for name, shape in expected.items():
            if name not in shapes:
                raise MoEOffloadError(f"{str(self.path)!r} has no tensor for {name!r}, which config.json calls for; "
                                      "the checkpoint is incomplete, re-download it")  # fmt: skip
            if shapes[name] != shape:
                raise MoEOffloadError(
                    f"tensor {name!r} in {str(self.path)!r} has shape {shapes[name]} but config.json implies {shape}; "
                    "the checkpoint and its config.json do not belong together"
                )
        unused = sorted(set(shapes) - set(expected))
        if unused:  # transformers leaves them unused too, and warns
            warnings.warn(
                f"{str(self.path)!r} holds {len(unused)} tensor{'s' if len(unused) > 1 else ''} that config.json does "
                f"not call for, such as {unused[0]!r}: more layers than it says; they are left unused, as "
                "transformers leaves them (check that config.json is this checkpoint's own)",
                stacklevel=4,  # open_hf's caller: past _check_complete, __init__ and open_hf
            )
            for name in unused:
                del self._ours[name]

    def _tie(self, ours: dict) -> None:
        """Tied embeddings as transformers ties them at load: the one of embedding and lm_head on disk stands
        for both. A checkpoint holding both with different values is not tied: transformers warns and keeps
        each, and so does this, untying the config."""
        if not self.model_config.tie_word_embeddings:
            return
        if "embed" in ours and "lm_head" in ours:
            self._ours = ours  # get_ours reads through it
            if torch.equal(self.get_ours("embed"), self.get_ours("lm_head")):
                ours["lm_head"] = ours["embed"]
            else:
                warnings.warn(
                    f"config.json ties lm_head to the embedding, but {str(self.path)!r} holds an lm_head with other "
                    "values: it is used, untied, as transformers does (set tie_word_embeddings to false to silence "
                    "this)",
                    stacklevel=5,  # open_hf's caller: past _tie, _our_names, __init__ and open_hf
                )
                self.model_config = dataclasses.replace(self.model_config, tie_word_embeddings=False)
            self._last = None
        elif "lm_head" in ours:  # only the head on disk: it is the embedding too
            ours["embed"] = ours["lm_head"]
        elif "embed" in ours:
            ours["lm_head"] = ours["embed"]

    def close(self) -> None:
        self._handles.clear()
        self._last = None
