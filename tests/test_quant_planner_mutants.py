"""Edges of packing, quantization specs, the checkpoint folder, output files and the memory planner that the
other tests leave open: exact bytes, exact slot counts, exact error text (found by mutation testing)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import quant.checkpoint as checkpoint
from offload import planner
from offload.planner import GiB, parse_bytes, plan_memory, slots_text
from offload.synth import folder_bytes, preset_config, synthetic_name
from quant.bnb import NF4Spec, quantize_nf4
from quant.checkpoint import JOURNAL, MANIFEST, CheckpointWriter, MappedSafetensors, QuantizedCheckpoint, expert_file
from quant.errors import MoEOffloadError
from quant.files import check_writable, refuse_overwriting, write_atomically
from quant.hqq import (
    EXPERT_PRESETS,
    QuantSpec,
    Workspace,
    dequantize,
    dequantize_tiles,
    quantize,
    random_quantized,
    tensor_shapes,
)
from quant.linear import Kernel, linear, map_tensors, weight_tensors, workspace_bytes
from quant.packing import ExpertFormat, PackedLayout, dtype_name
from tests.test_packing import D, I
from tests.test_quant import _weight
from tests.test_quant_checkpoint import JOB, RERUN, _finished, _open_error

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

# ---------------------------------------------------------------------------------------------------
# quant/packing.py


def test_pack_refuses_tensors_the_layout_does_not_name_and_a_wrong_dtype():
    """pack takes exactly the layout's tensors, in their dtypes (a bfloat16 is never packed as float16 bytes)."""
    layout = PackedLayout.of({"a": ((2,), torch.float16)})
    with pytest.raises(ValueError, match=re.escape("pack expects tensors ['a'], got ['a', 'b']")):
        layout.pack({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.float16)})
    with pytest.raises(ValueError, match=re.escape("a: expected (2,) float16, got (2,) torch.bfloat16")):
        layout.pack({"a": torch.zeros(2, dtype=torch.bfloat16)})


def test_pack_and_views_take_a_buffer_of_exactly_nbytes():
    """A buffer a byte too long is refused too: a slot row of another layout must not pass for this one."""
    layout = PackedLayout.of({"a": ((2,), torch.float16)})
    assert layout.nbytes == 64
    with pytest.raises(ValueError) as error:
        layout.views(torch.zeros(65, dtype=torch.uint8))
    assert str(error.value) == "views needs a uint8 buffer of shape (64,), got torch.uint8 torch.Size([65])"
    with pytest.raises(ValueError) as error:
        layout.pack({"a": torch.zeros(2, dtype=torch.float16)}, out=torch.zeros(65, dtype=torch.uint8))
    assert str(error.value) == "pack needs a uint8 buffer of shape (64,), got torch.uint8 torch.Size([65])"


def test_a_layout_dict_without_align_reads_as_64_and_unknown_dtypes_are_named():
    """Manifests keep the layout's align; one without it means the default of 64."""
    layout = PackedLayout.from_dict(
        {"nbytes": 64, "entries": [{"name": "a", "offset": 0, "shape": [2], "dtype": "uint8"}]}
    )
    assert layout.align == 64
    with pytest.raises(ValueError) as error:
        dtype_name(torch.float64)
    assert str(error.value) == (
        "dtype torch.float64 cannot be packed; supported: uint8, int8, int32, int64, float16, bfloat16, float32"
    )


