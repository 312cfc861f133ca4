"""Hand-edited configs: each bad value is one line naming the field, the value and the rule, before anything runs
or is written (offload.decoder.check_config), in the words of the file it came from."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from offload.checkpoint import open_hf
from offload.convert import open_source, quantize_model
from offload.decoder import check_prefill_chunk
from offload.tokenizer import load_tokenizer
from quant.checkpoint import RERUN
from quant.errors import MoEOffloadError
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_tiny_mixtral

# config.json edits -> the problem, in config.json's names (the tiny model: 8 experts, 4 heads, 2 key heads)
HF_EDITS = [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be between 1 and num_local_experts (8)"),
    ({"num_experts_per_tok": "2"}, "num_experts_per_tok '2' must be between 1 and num_local_experts (8)"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok 0 must be between 1 and num_local_experts (8)"),
    ({"num_hidden_layers": 0}, "num_hidden_layers 0 must be a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers True must be a positive integer"),
    ({"rope_parameters": {"rope_theta": "x"}}, "rope_theta 'x' must be a positive finite number"),
    ({"max_position_embeddings": None}, "max_position_embeddings None must be a positive integer"),
    ({"num_attention_heads": 3}, "num_attention_heads 3 must be a multiple of num_key_value_heads (2)"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 must be a multiple of num_key_value_heads (3)"),
    ({"num_key_value_heads": 0}, "num_key_value_heads 0 must be a positive integer"),
    ({"hidden_size": -128}, "hidden_size -128 must be a positive integer"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps '1e-5' must be a positive finite number"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps nan must be a positive finite number"),
    ({"eos_token_id": "x"}, "eos_token_id 'x' must be an integer or a list of integers"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings 'no' must be true or false"),
    ({"sliding_window": 0}, "sliding_window 0 must be a positive integer or null"),
    ({"head_dim": 15}, "head_dim 15 must be even: rotary embeddings turn its dimensions in pairs"),
    (
        {"num_experts": 4},
        "num_experts 4 and num_local_experts 8 disagree (num_experts is transformers' alias for "
        "num_local_experts); keep one of them in config.json",
    ),
    ({"rope_scaling": "default"}, "rope_scaling 'default' must be an object or null"),
]
# manifest.json config edits -> the problem, in our names
MANIFEST_EDITS = [
    ({"top_k": 9}, "top_k 9 must be between 1 and num_experts (8)"),
    ({"top_k": 0}, "top_k 0 must be between 1 and num_experts (8)"),
    ({"rope_theta": "x"}, "rope_theta 'x' must be a positive finite number"),
    ({"head_dim": 0}, "head_dim 0 must be a positive integer"),
    ({"head_dim": 15}, "head_dim 15 must be even: rotary embeddings turn its dimensions in pairs"),
    ({"max_position": None}, "max_position None must be a positive integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps -1 must be a positive finite number"),
    ({"num_layers": 0}, "num_layers 0 must be a positive integer"),
    ({"eos_token_ids": ["a"]}, "eos_token_ids ['a'] must be an integer or a list of integers"),
    ({"num_experts": -1}, "num_experts -1 must be a positive integer"),  # was "--slots must be between 1 and -1"
    ({"bos_token_id": 1.5}, "bos_token_id 1.5 must be an integer or null"),
    ([], "config [] must be an object"),
]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("src") / "model", intermediate=128, seed=3)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory) -> Path:
    return quantize_model(str(src), tmp_path_factory.mktemp("q") / "model", expert_bits="4", attn_bits="4")


def edited(folder: Path, to: Path, file: str, edit) -> Path:
    """A copy of `folder` with `edit` merged into `file` (manifest.json: into its config; a list replaces it)."""
    shutil.copytree(folder, to)
    data = json.loads((to / file).read_text())
    config = data["config"] if file == "manifest.json" else data
    if isinstance(edit, list):
        data["config"] = edit
    else:
        config.update({k: {**config[k], **v} if isinstance(v, dict) else v for k, v in edit.items()})
    (to / file).write_text(json.dumps(data))  # the hashes cover the files the manifest lists, not itself
    return to


@pytest.mark.parametrize("edit, problem", HF_EDITS, ids=[next(iter(e)) for e, _ in HF_EDITS])
def test_a_bad_config_json_is_refused_before_quantize_writes(src, tmp_path, edit, problem):
    folder = edited(src, tmp_path / "src", "config.json", edit)
    message = f"'{folder / 'config.json'}': {problem}"
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(message)}$"):
        open_hf(str(folder))
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(message)}$"):
        quantize_model(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, problem", MANIFEST_EDITS, ids=[str(e) for e, _ in MANIFEST_EDITS])
def test_a_bad_manifest_config_is_a_corrupt_manifest(quantized, tmp_path, edit, problem):
    folder = edited(quantized, tmp_path / "q", "manifest.json", edit)
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(f'corrupt manifest in {folder}: {problem}; {RERUN}')}$"):
        open_source(str(folder))


def test_an_odd_head_dim_with_matching_shapes_is_refused_before_quantize_writes(tmp_path):
    """hidden 60 over 4 heads: the projections fit head_dim 15, and the first forward used to fail in RoPE."""
    folder = make_tiny_mixtral(tmp_path / "src", hidden=60, seed=3)
    assert json.loads((folder / "config.json").read_text()).get("head_dim") is None
    message = (f"'{folder / 'config.json'}': head_dim (hidden_size / num_attention_heads) 15 must be even: rotary "
               "embeddings turn its dimensions in pairs")  # fmt: skip
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(message)}$"):
        open_hf(str(folder))
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(message)}$"):
        quantize_model(str(folder), tmp_path / "out", expert_bits="none")
    assert not (tmp_path / "out").exists()


def test_the_cli_says_one_line_and_exits_2(capsys, src, quantized, tmp_path):
    bad_src = edited(src, tmp_path / "src", "config.json", {"num_experts_per_tok": 9})
    expected = f"'{bad_src / 'config.json'}': num_experts_per_tok 9 must be between 1 and num_local_experts (8)"
    for argv in (("info", bad_src, "--device", "cpu"), ("quantize", bad_src, tmp_path / "out")):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()
    bad_q = edited(quantized, tmp_path / "q", "manifest.json", {"top_k": 9})
    code, _, err = run(capsys, "generate", bad_q, "--prompt", "x", "--device", "cpu")
    assert_one_line_error(code, err, f"corrupt manifest in {bad_q}: top_k 9 must be between 1 and num_experts (8); "
                          f"{RERUN}")  # fmt: skip
    # a chunk past int64 used to overflow in Tensor.split, after the experts were loaded
    code, _, err = run(capsys, "generate", quantized, "--prompt", "x", "--prefill-chunk", "99999999999999999999")
    assert_one_line_error(code, err, "--prefill-chunk must be at most 1048576 (a chunk longer than the prompt takes "
                          "it whole), got 99999999999999999999")  # fmt: skip


def test_prefill_chunk_bounds():
    check_prefill_chunk(2**20)
    with pytest.raises(MoEOffloadError, match=r"^--prefill-chunk must be at most 1048576 .*, got 1048577$"):
        check_prefill_chunk(2**20 + 1)


def test_a_config_json_transformers_refuses_is_one_line_from_the_tokenizer(trained_model_dir, tmp_path):
    """A quantized folder keeps a copy of config.json that only the tokenizer reads: transformers validates it."""
    for file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(trained_model_dir / file, tmp_path / file)
    config = json.loads((trained_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": "no"}))
    with pytest.raises(MoEOffloadError, match=f"^cannot load the tokenizer in {re.escape(str(tmp_path))}: ") as error:
        load_tokenizer(tmp_path)
    # transformers' own words (huggingface_hub's validation), on one line, naming the field
    assert "'tie_word_embeddings'" in str(error.value) and "\n" not in str(error.value)
