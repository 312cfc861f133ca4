"""Edges of the checkpoint reader, quantize's sources, the tokenizer, bench and the load API that the other tests
leave open: exact names, orders, JSON keys and error text (found by mutation testing)."""

from __future__ import annotations

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

import offload
import offload.bench
from offload import api
from offload.bench import Link, ReplayedRouting, bench
from offload.checkpoint import HUB_PATTERNS, open_hf
from offload.convert import open_source, quantize_model
from offload.tokenizer import is_mistral_v1_vocab, load_tokenizer, stop_ids
from quant.errors import MoEOffloadError
from quant.hqq import EXPERT_PRESETS
from quant.packing import ExpertFormat
from tests.test_bench import TINY_TRACE
from tests.test_chat import MISTRAL_V1_MODEL
from tests.tiny import make_tiny_mixtral

# ---------------------------------------------------------------------------------------------------
# offload/checkpoint.py


def test_a_hub_download_fetches_the_chat_template_and_tokenizer_variants():
    """Chat templates shipped as chat_template.jinja (transformers 5) and mistral-common's versioned
    tokenizer.model.v3 come with the weights; pickles and consolidated .pth files never do."""
    repo_files = [
        "chat_template.jinja",
        "tokenizer.model.v3",
        "model.safetensors",
        "params.json",
        "consolidated.safetensors",
        "consolidated.00.pth",
        "pytorch_model.bin",
    ]
    assert list(filter_repo_objects(repo_files, allow_patterns=HUB_PATTERNS)) == repo_files[:4]


@pytest.fixture(scope="module")
def eleven_experts(tmp_path_factory):
    """One layer of 11 experts, in one file: names with 1 and 10, 2 and 10, to sort."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("eleven") / "m", shards=1, layers=1, experts=11)


def test_names_sort_expert_10_after_expert_2(eleven_experts):
    """names() and tensors() go layer by layer and expert by expert in number order, not string order."""
    checkpoint = open_hf(eleven_experts)
    experts = [name for name in checkpoint.names() if name.endswith(".w1.weight")]
    assert experts == [f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in range(11)]
    ours = [name for name, _ in checkpoint.tensors() if name.endswith(".w1")]
    assert ours == [f"layers.0.experts.{e}.w1" for e in range(11)]


def test_model_safetensors_is_read_alone_beside_other_safetensors(tmp_path):
    """Mistral's repos ship consolidated.safetensors (its own names) beside model.safetensors: only the latter is
    the transformers checkpoint, and the other file is never opened."""
    path = make_tiny_mixtral(tmp_path / "m", shards=1, layers=1)
    names = open_hf(path).names()
    save_file({"tok_embeddings.weight": torch.zeros(128, 64)}, path / "consolidated.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint = open_hf(path)
    assert checkpoint.names() == names and "tok_embeddings.weight" not in checkpoint.names()


def test_one_unused_tensor_is_named_in_the_singular(tmp_path):
    """A single tensor past the config's layers: "1 tensor", and it is left out of shapes()."""
    path = make_tiny_mixtral(tmp_path / "m", shards=1, layers=1)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.input_layernorm.weight"] = torch.ones(64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning) as warned:
        checkpoint = open_hf(path)
    assert [str(w.message) for w in warned] == [
        f"'{path}' holds 1 tensor that config.json does not call for, such as 'layers.1.input_norm': more layers "
        "than it says; they are left unused, as transformers leaves them (check that config.json is this "
        "checkpoint's own)"
    ]
    assert not any(name.startswith("layers.1.") for name in checkpoint.shapes())


# ---------------------------------------------------------------------------------------------------
# offload/convert.py


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir):
    """The tiny model written by quantize (unquantized weights: fast)."""
    out = tmp_path_factory.mktemp("q") / "model"
    return quantize_model(str(tiny_model_dir), out, expert_bits="none", attn_bits="none", device="cpu")