@pytest.mark.parametrize(
    ("bits", "sha256"),
    [
        ("3", "d2e220e9eb9f0b720d8ea4c66302830bef13d7fe9b17f5ac499795f001136929"),
        ("4", "8725205af38b0f51ae4880b6fc312570812b455fbebca1632348c7113056118b"),
        ("none", "c3625ff347cbd09586dfecb0207c8df72b07cd318c70b0455382ad123365d3e7"),
    ],
)
def test_a_random_expert_keeps_its_bytes(bits, sha256):
    """A seed's synthetic expert is the same bytes as every commit before (2-bit: tests/test_synth.py's folder)."""
    fmt = ExpertFormat.build(D, I, EXPERT_PRESETS[bits], torch.bfloat16)
    buffer = fmt.random(torch.Generator().manual_seed(0))
    assert hashlib.sha256(buffer.numpy().tobytes()).hexdigest() == sha256
    if bits == "3":  # ten 3-bit codes an int32: bits 30 and 31 stay clear
        codes = [view for name, view in fmt.layout.views(buffer).items() if name.endswith(".codes")]
        assert all(int(view.max()) < 1 << 30 and int(view.min()) >= 0 for view in codes)


# ---------------------------------------------------------------------------------------------------
# quant/hqq.py


def test_quant_spec_refuses_a_bad_meta_spec():
    """meta_bits and meta_group_size are checked like bits and group_size."""
    with pytest.raises(ValueError) as error:
        QuantSpec(bits=2, group_size=16, meta_bits=5)
    assert str(error.value) == "QuantSpec.meta_bits must be None or one of (2, 3, 4, 8)"
    with pytest.raises(ValueError) as error:
        QuantSpec(bits=2, group_size=16, meta_bits=8, meta_group_size=0)
    assert str(error.value) == "QuantSpec group sizes must be positive"
    assert QuantSpec.from_dict({"bits": 2, "group_size": 16, "meta_bits": 8}).meta_group_size == 128


def test_meta_groups_that_do_not_pack_are_refused():
    """3 meta groups of 4-bit codes do not fill whole bytes (two a byte)."""
    with pytest.raises(MoEOffloadError) as error:
        tensor_shapes((16, 96), QuantSpec(2, 16, meta_bits=4, meta_group_size=32), "w")
    assert str(error.value) == (
        "cannot quantize a weight of shape (16, 96) at 2-bit g16, 4-bit meta g32: its 3 meta groups do not pack "
        "evenly; pass --expert-bits none (unquantized): no other preset takes this shape"
    )


def test_the_advice_names_every_preset_that_takes_the_shape_both_ways_round():
    """An expert holds [I, D] and [D, I]: 3- and 4-bit g64 take [96, 64] but not [64, 96], so only 2 is named."""
    with pytest.raises(MoEOffloadError) as error:
        tensor_shapes((96, 64), QuantSpec(4, 128), "w")
    assert str(error.value).endswith("; pass --expert-bits 2 or none (none: unquantized)")
    with pytest.raises(MoEOffloadError) as error:
        tensor_shapes((128, 128), QuantSpec(4, 256), "w")
    assert str(error.value) == (
        "cannot quantize a weight of shape (128, 128) at 4-bit g256: its input size 128 is not a multiple of group "
        "size 256; pass --expert-bits 2 or 3 or 4 or none (none: unquantized)"
    )


def test_tiles_hold_as_many_whole_rows_as_max_weights_allows():
    """400 weights of 80 inputs: 5 rows a tile, 24 rows a bit slot (5+5+5+5+4), four slots."""
    q = random_quantized((96, 80), QuantSpec(2, 16), torch.Generator().manual_seed(0))
    got = [(first, tile.shape[0]) for first, tile in dequantize_tiles(q, torch.float32, Workspace(), 400)]
    assert got == [(slot * 24 + first, 4 if first == 20 else 5) for slot in range(4) for first in range(0, 24, 5)]


def test_an_8bit_meta_whose_bit_slots_split_its_groups_comes_whole():
    """Tiles of 128 grid rows start on the meta's groups of 128, but bit slot 1 starts at row 192: the tiles must
    not read the meta a tile at a time there (it would take the wrong groups' scales)."""
    q = random_quantized((48, 256), EXPERT_PRESETS["2"], torch.Generator().manual_seed(0))
    whole, workspace = dequantize(q), Workspace()
    rebuilt = torch.full_like(whole, float("nan"))
    for first, tile in dequantize_tiles(q, torch.float32, workspace, 2048):
        rebuilt[first : first + tile.shape[0]] = tile
    assert torch.equal(rebuilt, whole)
    assert "scale.grid" in {key[0] for key in workspace._buffers}  # the meta dequantized whole


