"""Reading Hugging Face folders and hub ids: layouts, tied embeddings, safety rules and their error text."""

from __future__ import annotations

import json
import shutil
import warnings

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import save_file

from offload.checkpoint import HUB_PATTERNS, open_hf
from quant.errors import MoEOffloadError
from tests.tiny import hf_model, make_tiny_mixtral


def error_text(path_or_id) -> str:
    with pytest.raises(MoEOffloadError) as error:
        open_hf(path_or_id)
    return str(error.value)


def test_sharded_folder_reads_the_hub_layout(tiny_model_dir):
    checkpoint = open_hf(str(tiny_model_dir))
    assert (tiny_model_dir / "model.safetensors.index.json").is_file()
    assert (
        len(set(json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    )
    assert checkpoint.names()[:3] == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    ]
    assert checkpoint.model_config.num_layers == 2 and checkpoint.revision is None
    # every tensor we read is transformers' own parameter, bit for bit
    hf = hf_model(tiny_model_dir)
    experts = hf.model.layers[1].mlp.experts
    w = checkpoint.expert(1, 5)
    assert torch.equal(w["w1"], experts.gate_up_proj[5, :96])
    assert torch.equal(w["w3"], experts.gate_up_proj[5, 96:])
    assert torch.equal(w["w2"], experts.down_proj[5])
    assert torch.equal(checkpoint.get_ours("layers.1.router"), hf.model.layers[1].mlp.gate.weight)
    assert torch.equal(checkpoint.get_ours("lm_head"), hf.lm_head.weight)


def test_shapes_come_without_reading_and_match_the_tensors(tiny_model_dir):
    checkpoint = open_hf(tiny_model_dir)
    shapes = checkpoint.shapes()
    assert shapes == {name: tuple(t.shape) for name, t in checkpoint.tensors()}
    assert shapes["layers.0.k_proj"] == (32, 64) and shapes["layers.0.experts.7.w2"] == (64, 96)
    resident = checkpoint.resident()
    assert len(resident) == 3 + 2 * 7 and not any(".experts." in name for name in resident)


def test_single_file_and_tied_embeddings(tmp_path):
    path = make_tiny_mixtral(tmp_path / "m", tie=True, shards=1, layers=1)
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    checkpoint = open_hf(path)
    assert "lm_head.weight" not in checkpoint.names()
    tensors = dict(checkpoint.tensors())
    assert tensors["lm_head"] is tensors["embed"]
    assert checkpoint.shapes()["lm_head"] == (128, 64)
    assert torch.equal(checkpoint.get_ours("lm_head"), checkpoint.get("model.embed_tokens.weight"))


def _retie(path, tie: bool, drop: str | None = None):
    """The folder with config.json's tie_word_embeddings set to `tie`, and the tensor `drop` removed."""
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    if drop is not None:
        from safetensors.torch import load_file

        tensors = load_file(path / "model.safetensors")
        del tensors[drop]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("case", ["both, different", "lm_head only", "both, equal"])
def test_tied_embeddings_are_tied_as_transformers_ties_them(tmp_path, case):
    """transformers ties lm_head to the embedding only where the checkpoint does not hold both with different
    values (then it warns and keeps each), and a checkpoint with only lm_head gives it to the embedding too.
    A config saying tied beside a different lm_head made our logits wrong by 47, silently."""
    import offload
    from offload.convert import quantize_model

    path = make_tiny_mixtral(tmp_path / "m", tie=False, shards=1, layers=2)  # lm_head on disk, unlike embed
    if case == "lm_head only":
        _retie(path, True, drop="model.embed_tokens.weight")
    elif case == "both, equal":
        from safetensors.torch import load_file

        tensors = load_file(path / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        _retie(path, True)
    else:
        _retie(path, True)
    ids = torch.tensor([5, 9, 17, 33, 2])
    expected = hf_model(path)(ids[None]).logits[0]
    if case == "both, different":
        with pytest.warns(UserWarning, match="^config.json ties lm_head to the embedding, but .* holds an lm_head wi"):
            checkpoint = open_hf(path)
        assert not checkpoint.model_config.tie_word_embeddings and "lm_head" in checkpoint.resident()
    else:
        checkpoint = open_hf(path)
        assert checkpoint.model_config.tie_word_embeddings and "lm_head" not in checkpoint.resident()
        tensors = dict(checkpoint.tensors())
        assert tensors["lm_head"] is tensors["embed"]  # one tensor, read once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = offload.load(str(path), device="cpu")
        assert (loaded.logits(ids) - expected).abs().max() < 1e-4
        folder = quantize_model(str(path), tmp_path / "q", expert_bits="none", attn_bits="none", device="cpu")
    assert (offload.load(str(folder), device="cpu").logits(ids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("drop", "config", "message"),
    [
        ("model.layers.1.block_sparse_moe.experts.3.w2.weight", {},
         "has no tensor for 'layers.1.experts.3.w2', which config.json calls for; the checkpoint is incomplete, "
         "re-download it"),
        ("model.norm.weight", {}, "has no tensor for 'norm', which config.json calls for; the checkpoint is "
         "incomplete, re-download it"),
        (None, {"intermediate_size": 96}, "tensor 'layers.0.experts.0.w1' in '{path}' has shape (64, 64) but "
         "config.json implies (96, 64); the checkpoint and its config.json do not belong together"),
        (None, {"vocab_size": 100}, "tensor 'embed' in '{path}' has shape (128, 64) but config.json implies "
         "(100, 64); the checkpoint and its config.json do not belong together"),
    ],
)  # fmt: skip
def test_a_checkpoint_unlike_its_config_is_refused_before_a_tensor_is_read(tmp_path, drop, config, message):
    """A missing expert was a KeyError; a missing resident tensor or a config of another size let quantize write
    a whole folder (hours of experts on a CPU) that could never load."""
    from offload.convert import quantize_model

    path = make_tiny_mixtral(tmp_path / "m", tie=False, shards=1, layers=2, intermediate=64)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, **config}))
    if drop is not None:
        from safetensors.torch import load_file

        tensors = load_file(path / "model.safetensors")
        del tensors[drop]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    expected = message.format(path=path) if message.startswith("tensor") else f"'{path}' {message}"
    assert error_text(path) == expected
    with pytest.raises(MoEOffloadError) as error:
        quantize_model(str(path), tmp_path / "q", expert_bits="none", attn_bits="none", device="cpu")
    assert str(error.value) == expected and not (tmp_path / "q").exists()


