"""The Python API: a conversation going on reuses the KV cache for what the turns share; the dtype chosen."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch

import offload
from offload import api
from quant.errors import MoEOffloadError


def test_chat_turns_prefill_only_what_is_new(trained_model_dir):
    turns = ["def add(a, b):", "Now a docstring.", "And a test."]
    reused = offload.load(str(trained_model_dir), device="cpu", slots=3)
    fresh = offload.load(str(trained_model_dir), device="cpu", slots=3)
    messages: list[dict] = []
    previous_prompt_len = 0
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt_len = len(reused.encode_chat(messages))
        ours = reused.generate(messages=messages, max_new_tokens=10, temperature=0)
        fresh.reset()
        theirs = fresh.generate(messages=messages, max_new_tokens=10, temperature=0)
        assert ours.token_ids == theirs.token_ids
        assert theirs.prefill_tokens == prompt_len
        # at least the previous turn's prompt is in the KV cache already (the reply, re-encoded from its
        # text, may tokenize differently from the ids generated, so reuse can stop there)
        assert ours.prefill_tokens <= prompt_len - previous_prompt_len
        previous_prompt_len = prompt_len
        messages.append({"role": "assistant", "content": ours.text})
    assert reused.sequence == 0  # one conversation, one sequence: the expert caches were never reset


def test_a_plain_prompt_starts_a_new_sequence(trained_model_dir):
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    first = model.generate("import os\n", max_new_tokens=6, temperature=0)
    second = model.generate("import os\n", max_new_tokens=6, temperature=0)
    assert first.token_ids == second.token_ids and second.prefill_tokens == first.prefill_tokens
    assert model.sequence == 1


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_bfloat16_only_where_the_gpu_runs_it_natively(monkeypatch, native, expected):
    # a T4 (sm_75) passes torch's default check by emulating bfloat16, which cuBLAS and SDPA's fused kernels
    # do not run there: auto asks for native support and takes float16 without it
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert api.resolve_dtype("auto", torch.device("cuda")) is expected
    assert asked == [False]
    assert api.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert api.resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(MoEOffloadError, match=r"^unknown dtype 'half'; choose auto, float32, float16, bfloat16$"):
        api.resolve_dtype("half", torch.device("cpu"))


def test_reset_stats_leaves_no_earlier_prefetch_in_the_new_window(trained_model_dir):
    """After reset_stats a new sequence counts as on a fresh model: a prefetch left from before is not
    counted wasted (nor used) in the new window."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    for tokens in range(1, 40):  # a run that ends with a prefetch not yet used (7 tokens, here)
        model.generate("import os\n", max_new_tokens=tokens, temperature=0)
        if any(table.unused_prefetches for table in model.cache.tables):
            break
    else:
        pytest.fail("no run left a prefetch pending")
    model.reset_stats()
    fresh = offload.load(str(trained_model_dir), device="cpu", slots=3)
    for run in (model, fresh):
        run.generate("def f(x):\n", max_new_tokens=3, temperature=0)
    counts = [{k: v for k, v in run.stats.total.to_dict().items() if k != "stall_s"} for run in (model, fresh)]
    assert counts[0] == counts[1] and counts[0]["prefetches_issued"] > 0


def assert_slots_hold_their_experts(cache) -> None:
    """Inclusive mode: each slot a layer's table names holds its expert's bytes, as the arena has them."""
    for layer, table in enumerate(cache.tables):
        for expert, slot in table.slot_of.items():
            held = cache.slot_rows[cache.slot_row[cache.slot_base[layer] + slot]]
            assert torch.equal(held, cache.arena[layer * cache.num_experts + expert]), (layer, expert)