# ---------------------------------------------------------------------------------------------------
# quant/linear.py


def test_linear_falls_back_to_tiles_where_the_kernel_declines():
    """A workspace's kernel runs only the calls its `supports` accepts."""
    q = quantize(_weight((64, 256), seed=1), QuantSpec(4, 32))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))

    def never(*args):
        raise AssertionError("multiply called for a call the kernel does not support")

    workspace = Workspace(Kernel("declines", lambda x, q: False, never))
    torch.testing.assert_close(linear(x, q, workspace), F.linear(x, dequantize(q)))


def test_workspace_bytes_counts_each_spec_of_one_shape():
    """Two weights of one shape but other group sizes need buffers of their own: the count is what linear holds."""
    a = random_quantized((64, 256), QuantSpec(4, 32), torch.Generator().manual_seed(0))
    b = random_quantized((64, 256), QuantSpec(2, 16), torch.Generator().manual_seed(1))
    workspace = Workspace()
    for q in (a, b):
        linear(torch.zeros(1, 256), q, workspace)
    assert workspace_bytes([a, b], torch.float32, CPU) == sum(t.nbytes for t in workspace._buffers.values())


def test_map_tensors_maps_an_nf4_weights_absmax():
    """Every tensor of the mapped NF4 weight is the mapped one (nothing of the original left behind)."""
    q = quantize_nf4(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), NF4Spec())
    on_meta = map_tensors(q, lambda tensor: torch.empty_like(tensor, device="meta"))
    assert [t.device.type for t in weight_tensors(on_meta)] == ["meta", "meta"]


# ---------------------------------------------------------------------------------------------------
# quant/checkpoint.py


def test_a_full_disk_while_writing_the_manifest_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC from the OS (not only safetensors' "os error 28") says to make room; the manifest's temp goes."""
    out = tmp_path / "out"
    writer = CheckpointWriter(out, job=JOB)
    writer.write(expert_file(0), {"0": torch.zeros(64, dtype=torch.uint8)})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(MoEOffloadError) as error:
        writer.finish({"family": "test"})
    assert str(error.value) == (
        f"cannot write {out / MANIFEST}: No space left on device; make room and run the same command again, which "
        "keeps the files already written"
    )
    assert sorted(os.listdir(out)) == [JOURNAL, expert_file(0)]


def test_the_manifest_is_sorted_json_and_tied_tensors_are_written_apart(tmp_path):
    """Manifest keys sorted whatever the caller's order (same bytes every run); one tensor under two names (tied
    embed and lm_head, which safetensors refuses as shared memory) is written as two."""
    out = tmp_path / "out"
    writer = CheckpointWriter(out, job=JOB)
    table = torch.arange(128, dtype=torch.uint8)
    writer.write("resident.safetensors", {"embed": table, "lm_head": table, "part": table[64:]})
    writer.finish({"zeta": 1, "alpha": {"b": 2, "a": 1}})
    text = (out / MANIFEST).read_text()
    assert list(json.loads(text)) == ["alpha", "files", "format_version", "zeta"]
    assert text.startswith('{\n  "alpha": {\n    "a": 1,\n    "b": 2\n  },\n') and text.endswith("}\n")
    resident = QuantizedCheckpoint.open(out).read("resident.safetensors")
    assert torch.equal(resident["embed"], table) and torch.equal(resident["lm_head"], table)
    assert torch.equal(resident["part"], table[64:])
    assert [resident.nbytes(name) for name in ("embed", "lm_head", "part")] == [128, 128, 64]


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    """safetensors writes 0600; the writer gives its files an ordinary file's mode."""
    umask = os.umask(0)
    os.umask(umask)
    writer = CheckpointWriter(tmp_path / "out", job=JOB)
    writer.write(expert_file(0), {"0": torch.zeros(64, dtype=torch.uint8)})
    assert (tmp_path / "out" / expert_file(0)).stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_names_the_writer_refuses(tmp_path):
    """Its own bookkeeping names, a path, and its temporaries' mark are no checkpoint file names."""
    writer = CheckpointWriter(tmp_path / "out", job=JOB)
    for name in (MANIFEST, JOURNAL, "sub/tokenizer.json", f".x{checkpoint._TMP_MARK}1"):
        with pytest.raises(ValueError, match=f"^invalid checkpoint file name {re.escape(repr(name))}$"):
            writer.write_bytes(name, b"")
    with pytest.raises(ValueError, match=r"^the caller's manifest must not set 'files' or 'format_version'$"):
        writer.finish({"format_version": 2})


