"""The command line: what users see, including every bad input (one line, exit code 2, no traceback)."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import offload
from cli.app import main
from offload.convert import quantize_model
from quant import cpu_gemv
from quant.errors import MoEOffloadError
from tests.tiny import make_tiny_mixtral

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == [f"error: {expected}"], lines


# -- bad input ------------------------------------------------------------------------------------------


def test_missing_path(capsys):
    code, _, err = run(capsys, "generate", "/no/such/model", "--prompt", "hi")
    assert_one_line_error(
        code, err, "no such folder: '/no/such/model'; pass a Hugging Face folder or a hub id (owner/name)"
    )


def test_config_that_is_not_moe(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = run(capsys, "info", tmp_path)
    assert_one_line_error(code, err, "model_type 'llama' is not a Mixture-of-Experts model; moe-offload runs: mixtral")


def test_unsupported_model_type_names_the_supported_ones(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 60}))
    code, _, err = run(capsys, "generate", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "model_type 'qwen2_moe' is not supported; moe-offload runs: mixtral")


@pytest.fixture(scope="module")
def quantized_source(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("src"), intermediate=128, layers=2, experts=4, seed=5)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, quantized_source) -> Path:
    return quantize_model(str(quantized_source), tmp_path_factory.mktemp("q") / "model", expert_bits="4", attn_bits="4")


def test_corrupt_manifest(capsys, quantized, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in quantized.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "manifest.json").write_text('{"format_version": 1, "files": ')
    code, _, err = run(capsys, "generate", broken, "--prompt", "hi")
    assert_one_line_error(
        code, err, f"{broken / 'manifest.json'} is a corrupt manifest (not valid JSON); "
        "re-run `moe-offload quantize` with --force"
    )  # fmt: skip


@pytest.mark.parametrize(
    "alter, problem",
    [
        (
            lambda m: m["config"].update(num_layers=3),
            "the config has 3 layers, but experts-002.safetensors is not listed",
        ),
        (
            lambda m: m["expert_format"]["layout"].update(nbytes=999),
            "expert_format's layout does not follow from its sizes and quantization",
        ),
        (lambda m: m["config"].update(hidden_size=96), "expert_format's sizes differ from the config's"),
        (
            lambda m: m["config"].update(num_experts=5),
            "experts-000.safetensors holds no {nbytes}-byte expert 4, which the config and layout call for",
        ),
        (lambda m: m["files"].pop("resident.safetensors"), "resident.safetensors is not listed"),  # was a KeyError
        (  # was a RuntimeError in the plan's dequantization, or with another shape one in the first forward
            lambda m: m["resident"]["quantized"]["layers.0.q_proj"].update(shape=[128, 64]),
            "it lists layers.0.q_proj with shape (128, 64), but the config gives it (64, 64)",
        ),
        (
            lambda m: m["resident"]["quantized"].update({"layers.9.q_proj": {"shape": [64, 64]}}),
            "it lists a quantized weight layers.9.q_proj, which the config has no place for",
        ),
    ],
    ids=["layers", "layout", "sizes", "experts", "resident", "shape", "unknown"],
)
def test_a_manifest_that_disagrees_with_itself_or_its_files(capsys, quantized, tmp_path, alter, problem):
    """The hashes cover the files, not the manifest: a manifest edited by hand is checked for agreement, where
    it used to fail mid-load with a KeyError or a bad view."""
    edited = tmp_path / "edited"
    edited.mkdir()
    for file in quantized.iterdir():
        (edited / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((edited / "manifest.json").read_text())
    alter(manifest)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "generate", edited, "--prompt", "hi", "--device", "cpu")
    nbytes = manifest["expert_format"]["layout"]["nbytes"]
    assert_one_line_error(
        code, err, f"corrupt manifest in {edited}: {problem.format(nbytes=nbytes)}; re-run `moe-offload quantize` "
        "with --force"
    )  # fmt: skip


def test_an_altered_expert_file_is_refused_unless_no_verify(capsys, quantized, tmp_path):
    altered = tmp_path / "altered"
    altered.mkdir()
    for file in quantized.iterdir():
        (altered / file.name).write_bytes(file.read_bytes())
    expert_file = sorted(altered.glob("experts-*.safetensors"))[0]
    data = bytearray(expert_file.read_bytes())
    data[-1] ^= 0x01  # a code's bits: the sizes still agree
    expert_file.write_bytes(bytes(data))
    code, _, err = run(capsys, "info", altered, "--device", "cpu")
    assert_one_line_error(
        code, err, f"{expert_file} is altered or corrupt: its sha256 differs from manifest.json; re-run "
        "`moe-offload quantize` with --force"
    )  # fmt: skip
    code, out, _ = run(capsys, "info", altered, "--device", "cpu", "--no-verify", "--json")
    assert code == 0 and json.loads(out)["family"] == "mixtral"


def test_a_quantized_folder_without_its_manifest_or_quantized_again(capsys, quantized, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in quantized.iterdir():
        if file.name != "manifest.json":
            (bare / file.name).write_bytes(file.read_bytes())
    code, _, err = run(capsys, "generate", bare, "--prompt", "hi")
    assert_one_line_error(
        code, err, f"{bare} holds a quantized folder's files but no manifest.json, which is written last: the "
        "folder is incomplete or damaged; delete it, then quantize or synth again"
    )  # fmt: skip
    code, _, again = run(capsys, "quantize", bare, tmp_path / "again")
    assert again == err
    code, _, err = run(capsys, "quantize", quantized, tmp_path / "again")
    assert_one_line_error(
        code, err, f"{quantized} is already a quantized folder; quantize reads a Hugging Face folder (use this one "
        "as it is)"
    )  # fmt: skip
    assert not (tmp_path / "again").exists()


def test_demo_and_context_options_are_checked_first(capsys, quantized):
    # before minutes of writing and quantizing, with nothing printed but the error
    slots = "--slots must be between 1 and 8 (the experts per layer), got {}"
    for option, value, expected in (("--slots", "0", slots.format(0)), ("--slots", "99", slots.format(99)),
                                    ("--tokens", "-1", "--tokens must be at least 1, got -1")):  # fmt: skip
        code, _, err = run(capsys, "demo", option, value)
        assert_one_line_error(code, err, expected)
    code, _, err = run(capsys, "info", quantized, "--device", "cpu", "--max-seq-len", "0")  # 0 is not "the default"
    assert_one_line_error(code, err, "--max-seq-len must be at least 2, got 0")
    code, _, err = run(capsys, "info", quantized, "--device", "cpu", "--max-seq-len", "100000")  # allowed, but said
    assert code == 0 and err.splitlines() == [
        "warning: a context of 100000 tokens (--max-seq-len) is beyond the 256 "
        "positions this model was trained for; what it writes past them is "
        "likely nonsense"
    ]
    code, _, err = run(capsys, "info", quantized, "--device", "cpu", "--gpu-memory", "12GiB")  # not silently ignored
    assert_one_line_error(code, err, "--gpu-memory is a GPU's budget, and this runs on the CPU, where everything is "
                          "in RAM: give --cpu-memory")  # fmt: skip


def test_cache_options_without_slots_on_the_cpu_are_said_to_do_nothing(capsys, quantized):
    code, out, err = run(capsys, "info", quantized, "--device", "cpu", "--json", "--policy", "path", "--prefetch",
                         "both")  # fmt: skip
    assert code == 0 and json.loads(out)["prefetch"] == "none"
    assert err.splitlines() == [
        "warning: --policy path and --prefetch both do nothing here: without --slots the CPU computes experts "
        "in place, with no cache; --slots K routes them through K slots a layer"
    ]
    for quiet in (["--prefetch", "none"], ["--policy", "lru"], ["--slots", "2", "--policy", "path"]):
        code, _, err = run(capsys, "info", quantized, "--device", "cpu", *quiet)
        assert code == 0 and "warning" not in err, quiet


def test_prompt_longer_than_the_context(capsys, trained_model_dir):
    code, _, err = run(capsys, "generate", trained_model_dir, "--prompt", "x = 1\n" * 20, "--max-seq-len", "16")
    assert_one_line_error(
        code, err, "the prompt is 101 tokens but the context holds 16, which leaves no room for a new token; "
        "shorten it to at most 15 tokens"
    )  # fmt: skip


def files_under(folder: Path) -> list[str]:
    """Every file and folder under `folder`, hidden ones (a temporary file) included, relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_trace_checks_every_prompt_before_the_first_and_writes_nothing(capsys, trained_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n" + "x = 1 " * 20 + "\n")
    out = tmp_path / "traces" / "t.jsonl"
    code, _, err = run(capsys, "trace", trained_model_dir, "--prompts", prompts, "--out", out, "--max-seq-len", "16")
    assert_one_line_error(
        code, err, "prompt 2 is 82 tokens but the context holds 16, which leaves no room for a new token; "
        "shorten it to at most 15 tokens"
    )  # fmt: skip
    assert files_under(tmp_path) == ["prompts.txt"]
    prompts.write_bytes(b"\xff\xfe")
    code, _, err = run(capsys, "trace", "no-such-model", "--prompts", prompts, "--out", out)
    assert_one_line_error(code, err, f"{prompts} is not UTF-8 text; write one prompt per line")


def test_trace_prompt_options(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n")
    cases = {  # all before the load: the model does not exist
        ("--prompt", "hi", "--prompts", prompts, "--out", tmp_path / "t.jsonl"):
            "give --prompt TEXT or --prompts FILE (one prompt per line), not both",
        ("--out", tmp_path / "t.jsonl"): "give --prompt TEXT or --prompts FILE (one prompt per line)",
        ("--prompts", tmp_path, "--out", tmp_path / "t.jsonl"):
            f"--prompts {tmp_path} is a folder; give a text file with one prompt per line",
        ("--prompts", prompts, "--out", tmp_path / "." / "prompts.txt"):  # it was overwritten by the trace
            f"--out {tmp_path / 'prompts.txt'} is the prompts file, which it would overwrite; give another file name",
    }  # fmt: skip
    for args, message in cases.items():
        code, _, err = run(capsys, "trace", "no-such-model", *args)
        assert_one_line_error(code, err, message)
    assert files_under(tmp_path) == ["prompts.txt"] and prompts.read_text() == "def f():\n"


def test_trace_interrupted_leaves_no_file(monkeypatch, capsys, trained_model_dir, tmp_path):
    """Ctrl-C (or any error) while generating drops the temporary file: nothing under --out, nothing hidden."""
    from offload.api import OffloadedModel

    generate = OffloadedModel.generate

    def interrupted(self, *args, **kwargs):
        generate(self, *args, **kwargs)  # the first prompt's rows are written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(OffloadedModel, "generate", interrupted)
    code, _, err = run(capsys, "trace", trained_model_dir, "--prompt", "def f():", "--out", tmp_path / "t.jsonl",
                       "--max-new-tokens", "2")  # fmt: skip
    assert code == 130  # typer's exit code for Ctrl-C
    assert files_under(tmp_path) == []


def test_outputs_that_cannot_be_written_fail_before_the_work(monkeypatch, capsys, quantized, tmp_path):
    """A folder, or a path through a file, as --out, --json or --plot: one line before anything is loaded or
    simulated, where it used to be a traceback after the work (and a temporary file left behind)."""
    import cli.app
    import cli.lab

    def never(*args, **kwargs):
        raise AssertionError("the output should have been checked first")

    monkeypatch.setattr(cli.app, "_load", never)
    monkeypatch.setattr(cli.lab, "simulate", never)
    folder, file = tmp_path / "outdir", tmp_path / "afile"
    folder.mkdir()
    file.write_text("mine")
    trace = REPO / "benchmarks" / "traces" / "tiny-mixtral-code_stdlib.jsonl"
    commands = {
        "--out": ("trace", quantized, "--prompt", "hi", "--out"),
        "--json": ("bench", quantized, "--tokens", "2", "--json"),
        "--plot": ("simulate", trace, "--slots", "2", "--plot"),
    }
    for option, command in commands.items():
        code, _, err = run(capsys, *command, folder)
        assert_one_line_error(code, err, f"{option} {folder} is a folder; give a file name")
        code, _, err = run(capsys, *command, file / "x")
        assert_one_line_error(code, err, f"{option} {file / 'x'}: {file} is a file, not a folder")
    assert files_under(tmp_path) == ["afile", "outdir"]


def test_out_that_already_holds_files_needs_force(capsys, quantized_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    src = quantized_source
    code, _, err = run(capsys, "quantize", src, out)
    assert_one_line_error(
        code, err, f"{out} is not empty and is not an unfinished run of this job; "
        "pass --force to overwrite it, or choose another OUT"
    )  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"  # nothing was touched


def test_quantize_takes_a_hub_ids_revision_and_refuses_one_for_a_folder(
    capsys, monkeypatch, quantized_source, tmp_path
):
    import huggingface_hub

    src = quantized_source
    snapshot = tmp_path / "snapshots" / "0123abcd"  # the hub cache names a snapshot by its commit
    shutil.copytree(src, snapshot)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(kw) or str(snapshot))
    code, _, _ = run(capsys, "quantize", "owner/tiny-moe", tmp_path / "q", "--revision", "v1", "--device", "cpu")
    assert code == 0 and {kw["revision"] for kw in asked} == {"v1"}
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["source"] == {"model": "owner/tiny-moe", "revision": "0123abcd"}
    code, _, err = run(capsys, "quantize", src, tmp_path / "q2", "--revision", "v1")
    assert_one_line_error(code, err, f"--revision 'v1' applies to hub ids, but '{src}' is a folder")
    assert not (tmp_path / "q2").exists()


def test_bench_json_refuses_to_overwrite_the_model_or_the_trace(capsys, quantized, tmp_path):
    """Both were overwritten, and the model's manifest with them: the folder no longer loaded."""
    model = tmp_path / "model"
    shutil.copytree(quantized, model)
    trace = tmp_path / "t.jsonl"
    trace.write_text("{}\n")
    manifest = (model / "manifest.json").read_bytes()
    code, _, err = run(capsys, "bench", model, "--json", model / "manifest.json")
    assert_one_line_error(code, err, f"--json {model / 'manifest.json'} is a file of the model ({model}), which it "
                          "would overwrite; give another file name")  # fmt: skip
    code, _, err = run(capsys, "bench", model, "--route-trace", trace, "--json", trace)
    assert_one_line_error(code, err, f"--json {trace} is the trace being replayed, which it would overwrite; give "
                          "another file name")  # fmt: skip
    assert (model / "manifest.json").read_bytes() == manifest and trace.read_text() == "{}\n"


def test_slots_and_memory_that_cannot_fit(capsys, quantized):
    code, _, err = run(capsys, "generate", quantized, "--prompt", "hi", "--slots", "9", "--device", "cpu")
    assert_one_line_error(code, err, "--slots must be between 1 and 4 (the experts per layer), got 9")
    code, _, err = run(capsys, "info", quantized, "--cpu-memory", "100KiB", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the model needs ") and ") and 100.0 KiB is available; lower --max-seq-len" in err


def test_prefetch_ahead_out_of_reach(capsys, trained_model_dir):
    model = trained_model_dir
    code, _, err = run(capsys, "generate", model, "--prompt", "hi", "--slots", "2", "--prefetch-ahead", "6")
    assert_one_line_error(code, err, "--prefetch-ahead must be between 1 and 5 (the layers but one), got 6")
    for none in (["--prefetch", "early"], ["--prefetch", "none"], ["--no-prefetch"]):  # none was taken silently
        code, _, err = run(capsys, "info", model, *none, "--prefetch-ahead", "2")
        assert_one_line_error(code, err, "--prefetch-ahead 2 guesses at each layer's output: use --prefetch late or "
                              "both")  # fmt: skip
    code, out, _ = run(capsys, "info", model, "--json", "--slots", "2", "--prefetch-ahead", "2")
    assert code == 0 and (json.loads(out)["prefetch"], json.loads(out)["prefetch_ahead"]) == ("late", 2)


def test_no_prefetch_against_an_explicit_prefetch(capsys, trained_model_dir):
    model = trained_model_dir  # both given: this was none, silently
    code, _, err = run(capsys, "info", model, "--slots", "2", "--prefetch", "both", "--no-prefetch")
    assert_one_line_error(code, err, "--no-prefetch and --prefetch both disagree: give one of them")
    for agreeing in (["--no-prefetch"], ["--prefetch", "none", "--no-prefetch"]):
        code, out, _ = run(capsys, "info", model, "--json", "--slots", "2", *agreeing)
        assert code == 0 and json.loads(out)["prefetch"] == "none"


def test_the_cpus_fused_kernel_and_where_it_cannot_be_built(capsys, quantized, monkeypatch):
    if cpu_gemv.available():  # a machine with a C compiler
        code, out, _ = run(capsys, "info", quantized, "--device", "cpu", "--json")
        assert code == 0 and json.loads(out)["kernel"] == "fused dequantize+GEMV (C)"
    code, out, _ = run(capsys, "info", quantized, "--device", "cpu", "--json", "--no-fused-gemv")
    assert code == 0 and json.loads(out)["kernel"] == "dequantize in tiles, then matmul"

    def no_compiler():
        raise cpu_gemv.KernelUnavailable("no C compiler found (looked for cc, gcc and clang)")

    monkeypatch.setattr(cpu_gemv, "library", no_compiler)
    code, _, err = run(capsys, "info", quantized, "--device", "cpu", "--fused-gemv")
    assert_one_line_error(
        code, err, "--fused-gemv on the CPU builds a C kernel, and could not: no C compiler found (looked for cc, "
        "gcc and clang)",
    )  # fmt: skip
    code, out, err = run(capsys, "info", quantized, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["kernel"] == "dequantize in tiles, then matmul"
    assert err.splitlines() == [  # one line, as an error is
        "warning: decode dequantizes each expert, several times slower than the CPU's fused kernel: no C compiler "
        "found (looked for cc, gcc and clang)"
    ]


def test_cuda_graphs_where_they_cannot_run(capsys, quantized):
    code, _, err = run(capsys, "bench", quantized, "--device", "cpu", "--cuda-graphs")
    assert_one_line_error(code, err, "--cuda-graphs runs on CUDA only; on the CPU every kernel is called from Python")
    code, out, _ = run(capsys, "info", quantized, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["cuda_graphs"] is False


def test_host_embedding_where_it_cannot_run(capsys, quantized):
    code, _, err = run(capsys, "chat", quantized, "--device", "cpu", "--host-embedding")
    assert_one_line_error(code, err, "--host-embedding runs on CUDA only; on the CPU the table is in RAM already")
    code, out, _ = run(capsys, "info", quantized, "--device", "cpu", "--json", "--no-host-embedding")
    assert code == 0 and json.loads(out)["host_embedding"] is False


def test_meta_rows_where_no_kernel_reads_them(capsys, quantized):
    """--meta-rows is the GPU kernel's layout: every command that loads refuses it on the CPU, which holds its experts
    by output; --no-meta-rows is taken, and `info --json` says the order the experts are held in (this 4-bit model's
    float meta has none but grid's)."""
    for command in ("bench", "chat", "info"):
        code, _, err = run(capsys, command, quantized, "--device", "cpu", "--meta-rows")
        assert_one_line_error(code, err, "--meta-rows lays experts out for the GPU's kernel; on the CPU their scales "
                                         "and zeros lie by output, for the CPU's own loop")  # fmt: skip
    code, out, _ = run(capsys, "info", quantized, "--device", "cpu", "--json", "--no-meta-rows")
    assert code == 0 and json.loads(out)["meta_order"] == "grid"


# -- what a user runs --------------------------------------------------------------------------------------


def test_generate_json_reports_text_ids_and_recall(capsys, trained_model_dir):
    code, out, _ = run(
        capsys, "generate", trained_model_dir, "--prompt", "def fibonacci(n):\n", "--max-new-tokens", "16",
        "--temperature", "0", "--slots", "4", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)  # stdout holds the JSON object and nothing else
    assert result["text"].startswith('    """Return a list of the current file.')  # the model card's
    assert len(result["token_ids"]) == 16
    stats = result["stats"]
    assert len(stats["per_layer"]) == 6
    assert stats["hits"] + stats["misses"] == stats["requests"]
    assert stats["decode_tokens"] == 15  # the first new token comes from the prefill
    # the early guess corrected at each layer's output: the trained model's README measures 0.83 late
    assert 0.7 < stats["recall"] < 0.95
    assert stats["prefetches_issued"] > 0 and stats["per_layer"][0]["recall"] is None  # nothing guesses layer 0


def test_chat_session_streams_and_answers_commands(capsys, monkeypatch, trained_model_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\n/stats\n/reset\n/exit\n"))
    code, out, err = run(capsys, "chat", trained_model_dir, "--max-new-tokens", "8", "--temperature", "0",
                         "--slots", "3", "--device", "cpu")  # fmt: skip
    assert code == 0
    assert out.strip()  # the streamed answer
    assert "hit rate" in err and "prefetch recall" in err  # /stats
    assert "(conversation and figures reset)" in err


@pytest.mark.parametrize("command", [["chat"], ["generate", "--prompt", "hi"], ["trace", "--prompt", "hi"]])
def test_text_commands_refuse_a_folder_without_a_tokenizer_before_loading_experts(
    capsys, monkeypatch, quantized, tmp_path, command
):
    monkeypatch.setattr("offload.api.ExpertCache", lambda **_: pytest.fail("experts loaded before the check"))
    extra = ["--out", tmp_path / "t.jsonl"] if command[0] == "trace" else []
    code, _, err = run(capsys, *command[:1], quantized, *command[1:], *extra, "--device", "cpu")
    assert_one_line_error(code, err, f"{quantized} has no tokenizer files (none of tokenizer.json, tokenizer.model, "
                          "vocab.json, spiece.model); copy them from the original model folder")  # fmt: skip


def test_chat_refuses_a_tokenizer_without_a_chat_template_before_loading_experts(
    capsys, monkeypatch, quantized, tmp_path
):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "base"
    shutil.copytree(quantized, folder)
    backend = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    base = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    base.save_pretrained(folder)
    monkeypatch.setattr("offload.api.ExpertCache", lambda **_: pytest.fail("experts loaded before the check"))
    code, _, err = run(capsys, "chat", folder, "--device", "cpu")
    assert_one_line_error(code, err, "this model's tokenizer has no chat template (it is likely a base model); "
                          "use `moe-offload generate --prompt TEXT` to continue plain text")  # fmt: skip


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(capsys, quantized, tmp_path):
    """Another model's tokenizer beside the weights: its ids indexed past the embedding (an IndexError traceback;
    on CUDA a device-side assert, after which the process cannot use the GPU)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "other-tokenizer"
    shutil.copytree(quantized, folder)
    backend = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "far": 300}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(folder)
    refused = (f"the tokenizer gave token id 300, but this model's vocabulary is 128 tokens (0 to 127): the "
               f"tokenizer files in {folder} belong to another model")  # fmt: skip
    code, _, err = run(capsys, "generate", folder, "--prompt", "far", "--device", "cpu")
    assert_one_line_error(code, err, refused)
    model = offload.load(str(folder), device="cpu")
    with pytest.raises(MoEOffloadError) as error:
        model.generate(messages=[{"role": "user", "content": "far"}])
    assert str(error.value) == refused
    # ids the model has still run: a prefill, then one token, or the end of text, which a sample at the default
    # temperature may draw on this random model (a clean-clone CI run at a89e7ff did)
    result = model.generate("hi", max_new_tokens=1)
    assert result.prefill_tokens == 1 and len(result.token_ids) + (result.stop_reason == "eos") == 1


@pytest.mark.parametrize("command", [["generate"], ["trace", "--out", "t.jsonl"]])
def test_a_prompt_that_is_not_utf8_is_refused_before_the_load(capsys, monkeypatch, tmp_path, command):
    monkeypatch.chdir(tmp_path)  # a shell passes bytes that are not UTF-8 as lone surrogates
    code, _, err = run(capsys, command[0], "/no/such/model", "--prompt", "caf\udce9", *command[1:])
    assert_one_line_error(code, err, "the prompt is not valid UTF-8 text: the byte 0xe9 at character 3")


class Keyboard:
    """stdin for chat: lines, of which a bytes item is one that is not UTF-8 (input() raises on it)."""

    def __init__(self, *lines: str | bytes) -> None:
        self.lines = list(lines)

    def readline(self) -> str:
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        if isinstance(line, bytes):
            raise UnicodeDecodeError("utf-8", line, 0, 1, "invalid start byte")
        return line + "\n"


def test_chat_goes_on_after_ctrl_c_a_full_context_and_a_line_that_is_not_utf8(capsys, monkeypatch, trained_model_dir):
    from offload import api
    from offload.api import OffloadedModel

    tokenizers = []  # the one prepare loads to check that the model can chat is the one the chat uses
    monkeypatch.setattr(api, "load_tokenizer", lambda folder, real=api.load_tokenizer: tokenizers.append(folder)
                        or real(folder))  # fmt: skip

    asked, real = [], OffloadedModel.generate

    def generate(self, *args, messages, on_text, **kwargs):
        asked.append([m["content"] for m in messages])
        if len(asked) == 1:  # Ctrl-C as the first reply streams
            on_text = ctrl_c_at_the_first_piece(on_text)
        return real(self, *args, messages=messages, on_text=on_text, **kwargs)

    monkeypatch.setattr(OffloadedModel, "generate", generate)
    monkeypatch.setattr("sys.stdin", Keyboard("def add(a, b):", b"\xff", "def sub(a, b):", "Now mul.", "/exit"))
    code, out, err = run(capsys, "chat", trained_model_dir, "--max-new-tokens", "20", "--temperature", "0",
                         "--max-seq-len", "40", "--device", "cpu")  # fmt: skip
    assert code == 0 and len(tokenizers) == 1
    # the stopped turn is not in the conversation; the full one is refused and dropped, and chat goes on
    assert asked == [["def add(a, b):"], ["def sub(a, b):"], ["def sub(a, b):", asked[2][1], "Now mul."]]
    lines = err.splitlines()
    assert "(stopped)" in lines and "error: that line is not UTF-8 text" in lines
    full = [line for line in lines if line.startswith("error: the conversation is ")]
    assert len(full) == 1 and full[0].endswith(
        "but the context holds 40, which leaves no room for a reply; start "
        "a new one (chat: /reset), or load with a larger --max-seq-len"
    )


def ctrl_c_at_the_first_piece(on_text, presses: int = 1):
    """on_text, with SIGINT sent to this process `presses` times as the first piece of text streams."""
    pieces = []

    def stream(piece: str) -> None:
        if not pieces:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        pieces.append(piece)
        on_text(piece)

    return stream


@pytest.mark.parametrize("as_json", [False, True])
def test_generate_stopped_by_ctrl_c_prints_the_figures_and_exits_130(capsys, monkeypatch, trained_model_dir, as_json):
    """Ctrl-C in the middle of a decode step stops the generation after that step, where the cache's state is
    whole, not inside it."""
    from offload.api import OffloadedModel

    real, started, finished = OffloadedModel.forward, [], []

    def forward(self, *args, **kwargs):
        started.append(self.decode_step)
        if len(started) == 3:  # the second decode step
            os.kill(os.getpid(), signal.SIGINT)
        logits = real(self, *args, **kwargs)
        finished.append(self.decode_step)
        return logits

    monkeypatch.setattr(OffloadedModel, "forward", forward)
    code, out, err = run(capsys, "generate", trained_model_dir, "--prompt", "def f(x):", "--stats", "--device", "cpu",
                         "--max-new-tokens", "64", *(["--json"] if as_json else []))  # fmt: skip
    assert code == 130 and "Traceback" not in err and err.splitlines()[0] == "(stopped)"
    assert len(finished) == len(started) == 3  # the step that got the signal ran to its end, and no other after it
    if as_json:  # the figures of what ran, timing included
        stats = json.loads(out)["stats"]
        assert stats["decode_tokens"] == 2 and stats["decode_tokens_per_s"] > 0  # before: 0, the run never added
    else:  # in place (no --slots): every request would count as a hit, so no hit rate is shown
        assert "decode 2 tok at " in err and "hit rate" not in err
        assert err.splitlines()[1].endswith(" · experts computed in place: no cache to count (--slots K routes them "
                                            "through K slots a layer)")  # fmt: skip
        assert len(err.splitlines()) == 2  # and no table of layers


def test_a_second_ctrl_c_interrupts_at_once(capsys, monkeypatch, trained_model_dir):
    from offload.api import OffloadedModel

    real = OffloadedModel.generate
    monkeypatch.setattr(OffloadedModel, "generate", lambda self, *args, on_text, **kwargs: real(
        self, *args, on_text=ctrl_c_at_the_first_piece(on_text, presses=2), **kwargs))  # fmt: skip
    code, _, err = run(capsys, "generate", trained_model_dir, "--prompt", "def f(x):", "--device", "cpu")
    assert code == 130 and "(stopped)" not in err and "Traceback" not in err  # click's own Ctrl-C: the command ends


def test_info_plans_without_loading(capsys, quantized):
    code, out, _ = run(capsys, "info", quantized, "--slots", "2", "--device", "cpu", "--json")
    facts = json.loads(out)
    assert code == 0
    assert (facts["family"], facts["mode"], facts["slots_per_layer"]) == ("mixtral", "inclusive", [2, 2])
    assert facts["experts"].startswith("4-bit") and facts["attention"].startswith("4-bit")
    # for a script: numbers, and bytes that add up (it printed "slots per layer": "2", "arena (host)": "1.7 MiB of ...")
    assert facts["num_layers"] == len(facts["slots_per_layer"]) == 2 and facts["num_experts"] == 4
    assert facts["host_bytes"] == 2 * 4 * facts["expert_bytes"] and facts["host_budget_bytes"] > facts["host_bytes"]
    assert all(isinstance(facts[k], int) for k in ("expert_bytes", "device_bytes", "max_seq_len", "prefill_chunk"))
    # the plan of another cache mode, as generate would load it
    code, out, _ = run(capsys, "info", quantized, "--slots", "2", "--device", "cpu", "--json",
                       "--cache-mode", "exclusive")  # fmt: skip
    assert code == 0 and json.loads(out)["mode"] == "exclusive"


def test_quantize_killed_midway_resumes_to_identical_files(capsys, tmp_path, monkeypatch):
    src = make_tiny_mixtral(tmp_path / "src", hidden=128, intermediate=256, layers=8, experts=8, seed=9)
    clean = tmp_path / "clean"
    assert run(capsys, "quantize", src, clean)[0] == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.app", "quantize", str(src), str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "experts-001.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    code, _, err = run(capsys, "info", killed)
    assert_one_line_error(code, err, f"{killed} is an unfinished quantize or synth run; run the same command again "
                          "to finish it")  # fmt: skip

    monkeypatch.chdir(tmp_path)  # the resume names SRC another way: the job is the folder, not its spelling
    code, _, err = run(capsys, "quantize", "src/", killed)
    assert code == 0, err
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in killed.iterdir())  # no journal, no temporary files left
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
        assert (killed / name).stat().st_mode & 0o044 == 0o044, f"{name} is not readable by others"


def test_quantize_resumes_a_run_whose_journal_names_src_as_typed(capsys, tmp_path, monkeypatch):
    """Journals written before jobs named a local SRC by its resolved path hold the path as it was typed."""
    src = make_tiny_mixtral(tmp_path / "src", hidden=64, intermediate=128, layers=2, experts=4, seed=3)
    out = tmp_path / "out"

    def stop_after_a_layer(what, done, total):
        if done:
            raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        quantize_model("src", out, progress=stop_after_a_layer)
    journal = json.loads((out / ".quantize-journal.json").read_text())
    assert journal["job"]["source"] == str(src.resolve()) and list(journal["files"]) == ["experts-000.safetensors"]
    journal["job"]["source"] = "src"  # as the older version wrote it
    (out / ".quantize-journal.json").write_text(json.dumps(journal))
    done = []
    quantize_model("src", out, progress=lambda *report: done.append(report))
    assert (out / "manifest.json").is_file() and done == [("layers", 0, 3), ("layers", 1, 3), ("layers", 2, 3),
                                                           ("resident", 3, 3)]  # fmt: skip
    code, _, err = run(capsys, "quantize", "src", tmp_path / "other")  # and a new run keys the resolved path
    assert code == 0, err


def test_quantize_refuses_an_attention_it_cannot_take_before_the_experts(capsys, tmp_path):
    """k_proj [48, 96] takes no 4-bit g64: said before the first expert (hours on a CPU), with what works."""
    src = make_tiny_mixtral(tmp_path / "src", hidden=96, intermediate=128, layers=2, experts=4, seed=1)
    code, _, err = run(capsys, "quantize", src, tmp_path / "out")
    assert_one_line_error(code, err, "layers.0.k_proj: cannot quantize a weight of shape (48, 96) at 4-bit g64: its "
                          "input size 96 is not a multiple of group size 64; pass another --attn-bits (none: "
                          "unquantized) or --attn-quant")  # fmt: skip
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "generate", src, "--attn-bits", "4", "--device", "cpu", "--prompt", "hi")
    assert code == 2 and "layers.0.k_proj: cannot quantize" in err  # an in-memory load refuses it alike
    assert run(capsys, "quantize", src, tmp_path / "out", "--attn-quant", "bnb")[0] == 0


def test_demo_runs_the_whole_path_exactly(capsys):
    code, out, _ = run(capsys, "demo", "--tokens", "8")
    assert code == 0
    exact = next(line for line in out.splitlines() if "unquantized: max |logit diff|" in line)
    assert float(exact.rsplit(" ", 1)[1]) < 1e-4
    four_bit = re.search(r"4-bit experts and attention: max \|logit diff\| ([\d.]+) of logits up to ([\d.]+); the same "
                         r"top token at (\d+) of 12 positions$", out, re.MULTILINE)  # fmt: skip
    assert four_bit and float(four_bit[1]) < float(four_bit[2]) / 2 and int(four_bit[3]) >= 6
    assert "hit rate" in out and "generated ids: [" in out


def test_bench_and_trace_name_uneven_slots_whole():
    from cli.app import _slots_phrase

    assert _slots_phrase([5] * 32) == "5 slots per layer"
    assert _slots_phrase([6, 6] + [5] * 30) == "slots: 6 in layers 0-1, 5 in layers 2-31 (162 in all)"


def test_bench_says_its_own_defaults_in_help(capsys, monkeypatch):
    """bench shares the load options, but not two of their defaults: on the CPU --slots runs the cache (without
    it, direct mode), and the context is what the run needs."""
    monkeypatch.setenv("COLUMNS", "400")  # one line an option
    help_of = {}
    for command in ("bench", "generate"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        help_of[command] = " ".join(out.split())
    assert "Default: what the run needs (the prompt, 2 warm-up steps, --tokens and one more)" in help_of["bench"]
    assert "without them bench times direct mode, every expert computed in place" in help_of["bench"]
    assert "Default: the model's, at most 4096" in help_of["generate"]
    assert "on the CPU the default computes experts in place" in help_of["generate"]


def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback(monkeypatch):
    """The console script imports the app (and torch, seconds) inside main, where a KeyboardInterrupt is caught."""
    import importlib.abc

    import cli

    class CtrlC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cli.app":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "cli.app")
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    assert cli.main(["--help"]) == 130


RAW = "\tif x:\n\t\tprint(':smile: [red]hi[/red]')\r\n"  # tabs, an emoji code, markup and a carriage return


def _generate_raw(monkeypatch, *, stop_reason="length", token_ids=(5, 6)):
    """OffloadedModel.generate as a stand-in that streams RAW and returns its result."""
    from offload.api import OffloadedModel
    from offload.generate import GenerationResult

    def generate(self, prompt=None, *, messages=None, on_text=None, **_):
        if on_text is not None:
            on_text(RAW)
        return GenerationResult(list(token_ids), RAW, 1, 1, 0.1, 0.1, stop_reason)

    monkeypatch.setattr(OffloadedModel, "generate", generate)


def test_generated_text_streams_as_it_is(capsys, monkeypatch, trained_model_dir):
    """rich expanded the tabs to spaces, made :smile: an emoji and dropped the \\r: code came out altered."""
    _generate_raw(monkeypatch)
    code, out, err = run(capsys, "generate", trained_model_dir, "--prompt", "x", "--max-new-tokens", "2")
    assert code == 0 and out == RAW + "\n" and err == ""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    code, out, _ = run(capsys, "chat", trained_model_dir, "--max-new-tokens", "2")
    assert code == 0 and out == "> " + RAW + "\n> "


def test_a_full_context_is_told_apart_from_max_new_tokens(capsys, monkeypatch, trained_model_dir):
    _generate_raw(monkeypatch)  # two tokens, stopped for "length"
    code, out, err = run(capsys, "generate", trained_model_dir, "--prompt", "x", "--max-new-tokens", "5",
                         "--max-seq-len", "8", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["stop_reason"] == "length"
    assert err == "(the context of 8 tokens is full after 2 new tokens; raise --max-seq-len for more)\n"
    code, out, err = run(capsys, "generate", trained_model_dir, "--prompt", "x", "--max-new-tokens", "2", "--json")
    assert code == 0 and err == ""  # --max-new-tokens reached: nothing to say


def test_chat_refuses_an_unknown_command(capsys, monkeypatch, trained_model_dir):
    """/help and the typo /stat were sent to the model as the user's turn."""
    _generate_raw(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/stat\n/usr/bin please\n/exit\n"))
    code, out, err = run(capsys, "chat", trained_model_dir, "--max-new-tokens", "2")
    unknown = ("unknown command {}: the commands are /stats, /reset and /exit (a message that starts with / is sent "
               "as one when it has more words)")  # fmt: skip
    assert code == 0 and err.splitlines()[1:] == [unknown.format("/help"), unknown.format("/stat")]
    assert out.count(RAW) == 1  # "/usr/bin please" went to the model


def test_bench_json_refuses_a_dash_and_trace_the_model_files(capsys, tmp_path, quantized):
    code, _, err = run(capsys, "bench", "no-such-model", "--json", "-")  # it wrote a file named "-"
    assert_one_line_error(code, err, "--json takes a file name, not -: bench prints its table on stdout")
    config = quantized / "config.json"
    before = config.read_bytes()
    code, _, err = run(capsys, "trace", quantized, "--prompt", "hi", "--out", config)
    assert_one_line_error(code, err, f"--out {config} is a file of the model ({quantized}), which it would "
                          "overwrite; give another file name")  # fmt: skip
    assert config.read_bytes() == before


def test_version(capsys):
    from importlib.metadata import version

    code, out, err = run(capsys, "--version")
    assert code == 0 and out == f"moe-offload {version('moe-offload')}\n" and err == ""


@pytest.mark.parametrize("command", ["synth", "quantize"])
def test_ctrl_c_in_quantize_or_synth_says_how_to_resume(capsys, monkeypatch, tmp_path, trained_model_dir, command):
    """It exited 130 without a word, leaving a folder of files and a journal."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("offload.synth.synthesize" if command == "synth" else "offload.convert.quantize_model",
                        interrupted)  # fmt: skip
    out = tmp_path / "out"
    args = [command, out, "--preset", "tiny"] if command == "synth" else [command, trained_model_dir, out]
    code, _, err = run(capsys, *args)
    assert code == 130
    assert err.endswith(f"(interrupted: {out} is unfinished; run the same command again to resume it)\n")


def test_generate_reads_its_prompt_from_a_file_or_stdin(capsys, monkeypatch, tmp_path, trained_model_dir):
    """A multi-line code prompt needed the shell's $'...' quoting: --prompt-file FILE, or - for standard input."""
    prompt = "def add(a, b):\n\treturn"
    (tmp_path / "p.txt").write_text(prompt)
    common = ["--max-new-tokens", "4", "--temperature", "0", "--json"]
    code, out, _ = run(capsys, "generate", trained_model_dir, "--prompt", prompt, *common)
    expected = json.loads(out)["token_ids"]
    code, out, _ = run(capsys, "generate", trained_model_dir, "--prompt-file", tmp_path / "p.txt", *common)
    assert code == 0 and json.loads(out)["token_ids"] == expected
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompt.encode())))
    code, out, _ = run(capsys, "generate", trained_model_dir, "--prompt-file", "-", *common)
    assert code == 0 and json.loads(out)["token_ids"] == expected
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for args, message in (
        ([], "give --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "x", "--prompt-file", tmp_path / "p.txt"], "give --prompt TEXT or --prompt-file FILE, not both"),
        (["--prompt-file", tmp_path / "latin1.txt"], f"{tmp_path / 'latin1.txt'} is not UTF-8 text: the byte 0xe9 at "
                                                    "byte 3"),
        (["--prompt-file", tmp_path / "nope.txt"], f"cannot read --prompt-file {tmp_path / 'nope.txt'}: No such file "
                                                  "or directory"),
    ):  # fmt: skip
        code, _, err = run(capsys, "generate", "/no/such/model", *args)  # before the load
        assert_one_line_error(code, err, message)


def test_chat_stats_after_each_answer_are_one_line(capsys, monkeypatch, trained_model_dir):
    """--stats printed every layer's row after every answer (32 on Mixtral); /stats still does."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/stats\n/exit\n"))
    code, _, err = run(capsys, "chat", trained_model_dir, "--slots", "2", "--stats", "--max-new-tokens", "2")
    lines = err.splitlines()
    assert code == 0 and lines[1].startswith("prefill ") and " · hit rate " in lines[1]
    assert lines[2].startswith("prefill ") and "┃ layer ┃" in "".join(lines[3:])  # /stats: totals, then the table


def test_trace_counts_its_prompts_and_says_what_ctrl_c_leaves(capsys, monkeypatch, tmp_path, trained_model_dir):
    """Ctrl-C in a trace of many prompts exited without a word about the sequences already done."""
    from offload.api import OffloadedModel

    model = offload.load(str(trained_model_dir), device="cpu", slots=2)
    done = []
    model.trace(["def f(", "import os"], tmp_path / "t.jsonl", max_new_tokens=2, progress=lambda *r: done.append(r))
    assert done == [("prompts", 0, 2), ("prompts", 1, 2), ("prompts", 2, 2)]  # as load's: (what, done, total)
    real = OffloadedModel.generate

    def generate(self, *args, **kwargs):
        if self.sequence >= 1:  # two sequences generated: the third prompt
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(OffloadedModel, "generate", generate)
    (tmp_path / "prompts.txt").write_text("def f(\nimport os\nclass A:\n")
    out = tmp_path / "cut.jsonl"
    code, _, err = run(capsys, "trace", trained_model_dir, "--prompts", tmp_path / "prompts.txt", "--out", out,
                       "--slots", "2", "--max-new-tokens", "2")  # fmt: skip
    assert code == 130 and not out.exists()
    assert err.splitlines()[-1] == "(interrupted after 2 of 3 prompts: no trace written, as it is written whole)"
