"""The synthetic checkpoint: loads and runs like a quantized folder, exact bytes, deterministic, resumable."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import offload
from offload.decoder import ModelConfig
from offload.families.mixtral import model_config
from offload.synth import MAX_SEED, PRESETS, preset_config, resident_bytes, synthesize, synthetic_format, synthetic_name
from quant.checkpoint import JOURNAL, MANIFEST, RESIDENT, QuantizedCheckpoint, expert_file
from quant.errors import MoEOffloadError
from quant.hqq import ATTN_PRESETS, EXPERT_PRESETS, dequantize, random_quantized, tensor_shapes, to_tensors


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_loads_and_runs_on_token_ids(tiny_synth):
    model = offload.load(str(tiny_synth))
    logits = model.logits([1, 17, 300, 511, 42])
    assert logits.shape == (5, 512)
    assert torch.isfinite(logits).all()
    result = model.generate([1, 17, 300], max_new_tokens=6, temperature=0)
    assert len(result.token_ids) == 6 and all(0 <= t < 512 for t in result.token_ids)


def test_routing_spreads_over_every_expert(tiny_synth):
    """Random routers must not send every token to the same two experts (the cache would be trivial)."""
    model = offload.load(str(tiny_synth))
    chosen: Counter = Counter()

    class Recorder:
        def record(self, *, layer, experts, **_):
            chosen.update((layer, e) for e in experts)

    model.record_trace(Recorder())
    model.logits(list(range(1, 65)))
    for layer in range(4):
        counts = [chosen[(layer, e)] for e in range(8)]
        assert min(counts) > 0, (layer, counts)
        assert max(counts) < 64, (layer, counts)  # no expert takes every token


@pytest.mark.parametrize(("expert_bits", "attn_bits"), [("2", "4"), ("3", "4"), ("4", "none")])
def test_manifest_says_synthetic_and_the_formats_asked_for(tmp_path, expert_bits, attn_bits):
    folder = synthesize(tmp_path / "out", "tiny", expert_bits=expert_bits, attn_bits=attn_bits, layers=2)
    manifest = _manifest(folder)
    assert manifest["source"] == {"model": "synthetic:tiny", "revision": None}
    assert manifest["quantization"]["synthetic"] is True
    assert manifest["quantization"]["expert_bits"] == expert_bits
    assert manifest["expert_format"]["spec"] == EXPERT_PRESETS[expert_bits].to_dict()
    attn = ATTN_PRESETS[attn_bits]
    assert manifest["resident"]["spec"] == (None if attn is None else attn.to_dict())
    assert len(manifest["resident"]["quantized"]) == (0 if attn is None else 2 * 4)
    assert manifest["config"]["num_layers"] == 2
    assert sorted(manifest["files"]) == sorted(
        [expert_file(0), expert_file(1), RESIDENT, "config.json", "generation_config.json"]
    )
    assert not (folder / JOURNAL).exists()
    assert synthetic_name(manifest) == f"synthetic tiny (2 layers), {expert_bits}-bit experts"
    # config.json is a Mixtral config.json: our family adapter reads it back to the manifest's config
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "mixtral" and hf["architectures"] == ["MixtralForCausalLM"]
    assert model_config(hf) == ModelConfig.from_dict(manifest["config"]) == preset_config("tiny", layers=2)
    model = offload.load(str(folder))
    assert "synthetic:tiny" in model.info()["model"]
    assert torch.isfinite(model.logits([1, 2, 3])).all()


def test_resident_bytes_are_what_synthesize_writes(tiny_synth):
    from safetensors import safe_open

    with safe_open(tiny_synth / RESIDENT, "pt") as f:
        written = sum(f.get_tensor(name).nbytes for name in f.keys())
    assert resident_bytes("tiny") == written


def test_mixtral_8x7b_preset_is_mixtral_and_its_bytes_per_expert_match_the_readme():
    config = preset_config("mixtral-8x7b")
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (4096, 14336, 32)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 128)
    assert (config.num_experts, config.top_k, config.vocab_size, config.max_position) == (8, 2, 32000, 32768)
    assert (config.rope_theta, config.rms_norm_eps, config.sliding_window) == (1e6, 1e-5, None)
    assert (config.bos_token_id, config.eos_token_ids, config.tie_word_embeddings) == (1, (2,), False)
    # README's quantization table, computed without writing anything
    assert synthetic_format(config, "2").nbytes == 66_748_416
    assert synthetic_format(config, "3").nbytes == 81_474_816
    assert synthetic_format(config, "4").nbytes == 99_090_432
    assert preset_config("mixtral-8x7b", layers=3).num_layers == 3


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("bits", ["2", "3", "4"])
def test_every_preset_has_group_sizes_that_divide_its_dims(name, bits):
    config = preset_config(name)
    synthetic_format(config, bits)  # raises MoEOffloadError when a group size does not divide
    D, H, K, S = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    for shape in [(H * S, D), (K * S, D), (D, H * S)]:
        for attn in ("4", "8"):
            tensor_shapes(shape, ATTN_PRESETS[attn], "w")


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_synth):
    again = _manifest(synthesize(tmp_path / "again", "tiny", seed=np.int64(0)))["files"]  # numpy's seed was refused
    first = _manifest(tiny_synth)["files"]
    assert again == first
    # and the same bytes as every commit before: benchmarks and tests name figures of these folders
    assert first[expert_file(0)]["sha256"] == "4d57f2c5041e4030d443fe17b4d9375cacdebcbab918693bf22a5b12d8c721bc"
    assert _manifest(tmp_path / "again")["quantization"]["seed"] == 0
    assert synthetic_name(_manifest(tiny_synth)) == "synthetic tiny, 2-bit experts"
    assert synthetic_name({"quantization": {"expert_bits": "2"}}) is None  # a real quantized folder
    other = _manifest(synthesize(tmp_path / "other", "tiny", seed=1))["files"]
    for name in [expert_file(layer) for layer in range(4)] + [RESIDENT]:
        assert other[name]["sha256"] != first[name]["sha256"], name
    assert other["config.json"] == first["config.json"]


@pytest.mark.parametrize("bits", ["2", "3", "4"])
def test_random_quantized_dequantizes_small_and_finite(bits):
    spec = EXPERT_PRESETS[bits]
    q = random_quantized((256, 128), spec, torch.Generator().manual_seed(0))
    tensors = to_tensors(q, "w")
    expected = tensor_shapes((256, 128), spec, "w")
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == expected
    weight = dequantize(q)
    assert weight.shape == (256, 128) and torch.isfinite(weight).all()
    assert weight.abs().max() < 0.1
    assert 0.005 < weight.std() < 0.03  # a trained weight's scale, and not constant
    assert abs(weight.mean()) < 0.002
    same = random_quantized((256, 128), spec, torch.Generator().manual_seed(0))
    assert torch.equal(dequantize(same), weight)


def test_a_damaged_synth_folder_says_to_run_synth_again(tmp_path, tiny_synth):
    """Its errors said to re-run quantize, which has no source to read for a synthetic folder."""
    folder = tmp_path / "damaged"
    folder.mkdir()
    for file in tiny_synth.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    with (folder / expert_file(1)).open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(MoEOffloadError) as error:
        offload.load(str(folder), device="cpu")
    assert str(error.value) == (
        f"{folder / expert_file(1)} is altered or corrupt: its sha256 differs from manifest.json; re-run `moe-offload "
        "synth` with --force"
    )
    (folder / MANIFEST).unlink()
    (folder / JOURNAL).write_text(json.dumps({"job": {"source": "synthetic:tiny"}, "files": {}}))
    with pytest.raises(MoEOffloadError) as error:
        QuantizedCheckpoint.open(folder)
    assert str(error.value) == (
        f"{folder} is an unfinished `moe-offload synth` run (no manifest.json); re-run the same command to resume it"
    )


def test_killed_run_resumes_to_the_same_bytes(tmp_path, tiny_synth):
    out = tmp_path / "resumed"
    done = []

    def die_after_two_layers(what: str, layers: int, total: int) -> None:
        done.append(what)
        if layers == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(out, "tiny", progress=die_after_two_layers)
    assert not (out / MANIFEST).exists() and (out / JOURNAL).exists()
    inodes = {layer: os.stat(out / expert_file(layer)).st_ino for layer in (0, 1)}

    synthesize(out, "tiny")
    assert _manifest(out)["files"] == _manifest(tiny_synth)["files"]
    assert {layer: os.stat(out / expert_file(layer)).st_ino for layer in (0, 1)} == inodes  # not rewritten
    # another job in the same folder is refused, not mixed in
    with pytest.raises(MoEOffloadError, match="already holds a quantized checkpoint"):
        synthesize(out, "tiny", seed=1)


def test_bad_preset_and_layers_are_user_errors(tmp_path):
    with pytest.raises(MoEOffloadError) as error:
        synthesize(tmp_path / "x", "mixtral-9x9b")
    assert (
        str(error.value) == "unknown synthetic preset 'mixtral-9x9b'; choose one of mixtral-8x7b, mixtral-small, tiny"
    )
    with pytest.raises(MoEOffloadError) as error:
        synthesize(tmp_path / "x", "tiny", layers=0)
    assert str(error.value) == "--layers must be between 1 and 65535, got 0"
    with pytest.raises(MoEOffloadError) as error:
        synthesize(tmp_path / "x", "tiny", expert_bits="5")
    assert str(error.value) == "unknown --expert-bits '5'; choose one of 2, 3, 4, none"
    for seed in (-1, 10**18):  # 10**18 overflowed the resident stream's seed after the folder was started
        with pytest.raises(MoEOffloadError) as error:
            synthesize(tmp_path / "x", "tiny", seed=seed)
        assert str(error.value) == f"--seed must be a whole number from 0 to 140735340904446, got {seed}"
    assert not (tmp_path / "x").exists()  # nothing is written before the arguments check out
    (tmp_path / "file").touch()
    with pytest.raises(MoEOffloadError) as error:  # the seed is fine; the folder cannot be made under a file
        synthesize(tmp_path / "file" / "x", "tiny", seed=MAX_SEED)
    assert str(error.value) == f"cannot make the folder {tmp_path / 'file' / 'x'}: Not a directory; choose another OUT"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_codes_drawn_in_their_dtype_are_the_int64_draws(dtype):
    """ExpertFormat.random draws codes in the view's dtype (half the time of int64 draws cast, which synth did):
    torch draws the same numbers either way, so a seed's folder keeps its bytes."""
    from quant.hqq import code_high

    high = code_high(dtype)
    small, wide = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = torch.randint(0, high, (4097,), generator=small, dtype=dtype)
    assert torch.equal(drawn, torch.randint(0, high, (4097,), generator=wide).to(dtype))
    assert torch.equal(torch.rand(3, generator=small), torch.rand(3, generator=wide))  # and the stream goes on alike


def test_a_corrupt_synth_manifest_says_to_run_synth_again(tmp_path, tiny_synth):
    folder = tmp_path / "bad"
    folder.mkdir()
    for file in tiny_synth.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config"]["num_layers"] += 1
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MoEOffloadError) as error:
        offload.load(str(folder), device="cpu", verify=False)
    assert str(error.value).endswith("; re-run `moe-offload synth` with --force")