def test_force_clears_every_name_a_writer_gives_and_nothing_else(tmp_path):
    """--force removes a journal's files, experts past 999, a killed run's temporaries; a folder is not ours."""
    out = tmp_path / "out"
    writer = CheckpointWriter(out, job=JOB)
    writer.write_bytes("tokenizer.json", b"{}")  # listed in the journal only
    (out / "experts-1000.safetensors").write_bytes(b"x")
    (out / f".experts-002.safetensors{checkpoint._TMP_MARK}99999").write_bytes(b"half")
    CheckpointWriter(out, job={**JOB, "revision": "r2"}, force=True)
    assert os.listdir(out) == [JOURNAL]
    (out / expert_file(0)).mkdir()
    with pytest.raises(MoEOffloadError) as error:
        CheckpointWriter(out, job=JOB, force=True)
    assert str(error.value) == (
        f"{out} holds 'experts-000.safetensors', which is not part of a quantized checkpoint; "
        "--force only replaces quantized checkpoints, so choose another OUT"
    )


def test_a_journal_without_files_or_beside_a_manifest_is_no_run_to_resume(tmp_path):
    """A kill between writing the manifest and dropping the journal leaves a finished folder, not a resumable one."""
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL).write_text(json.dumps({"job": JOB}))
    not_a_run = (
        "is not empty and is not an unfinished run of this job; pass --force to overwrite it, or choose another OUT"
    )
    with pytest.raises(MoEOffloadError) as error:
        CheckpointWriter(out, job=JOB)
    assert str(error.value) == f"{out} {not_a_run}"

    finished = tmp_path / "finished"
    writer = CheckpointWriter(finished, job=JOB)
    writer.write_bytes("tokenizer.json", b"{}")
    journal = (finished / JOURNAL).read_bytes()
    writer.finish({"family": "test"})
    (finished / JOURNAL).write_bytes(journal)
    held = (
        "already holds a quantized checkpoint and is not an unfinished run of this job; pass --force to overwrite "
        "it, or choose another OUT"
    )
    for job in (JOB, {**JOB, "revision": "r2"}):
        with pytest.raises(MoEOffloadError) as error:
            CheckpointWriter(finished, job=job)
        assert str(error.value) == f"{finished} {held}"


@pytest.fixture
def finished(tmp_path) -> Path:
    return _finished(tmp_path / "ckpt")


def test_a_file_larger_than_listed(finished):
    """A file grown past its listed size is named as such, not as truncated."""
    path = finished / "tokenizer.json"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b" ")
    assert _open_error(finished, verify=False) == (
        f"{path} is larger than listed: {size + 1} bytes, manifest.json says {size}; {RERUN}"
    )