def test_an_interrupted_turn_leaves_the_next_one_right(trained_model_dir):
    """Ctrl-C in a reply (here: on_text raising) stops a generation after its prefill wrote the KV cache: the
    next turn must not take the old conversation for what the cache holds."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    fresh = offload.load(str(trained_model_dir), device="cpu", slots=3)
    first = [{"role": "user", "content": "def add(a, b):"}]
    reply = model.generate(messages=first, max_new_tokens=6, temperature=0)

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.generate(messages=[{"role": "user", "content": "Sort a list."}], temperature=0, on_text=interrupt)
    more = [*first, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "Now a docstring."}]
    assert_slots_hold_their_experts(model.cache)
    ours = model.generate(messages=more, max_new_tokens=8, temperature=0)
    assert ours.token_ids == fresh.generate(messages=more, max_new_tokens=8, temperature=0).token_ids


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.generate([1, 32000]), r"token id 32000 is not in this model's vocabulary \(0 to 31999\)"),
        (lambda m: m.logits([1, -5]), r"token id -5 is not in this model's vocabulary \(0 to 31999\)"),
        (lambda m: m.logits([1.0, 2.5]), r"token ids must be whole numbers, got 1.0"),
        (lambda m: m.generate(b"abc"), r"give token ids as a list or a 1-D tensor, got bytes"),
        (lambda m: m.logits(torch.tensor([[1, 2]])), r"give token ids as a list or a 1-D tensor, got one of shape "),
        (lambda m: m.logits(5), r"give token ids as a list or a 1-D tensor, got int"),
        (lambda m: m.generate("caf\udce9"), r"the prompt is not valid UTF-8 text: the byte 0xe9 at character 3"),
        (lambda m: m.trace(["ok", "caf\udce9"], "t.jsonl"), r"prompt 2 is not valid UTF-8 text: the byte 0xe9 "),
        (lambda m: m.trace("hello", "t.jsonl"), r"trace takes a list of prompts, got one string: pass \[prompt\]"),
        (lambda m: m.trace([], "t.jsonl"), r"trace needs at least one prompt"),
        (lambda m: m.trace([None], "t.jsonl"), r"trace takes text prompts, and the prompt is a NoneType"),
        (lambda m: m.trace(["a"], None), r"trace writes to a file: give its path, got None"),
        # each was a TypeError after the prefill, at the first token
        (lambda m: m.generate("a", on_text="x"), r"on_text must be a function or None, got 'x'"),
        (lambda m: m.generate("a", stop=True), r"stop must be a function or None, got True"),
        (
            lambda m: m.generate(messages="hi"),
            r"messages must be a list of \{'role': ..., 'content': ...\} dicts, "
            r"got str",
        ),  # fmt: skip
        # a float was installed, and every generation after it failed (in exclusive mode, for good)
        (lambda m: m.set_prefetch("late", 2.0), r"--prefetch-ahead must be a whole number, got 2.0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(trained_model_dir, tmp_path, monkeypatch, call, message):
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoEOffloadError, match=f"^{message}"):
        call(model)
    assert model.sequence == -1 and list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_token_ids_in_and_out_check_the_generation_config_as_text_does(trained_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_model_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    model = offload.load(str(folder), device="cpu", slots=3)
    with pytest.raises(MoEOffloadError) as error:  # the id "2" was a stop id beside 2, and never met
        model.generate([1, 2, 3], max_new_tokens=2)
    assert (
        str(error.value) == "generation_config.json has eos_token_id '2'; it must be an integer or a list of integers"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"slots": "2"}, "slots must be a whole number or None, got '2'"),
        ({"slots": True}, "slots must be a whole number or None, got True"),
        ({"max_seq_len": 64.0}, "max_seq_len must be a whole number or None, got 64.0"),
        ({"cpu_memory": 12}, "cpu_memory must be a string or None, got 12"),
        ({"verify": 1}, "verify must be True or False, got 1"),
        ({"policy": None}, "policy must be a string, got None"),
    ],
)
def test_load_options_of_the_wrong_type_are_one_line(options, message):
    with pytest.raises(MoEOffloadError, match=f"^{re.escape(message)}$"):
        api.LoadOptions(**options)


def test_load_names_a_wrong_keyword_and_takes_a_torch_dtype(trained_model_dir):
    with pytest.raises(
        MoEOffloadError, match=r"^unknown load option 'gpu_mem'; the options are device, dtype, slots, gpu_memory, "
    ):
        offload.load(trained_model_dir, gpu_mem="12GiB")  # was a TypeError naming LoadOptions.__init__
    with pytest.raises(MoEOffloadError, match=r"^text must be one of None, 'plain', 'chat', got 'code'$"):
        offload.load(trained_model_dir, text="code")
    with pytest.raises(MoEOffloadError, match=r"^progress must be a function \(what, done, total\) or None, got 'y"):
        offload.load(trained_model_dir, "yes", device="cpu")  # was a TypeError at the first expert
    assert api.LoadOptions(dtype=torch.bfloat16).dtype == "bfloat16"


def test_stats_kept_and_info_follow_reset_stats_and_set_prefetch(trained_model_dir):
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    kept = model.stats
    model.generate("def f(x):", max_new_tokens=6, temperature=0)
    model.reset_stats()
    model.generate("def f(x):", max_new_tokens=3, temperature=0)
    assert kept is model.stats and kept.decode_tokens == 2  # one window, where the old reference mixed two
    assert model.info()["prefetch"] == "late"
    model.set_prefetch("both", np.int64(2))
    assert model.info()["prefetch"] == "both, 2 layers ahead"  # it kept saying the load's


def test_model_and_stats_print_in_a_line(trained_model_dir):
    """print(model) was <offload.api.OffloadedModel object at 0x...>, print(model.stats) every layer's counters."""
    model = offload.load(trained_model_dir, device="cpu", slots=3)
    assert repr(model) == (f"OffloadedModel({trained_model_dir} (experts none, attention unquantized) on cpu, "
                           "float32, 3 slots per layer, inclusive)")  # fmt: skip
    assert repr(offload.load(trained_model_dir, device="cpu")).endswith(", float32, experts in place)")
    model.generate([1, 2, 3], max_new_tokens=3, temperature=0)
    text = repr(model.stats)
    assert text.startswith("RunStats(prefill 3 tok at ") and text.endswith("; 6 layers in .cache.per_layer)")
    assert "\n" not in text and model.stats.summary() in text