def test_layers_beyond_the_config_are_left_unused_with_a_warning(tmp_path):
    """A config of fewer layers than its checkpoint: transformers warns and uses what the config says; those
    tensors were read, quantized and written to a folder that never used them. (Fewer experts is refused: the
    router's shape disagrees.)"""
    import offload
    from offload.convert import quantize_model

    path = make_tiny_mixtral(tmp_path / "m", tie=False, shards=1, layers=3, experts=4)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 2}))
    with pytest.warns(UserWarning) as warned:
        checkpoint = open_hf(path)
    assert [str(w.message) for w in warned] == [
        f"'{path}' holds 19 tensors that config.json does not call for, such as 'layers.2.experts.0.w1': more "
        "layers than it says; they are left unused, as transformers leaves them (check that config.json "
        "is this checkpoint's own)"
    ] and warned[0].filename == __file__
    assert set(checkpoint.shapes()) == set(checkpoint.model_config.resident_shapes()) | {
        f"layers.{layer}.experts.{e}.{w}" for layer in range(checkpoint.model_config.num_layers)
        for e in range(checkpoint.model_config.num_experts) for w in ("w1", "w2", "w3")
    }  # fmt: skip
    ids = torch.tensor([5, 9, 17, 33, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_model(path)(ids[None]).logits[0]
        folder = quantize_model(str(path), tmp_path / "q", expert_bits="none", attn_bits="none", device="cpu")
    assert (offload.load(str(folder), device="cpu").logits(ids) - expected).abs().max() < 1e-4


def test_trained_model_is_tied_and_sharded(trained_model_dir):
    checkpoint = open_hf(trained_model_dir)
    assert checkpoint.model_config.tie_word_embeddings and "lm_head.weight" not in checkpoint.names()
    assert checkpoint.shapes()["lm_head"] == (32000, 128)
    assert checkpoint.shapes()["layers.5.experts.7.w1"] == (256, 128)
    assert len(checkpoint.shapes()) == 3 + 6 * (7 + 3 * 8)


def test_missing_path():
    assert error_text("/nonexistent/mixtral") == (
        "no such folder: '/nonexistent/mixtral'; pass a Hugging Face folder or a hub id (owner/name)"
    )


def test_missing_config(tmp_path):
    assert error_text(str(tmp_path)) == (
        f"no config.json in '{tmp_path}'; moe-offload reads Hugging Face folders (config.json and safetensors)"
    )


def test_config_and_index_that_are_json_but_not_objects(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text("[]")
    assert error_text(tmp_path) == f"'{tmp_path / 'config.json'}' is not a JSON object; re-download it"
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    index = path / "model.safetensors.index.json"
    for weight_map in ([], {"lm_head.weight": 3}):
        index.write_text(json.dumps({"weight_map": weight_map}))
        assert error_text(path) == (
            f"'{index}' is not a valid index (TypeError('weight_map is not an object of file names')); re-download it"
        )


def test_pickles_only_are_refused_with_how_to_convert(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "consolidated.00.pt").write_bytes(b"not read")
    assert error_text(tmp_path) == (
        f"'{tmp_path}' holds only pickle weights (consolidated.00.pt, pytorch_model.bin); moe-offload reads "
        "safetensors only, because pickles can run code. Convert once, where you trust the files: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True), and "
        "the same with AutoTokenizer"
    )


def test_no_weights_at_all(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    assert error_text(tmp_path) == (
        f"no safetensors weights in '{tmp_path}'; expected model.safetensors or model.safetensors.index.json"
    )


def test_missing_shard(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert error_text(path) == (
        f"shard '{shard.name}' named by model.safetensors.index.json is missing from '{path}'; re-download it"
    )


def test_damaged_shard(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["lm_head.weight"]
    (path / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(MoEOffloadError) as error:  # at the open, which reads every tensor's shape
        open_hf(path)
    assert str(error.value).startswith(f"cannot read '{path / shard}' (")
    assert str(error.value).endswith("); the file is damaged, re-download it")


def test_not_moe_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert error_text(tmp_path) == "model_type 'llama' is not a Mixture-of-Experts model; moe-offload runs: mixtral"


def test_hub_id_downloads_only_safe_files(monkeypatch, tiny_model_dir):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    checkpoint = open_hf("mistralai/Mixtral-8x7B-Instruct-v0.1", revision="main")
    assert calls == [("mistralai/Mixtral-8x7B-Instruct-v0.1", {"revision": "main", "allow_patterns": HUB_PATTERNS})]
    assert checkpoint.source == "mistralai/Mixtral-8x7B-Instruct-v0.1" and checkpoint.revision == "model"
    # what the pattern list lets through, out of the real Mixtral-8x7B-Instruct repo's files
    repo_files = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00019.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "consolidated.00.pt",
        "pytorch_model-00001-of-00019.bin",
        "README.md",
        ".gitattributes",
    ]
    assert list(filter_repo_objects(repo_files, allow_patterns=HUB_PATTERNS)) == repo_files[:8]


def test_hub_id_offline_is_one_line(monkeypatch):
    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the cache.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert error_text("mistralai/Mixtral-8x7B-v0.1") == (
        "could not download 'mistralai/Mixtral-8x7B-v0.1' from the Hugging Face hub (LocalEntryNotFoundError: "
        "Cannot find the requested files in the cache.); check the id, your connection and `hf auth login`, "
        "or pass a local folder"
    )


def test_revision_on_a_folder_is_refused(tiny_model_dir):
    with pytest.raises(MoEOffloadError) as error:
        open_hf(tiny_model_dir, revision="v1")
    assert str(error.value) == f"--revision 'v1' applies to hub ids, but '{tiny_model_dir}' is a folder"