def test_an_older_format_version_is_refused(finished):
    """Any format_version but ours is refused, an older one too."""
    manifest = json.loads((finished / MANIFEST).read_text())
    (finished / MANIFEST).write_text(json.dumps({**manifest, "format_version": 0}))
    assert _open_error(finished) == (
        f"{finished / MANIFEST} has format_version 0, but this moe-offload reads format_version 1; {RERUN}"
    )


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        ([], "not a JSON object"),
        ({"format_version": 1, "files": []}, "'files' is not an object"),
        ({"format_version": 1, "files": {".": {"bytes": 1, "sha256": "0"}}}, "bad file name '.'"),
        ({"format_version": 1, "files": {"..": {"bytes": 1, "sha256": "0"}}}, "bad file name '..'"),
        ({"format_version": 1, "files": {"": {"bytes": 1, "sha256": "0"}}}, "bad file name ''"),
        ({"format_version": 1, "files": {"x": {"bytes": "1", "sha256": "0"}}}, "bad entry for 'x'"),
        ({"format_version": 1, "files": {"x": {"bytes": 1, "sha256": 0}}}, "bad entry for 'x'"),
    ],
)
def test_corrupt_manifests_say_what_is_wrong(tmp_path, manifest, why):
    """Each malformed manifest is one line naming what is wrong in it."""
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert _open_error(tmp_path) == f"{tmp_path / MANIFEST} is a corrupt manifest ({why}); {RERUN}"


def test_mapped_safetensors_reads_empty_tensors_skips_metadata_and_refuses_unlisted_files(finished):
    """A zero-size tensor reads as one; safetensors' __metadata__ is no tensor; read() takes listed files only."""
    path = finished.parent / "other.safetensors"
    save_file({"empty": torch.zeros(0, 3, dtype=torch.float16), "x": torch.ones(2)}, str(path), metadata={"a": "b"})
    mapped = MappedSafetensors(path)
    assert sorted(mapped) == ["empty", "x"] and len(mapped) == 2
    assert mapped["empty"].shape == (0, 3) and mapped["empty"].dtype == torch.float16
    with pytest.raises(KeyError, match="config.json is not listed in"):
        QuantizedCheckpoint.open(finished).read("config.json")


# ---------------------------------------------------------------------------------------------------
# quant/files.py


def test_check_writable_refuses_a_folder_and_a_file_as_parent_and_leaves_nothing(tmp_path):
    """Its probe file is removed: checking a path writes nothing."""
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(MoEOffloadError) as error:
        check_writable(tmp_path, "--json")
    assert str(error.value) == f"--json {tmp_path} is a folder; give a file name"
    with pytest.raises(MoEOffloadError) as error:
        check_writable(tmp_path / "afile" / "x.json", "--json")
    assert str(error.value) == f"--json {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'} is a file, not a folder"
    assert check_writable(tmp_path / "new" / "x.json", "--json") == tmp_path / "new" / "x.json"
    assert os.listdir(tmp_path) == ["afile"]