def test_a_quantized_folder_takes_no_attention_bits_either(quantized):
    """--attn-bits alone on a quantized folder is refused like --expert-bits: it would be silently ignored."""
    with pytest.raises(MoEOffloadError) as error:
        open_source(str(quantized), attn_bits="4")
    assert str(error.value) == (
        f"{quantized} is already quantized; --expert-bits and --attn-bits apply to Hugging Face folders only"
    )


def test_a_manifest_whose_expert_format_is_not_its_files_is_refused(quantized, tmp_path):
    """A manifest rewritten to another expert format (hashes cover the files, not the manifest) whose layout is
    consistent in itself: its experts are the wrong size, and the folder is refused before they are read as it."""
    folder = tmp_path / "model"
    shutil.copytree(quantized, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    c = manifest["config"]
    wrong = ExpertFormat.build(c["hidden_size"], c["intermediate_size"], EXPERT_PRESETS["2"], torch.float16)
    manifest["expert_format"] = wrong.to_dict()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoEOffloadError) as error:
        open_source(str(folder))
    assert str(error.value).startswith(
        f"corrupt manifest in {folder}: experts-000.safetensors holds no {wrong.nbytes}-byte expert 0, which the "
        "config and layout call for; "
    )


# ---------------------------------------------------------------------------------------------------
# offload/tokenizer.py


def test_a_boolean_eos_token_id_is_refused():
    """json's true is an int to Python, and id 1 to a careless check: generation_config.json's eos_token_id must
    be a real integer."""
    with pytest.raises(MoEOffloadError) as error:
        stop_ids(None, {"eos_token_id": [2, True]})
    assert str(error.value) == (
        "generation_config.json has eos_token_id [2, True]; it must be an integer or a list of integers"
    )