def test_load_takes_a_path_and_a_torch_device_and_refuses_no_model(trained_model_dir):
    model = offload.load(trained_model_dir, device=torch.device("cpu"), slots=np.int64(3))  # a Path, numpy's int
    assert model.options.device == "cpu" and model.device == torch.device("cpu")
    assert type(model.options.slots) is int and model.plan.slots_per_layer[0] == 3
    ids = [1, 822, 28722]  # token ids as any 1-D sequence: a range, a numpy array, a tensor
    expected = model.logits(ids)
    for given in (np.array(ids), torch.tensor(ids), tuple(ids)):
        assert torch.equal(model.logits(given), expected)
    quiet = model.generate(range(1, 4), max_new_tokens=2, temperature=0)
    assert quiet.token_ids == model.generate([1, 2, 3], max_new_tokens=2, temperature=0).token_ids
    assert quiet.text is None  # ids in, no streaming: no tokenizer is read (README's Python section)
    pieces = []
    streamed = model.generate([1, 2, 3], max_new_tokens=2, temperature=0, on_text=pieces.append)
    assert streamed.token_ids == quiet.token_ids and streamed.text == "".join(pieces) != ""
    for nothing in (None, "", " "):  # "" read the current folder
        with pytest.raises(MoEOffloadError, match="^give a model: a quantized folder, a Hugging Face folder or"):
            offload.load(nothing)


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
def test_a_step_cut_short_costs_the_cache_not_the_answers(trained_model_dir, monkeypatch, mode):
    """Ctrl-C inside a step (here: at a miss's copy in a chat turn's prefill) leaves a slot table naming an
    expert whose copy never ran. Inclusive mode forgets its slots and answers right; exclusive mode, whose
    slots may hold an expert's only copy, refuses to go on."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=2, cache_mode=mode)
    fresh = offload.load(str(trained_model_dir), device="cpu", slots=2, cache_mode=mode)
    first = [{"role": "user", "content": "def add(a, b):"}]
    reply = model.generate(messages=first, max_new_tokens=6, temperature=0).text
    assert reply == fresh.generate(messages=first, max_new_tokens=6, temperature=0).text
    more = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Now a docstring."}]
    loads, real = [], model.cache._load

    def load(layer, step):
        loads.append(layer)
        if len(loads) == 3:
            raise KeyboardInterrupt
        real(layer, step)

    monkeypatch.setattr(model.cache, "_load", load)
    with pytest.raises(KeyboardInterrupt):
        model.generate(messages=more, max_new_tokens=8, temperature=0)
    if mode == "exclusive":
        with pytest.raises(MoEOffloadError, match="^a step of this model was interrupted in exclusive mode"):
            model.generate(messages=more, max_new_tokens=8, temperature=0)
        return
    assert_slots_hold_their_experts(model.cache)
    ours = model.generate(messages=more, max_new_tokens=8, temperature=0)
    assert ours.token_ids == fresh.generate(messages=more, max_new_tokens=8, temperature=0).token_ids


def test_stop_ends_a_generation_between_steps(trained_model_dir):
    model = offload.load(str(trained_model_dir), device="cpu", slots=3)
    asked = []

    def stop() -> bool:  # asked before each decode step: the fourth time, stop
        asked.append(model.decode_step)
        return len(asked) > 3

    result = model.generate("def f(x):", max_new_tokens=32, temperature=0, stop=stop)
    assert (result.stop_reason, len(result.token_ids), result.decode_tokens) == ("stopped", 4, 3)
    assert model.stats.timing.decode_tokens == 3  # a stopped generation counts


def test_prepare_plans_what_load_runs_without_reading_an_expert(trained_model_dir, monkeypatch):
    monkeypatch.setattr("offload.api.ExpertCache", lambda **_: pytest.fail("an expert was read"))
    prepared = offload.prepare(trained_model_dir, device="cpu", slots=3)
    assert prepared.plan.slots_per_layer == (3,) * 6 and prepared.plan.mode == "inclusive"


def test_help_of_load_lists_every_option_with_its_default():
    """help(offload.load) showed **options and nothing of what they are."""
    import inspect

    lines = inspect.getdoc(offload.load).splitlines()
    listed = lines[lines.index("The options and their defaults (LoadOptions' comments, and `moe-offload generate "
                               "--help`, say what each does):") + 1 :]  # fmt: skip
    expected = [f"    {f.name}={f.default!r}" for f in dataclasses.fields(offload.LoadOptions)]
    assert listed == expected and "    slots=None" in listed


def test_stats_of_experts_in_place_show_no_hit_rate_and_python_oo_imports(trained_model_dir):
    """print(model.stats) showed "hit rate 1.000" with no cache; -OO (no docstrings) broke `import offload`."""
    import subprocess
    import sys

    model = offload.load(trained_model_dir, device="cpu")
    model.generate([1, 2, 3], max_new_tokens=2, temperature=0)
    assert "hit rate" not in repr(model.stats) and "hit rate" in model.stats.summary(cache=True)
    done = subprocess.run([sys.executable, "-OO", "-m", "cli.app", "--version"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("moe-offload "), done.stderr


def test_meta_rows_resolves_to_the_order_the_decode_kernel_reads(monkeypatch):
    """LoadOptions.meta_rows -> the experts' meta order: on the CPU by output whatever else (its loop's); on CUDA by
    packed row where asked, or by gemv.META_ROWS_BY_DEFAULT where not, but only where the fused kernel runs; asking
    for rows where nothing reads them is a one-line error."""
    from quant import gemv

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [api.meta_order(rows, cpu, fused) for rows in (None, False) for fused in (True, False)] == ["output"] * 4
    assert api.meta_order(True, cuda, True) == "row" and api.meta_order(False, cuda, True) == "grid"
    assert api.meta_order(None, cuda, True) == ("row" if gemv.META_ROWS_BY_DEFAULT else "grid")
    monkeypatch.setattr(gemv, "META_ROWS_BY_DEFAULT", True)
    assert api.meta_order(None, cuda, True) == "row" and api.meta_order(None, cuda, False) == "grid"
    assert api.kernel_meta_order(None) == "row" and api.kernel_meta_order(False) == "grid"
    with pytest.raises(MoEOffloadError) as error:
        api.meta_order(True, cuda, False)
    assert str(error.value) == ("--meta-rows lays experts out for the fused GEMV kernel, which is off here "
                                "(--no-fused-gemv, or no Triton)")  # fmt: skip
    with pytest.raises(MoEOffloadError, match=r"^--meta-rows lays experts out for the GPU's kernel; on the CPU"):
        api.meta_order(True, cpu, True)


def test_a_model_makes_its_own_gpu_current_while_it_runs(tmp_path, monkeypatch):
    """Graph capture, Triton's launches and a bare "cuda" all mean the current device, process-wide: a model on
    cuda:1 must run with cuda:1 current even after another model's load made cuda:0 current. (On the CPU, with the
    model's GPU and torch.cuda.device stood in for.)"""
    from tests.tiny import make_tiny_mixtral

    model = offload.load(str(make_tiny_mixtral(tmp_path / "m")), device="cpu")
    assert model.gpu is None
    current = []  # the device current at each decoder forward
    entered = []

    class Device:  # torch.cuda.device's stand-in: makes `index` current inside
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    synchronized = []  # generate's clock readings wait for this model's GPU, not the current one
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    forward = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda *a, **k: current.append(list(entered)) or forward(*a, **k))
    model.gpu = 1
    model.generate([1, 5, 9], max_new_tokens=3, temperature=0)
    assert current == [[1]] * 3 and entered == []  # the prefill and two decode steps, each inside cuda:1
    assert synchronized and set(synchronized) == {1}