def test_refuse_overwriting_sees_through_other_spellings_and_subfolders(tmp_path):
    """A file deep in the model's folder, or the source reached through a link, is still what the run reads."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "x.json").write_text("{}")
    with pytest.raises(MoEOffloadError) as error:
        refuse_overwriting(model / "sub" / "x.json", "--json", model, "the model")
    assert str(error.value) == (
        f"--json {model / 'sub' / 'x.json'} is a file of the model ({model}), which it would overwrite; "
        "give another file name"
    )
    trace = tmp_path / "t.jsonl"
    trace.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(trace)
    with pytest.raises(MoEOffloadError) as error:
        refuse_overwriting(tmp_path / "link.jsonl", "--plot", trace, "the trace being read")
    assert str(error.value) == (
        f"--plot {tmp_path / 'link.jsonl'} is the trace being read, which it would overwrite; give another file name"
    )


def test_a_write_that_fails_with_an_os_error_is_one_line_and_leaves_no_temporary(tmp_path):
    """An OSError in the writer (a full disk) is one line naming the option, and its temporary file goes."""

    def full(temp: Path) -> None:
        temp.write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MoEOffloadError) as error:
        write_atomically(tmp_path / "out.json", full, "--json")
    assert str(error.value) == (
        f"--json {tmp_path / 'out.json'}: cannot write it (No space left on device); pick a writable path"
    )
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# offload/planner.py


def test_parse_bytes_units_and_decimals():
    """kB is decimal, KiB binary; a decimal point and spaces are read."""
    assert parse_bytes("1kb") == 1000 and parse_bytes("1KiB") == 1024 and parse_bytes(" 2 kib ") == 2048
    assert parse_bytes("1.5g") == 1_500_000_000 and parse_bytes(".5GiB") == GiB // 2


def test_slots_text_names_single_layers_and_even_plans():
    """A run of one layer reads "layer N"; the same slots everywhere read as one number."""
    assert slots_text((5, 5, 4)) == "5 in layers 0-1, 4 in layer 2 (14 in all)"
    assert slots_text((4, 5, 5)) == "4 in layer 0, 5 in layers 1-2 (14 in all)"
    assert slots_text((5, 5)) == "5"


def test_a_budget_of_exactly_what_is_free_is_taken_without_a_warning(monkeypatch):
    """Only a budget over what is free warns."""
    monkeypatch.setattr(planner, "free_memory", lambda device: (2 * GiB, GiB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert planner.budgets("2GiB", "1GiB", CUDA) == (2 * GiB, GiB)


def test_free_memory_keeps_the_host_headroom_and_never_goes_below_zero(monkeypatch):
    """RAM available less HOST_HEADROOM (1 GiB), floored at 0."""
    from types import SimpleNamespace

    available = [3 * GiB]
    monkeypatch.setattr(planner.psutil, "virtual_memory", lambda: SimpleNamespace(available=available[0]))
    assert planner.free_memory(CPU) == (2 * GiB, 2 * GiB)
    available[0] = GiB // 2
    assert planner.free_memory(CPU) == (0, 0)


def test_one_budget_given_the_other_is_read_off_the_machine(monkeypatch):
    """--cpu-memory alone: the GPU budget is what is free on it."""
    monkeypatch.setattr(planner, "free_memory", lambda device: (9279, 12345))
    plan = plan_memory(device=CUDA, num_layers=2, num_experts=4, expert_bytes=1000, resident_bytes=0, kv_bytes=0,
                       host_budget=GiB)  # fmt: skip
    assert (plan.device_budget, plan.host_budget, plan.slots_per_layer) == (9279, GiB, (4, 4))


CPU_SMALL = dict(device=CPU, num_layers=2, num_experts=8, expert_bytes=1000, resident_bytes=0, kv_bytes=0,
                 device_budget=GiB, host_budget=GiB)  # fmt: skip


def test_cpu_slots_run_from_one_to_every_expert():
    """On the CPU, --slots 1 to the experts per layer are taken; 0 and one more are refused."""
    assert plan_memory(**CPU_SMALL, slots=8).slots_per_layer == (8, 8)
    for slots in (0, 9):
        with pytest.raises(MoEOffloadError) as error:
            plan_memory(**CPU_SMALL, slots=slots)
        assert str(error.value) == f"--slots must be between 1 and 8 (the experts per layer), got {slots}"


def test_a_cpu_exclusive_plan_counts_the_spare_row_on_both_sides_and_fits_to_the_byte():
    """16 experts, 3 slots a layer: arena 16 - 6 + 1 rows, slots 6 rows, one spare row: 18000 bytes in all."""
    plan = plan_memory(**CPU_SMALL | dict(host_budget=18_000), slots=3, mode="exclusive")
    assert (plan.mode, plan.host_bytes, plan.device_bytes) == ("exclusive", 11_000, 18_000)
    with pytest.raises(MoEOffloadError, match=r"^the model needs 17\.6 KiB of RAM \(experts 17\.6 KiB, "):
        plan_memory(**CPU_SMALL | dict(host_budget=17_999), slots=3, mode="exclusive")


# 2 layers of 4 experts of 1000 bytes; at 9279 bytes the GPU holds int(9279 * 0.97) = 9000: the spare row and 8 slots
GPU_SMALL = dict(device=CUDA, num_layers=2, num_experts=4, expert_bytes=1000, resident_bytes=0, kv_bytes=0)


def test_gpu_slots_fit_to_the_byte_and_may_be_every_expert():
    """On a GPU, slots fit while the budget holds them and the spare row, to the byte; --slots 0 is refused."""
    plan = plan_memory(**GPU_SMALL, device_budget=9279, host_budget=GiB, slots=4)
    assert (plan.mode, plan.slots_per_layer, plan.device_bytes) == ("inclusive", (4, 4), 8000)
    with pytest.raises(MoEOffloadError) as error:
        plan_memory(**GPU_SMALL, device_budget=9278, host_budget=GiB, slots=4)
    assert str(error.value).startswith("4 expert slots per layer need 9.1 KiB of GPU memory")
    for none in (0, -1):  # as on the CPU: the memory message said "1 expert slots ... need" and to lower --slots
        with pytest.raises(MoEOffloadError) as error:
            plan_memory(**GPU_SMALL, device_budget=9279, host_budget=GiB, slots=none)
        assert str(error.value) == f"--slots must be between 1 and 4 (the experts per layer), got {none}"


def test_gpu_modes_forced_and_fitted_to_the_byte():
    """2 slots a layer: exclusive needs 8 - 4 + 1 rows of RAM (5000 bytes), inclusive all 8."""
    common = dict(GPU_SMALL, device_budget=9279, slots=2)
    plan = plan_memory(**common, host_budget=5000)
    assert (plan.mode, plan.host_bytes, plan.device_bytes) == ("exclusive", 5000, 5000)
    forced = plan_memory(**common, host_budget=GiB, mode="exclusive")  # RAM for every expert, exclusive asked for
    assert (forced.mode, forced.host_bytes) == ("exclusive", 5000)
    with pytest.raises(MoEOffloadError) as error:
        plan_memory(**common, host_budget=4999)
    assert str(error.value) == (
        "the experts need 4.9 KiB of RAM beside the 3.9 KiB in GPU slots, and 4.9 KiB is available; quantize to "
        "fewer bits or raise --cpu-memory"
    )
    with pytest.raises(MoEOffloadError) as error:
        plan_memory(**common, host_budget=GiB, mode="direct")
    assert str(error.value) == "unknown cache mode 'direct'; choose auto, inclusive or exclusive"


def test_a_cuda_index_one_past_the_last_is_refused(monkeypatch):
    """With 2 GPUs, cuda:1 is the last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert planner.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(MoEOffloadError) as error:
        planner.resolve_device("cuda:2")
    assert str(error.value) == "--device cuda:2: this machine has 2 GPUs, cuda:0 to cuda:1"


# ---------------------------------------------------------------------------------------------------
# offload/synth.py


def test_synth_layers_stop_below_the_resident_stream():
    """Layer L draws from generator stream L; stream 65536 is the resident weights', so 65535 layers at most."""
    assert preset_config("tiny", layers=65535).num_layers == 65535
    with pytest.raises(MoEOffloadError) as error:
        preset_config("tiny", layers=65536)
    assert str(error.value) == "--layers must be between 1 and 65535, got 65536"


def test_synthetic_name_of_unquantized_experts():
    """A synthetic folder of --expert-bits none is named by its unquantized experts."""
    manifest = {
        "quantization": {"synthetic": True, "expert_bits": "none", "preset": "tiny"},
        "config": {"num_layers": 4},
    }
    assert synthetic_name(manifest) == "synthetic tiny, unquantized experts"


def test_folder_bytes_counts_every_expert_of_every_layer():
    """tiny: 4 layers x 8 experts x 37632 bytes (2-bit), and 383232 bytes of resident weights (4-bit attention)."""
    assert folder_bytes("tiny") == 4 * 8 * 37_632 + 383_232
    assert folder_bytes("tiny", "4", "none", layers=2) == 1_348_864