def test_the_mistral_v1_vocabulary_needs_its_own_eos(tmp_path):
    """The Mistral v1 pieces with another eos id are not the Mistral v1 vocabulary: no built-in chat format for
    them (its </s> would be the wrong token)."""
    shutil.copyfile(MISTRAL_V1_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = load_tokenizer(tmp_path)
    assert is_mistral_v1_vocab(tokenizer)
    tokenizer.eos_token = "<unk>"
    assert tokenizer.eos_token_id == 0 and not is_mistral_v1_vocab(tokenizer)


# ---------------------------------------------------------------------------------------------------
# offload/api.py


@pytest.mark.parametrize(("max_pos", "context"), [(8192, 4096), (2048, 2048)])
def test_the_default_context_is_the_models_at_most_4096(tmp_path, max_pos, context):
    """Without --max-seq-len the KV cache holds the model's positions, capped at 4096 (it is made whole)."""
    path = make_tiny_mixtral(tmp_path / "m", shards=1, layers=1, max_pos=max_pos)
    assert api.prepare(str(path), device="cpu").max_seq_len == context


def test_a_context_of_one_token_is_refused_and_the_models_own_is_not_warned_of(tiny_model_dir):
    """--max-seq-len 1 leaves no room for a token after the prompt; exactly the trained positions is no overreach."""
    with pytest.raises(MoEOffloadError) as error:
        api.prepare(str(tiny_model_dir), device="cpu", max_seq_len=1)
    assert str(error.value) == "--max-seq-len must be at least 2, got 1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api.prepare(str(tiny_model_dir), device="cpu", max_seq_len=256).max_seq_len == 256


# ---------------------------------------------------------------------------------------------------
# offload/bench.py


def test_swapped_copies_take_the_slower_direction():
    """In exclusive mode each load sends its victim back at the same time: the slower link sets the time."""
    assert Link(h2d=4e9, d2h=2e9).seconds(8e9) == 4.0 and Link(h2d=2e9, d2h=4e9).seconds(8e9) == 4.0
    assert Link(h2d=4e9).seconds(8e9) == 2.0


def test_compute_per_token_is_the_median_timed_step(monkeypatch):
    """One slow or one lucky step must not set the bound: the median of the timed steps, after the warm-up."""
    clock = iter([0, 9, 10, 10.5, 20, 20.125, 30, 30.25])  # each step's begin and end: 9 s, then 0.5, 0.125, 0.25
    monkeypatch.setattr(offload.bench.time, "perf_counter", lambda: next(clock))
    moe = SimpleNamespace(routing="model's", prefetcher="gate")
    model = SimpleNamespace(device=torch.device("cpu"), moe=moe, config=SimpleNamespace(top_k=2),
                            reset=lambda: None, forward=lambda ids, position: None)  # fmt: skip
    assert offload.bench.compute_per_token(model, tokens=3, warmup=1) == 0.25
    assert (moe.routing, moe.prefetcher) == ("model's", "gate")  # restored


def test_a_trace_naming_one_expert_too_many_is_refused():
    """A trace of 8 experts cannot replay on a model of 7: its expert 7 has no slot to load into."""
    with pytest.raises(MoEOffloadError) as error:
        ReplayedRouting(TINY_TRACE, num_layers=6, num_experts=7, top_k=2, device=torch.device("cpu"))
    assert str(error.value) == f"trace {TINY_TRACE} names expert 7; the model has 7"


def test_bench_reports_the_link_in_gigabytes_and_the_fastest_compute(monkeypatch, tiny_model_dir):
    """h2d_bandwidth_gbps is 10^9 bytes a second, and the bound takes the faster of the compute measurements."""
    model = offload.load(str(tiny_model_dir), device="cpu", slots=2, max_seq_len=64)
    monkeypatch.setattr(offload.bench, "copy_bandwidth", lambda nbytes, device, to_device=True: 2.5e9)
    measured = iter([0.004, 0.002])
    monkeypatch.setattr(offload.bench, "compute_per_token", lambda model: next(measured))
    result = bench(model, tokens=2, prompt_tokens=2, prefetch="none")
    assert result["h2d_bandwidth_gbps"] == 2.5 and result["d2h_bandwidth_gbps"] is None
    assert result["compute_s_per_token_measured"] == [0.004, 0.002] and result["compute_s_per_token"] == 0.002
    bound_s = max(0.002, result["missed_bytes_per_token"] / 2.5e9)
    assert result["bound_tokens_per_s"] == round(1 / bound_s, 4)


# ---------------------------------------------------------------------------------------------------
# offload/api.py (more)


def test_load_reports_every_expert_once_up_to_the_total(tiny_model_dir):
    """load's progress counts experts read, 0 before the first, then 1 to layers x experts (offload.convert.Progress):
    a bar that never reaches its end, or counts an expert twice, is wrong."""
    calls = []
    offload.load(str(tiny_model_dir), lambda *call: calls.append(call), device="cpu")
    assert calls == [("experts", n, 16) for n in range(17)]


@pytest.fixture(scope="module")
def chat_model(trained_model_dir):
    return offload.load(str(trained_model_dir), device="cpu", slots=3, max_seq_len=64)


def test_a_conversation_that_fills_the_context_is_refused_as_a_conversation(chat_model):
    """A conversation of exactly the context's tokens leaves no room for the reply: the chat's own message."""
    messages = [{"role": "user", "content": "def add(a, b):"}]
    length = len(chat_model.encode_chat(messages))
    chat_model.max_seq_len = length  # as a load with --max-seq-len of the conversation's length
    try:
        with pytest.raises(MoEOffloadError) as error:
            chat_model.generate(messages=messages, max_new_tokens=1)
    finally:
        chat_model.max_seq_len = 64
    assert str(error.value) == (
        f"the conversation is {length} tokens but the context holds {length}, which leaves no room for a reply; "
        "start a new one (chat: /reset), or load with a larger --max-seq-len"
    )


def test_the_same_conversation_again_prefills_its_last_token(chat_model):
    """Asked the same conversation twice, the KV cache holds all of it: the last token is fed again, for its
    logits, and the reply is the same."""
    messages = [{"role": "user", "content": "def add(a, b):"}]
    first = chat_model.generate(messages=messages, max_new_tokens=4, temperature=0)
    again = chat_model.generate(messages=messages, max_new_tokens=4, temperature=0)
    assert again.prefill_tokens == 1 and again.token_ids == first.token_ids
