"""quant/checkpoint.py: resume after SIGKILL, byte-identical folders, exact errors, nothing half-written."""

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import quant.checkpoint as checkpoint
from quant.checkpoint import (
    JOURNAL,
    MANIFEST,
    CheckpointWriter,
    QuantizedCheckpoint,
    expert_file,
    is_quantized_checkpoint,
)
from quant.errors import MoEOffloadError
from quant.hqq import EXPERT_PRESETS
from quant.packing import ExpertFormat

REPO = Path(__file__).resolve().parents[1]
RERUN = "re-run `moe-offload quantize` with --force"
JOB = {"source": "synthetic", "revision": "r1", "experts": EXPERT_PRESETS["2"].to_dict()}

# Writes 4 expert files (2 experts each, real 2-bit packed experts) and a resident file, printing what
# it skips and writes; with KILL_AFTER = k > 0 it SIGKILLs itself after writing k files.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from quant.checkpoint import CheckpointWriter, RESIDENT, expert_file
    from quant.hqq import EXPERT_PRESETS, quantize, to_tensors
    from quant.packing import ExpertFormat

    out, kill_after = Path(sys.argv[1]), int(sys.argv[2])
    fmt = ExpertFormat.build(64, 128, EXPERT_PRESETS["2"], torch.bfloat16)
    job = {"source": "synthetic", "revision": "r1", "experts": EXPERT_PRESETS["2"].to_dict()}
    writer = CheckpointWriter(out, job=job)
    files = [expert_file(layer) for layer in range(4)] + [RESIDENT]
    written = 0
    for index, name in enumerate(files):
        if writer.done(name):
            print("skip", name, flush=True)
            continue
        generator = torch.Generator().manual_seed(index)
        if name == RESIDENT:
            weight = torch.randn(64, 64, generator=generator)
            tensors = to_tensors(quantize(weight, EXPERT_PRESETS["4"]), "layers.0.q_proj")
        else:
            tensors = {}
            for expert in range(2):
                w1, w3 = torch.randn(128, 64, generator=generator), torch.randn(128, 64, generator=generator)
                w2 = torch.randn(64, 128, generator=generator)
                tensors[str(expert)] = fmt.pack(w1, w2, w3)
        writer.write(name, tensors)
        print("wrote", name, flush=True)
        written += 1
        if written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    writer.finish({"family": "test", "expert_format": fmt.to_dict()})
    print("finished", flush=True)
    """
)


def _run(script: Path, out: Path, kill_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(script), str(out), str(kill_after)], capture_output=True, text=True, env=env, cwd=REPO
    )


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigkill_resume_gives_a_byte_identical_folder(tmp_path, monkeypatch, capsys):
    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    first = _run(script, killed, kill_after=2)
    assert first.returncode == -9, first.stderr
    assert first.stdout.split("\n")[:-1] == ["wrote experts-000.safetensors", "wrote experts-001.safetensors"]
    assert sorted(os.listdir(killed)) == [JOURNAL, "experts-000.safetensors", "experts-001.safetensors"]
    with pytest.raises(MoEOffloadError) as err:
        QuantizedCheckpoint.open(killed)
    assert str(err.value) == (
        f"{killed} is an unfinished `moe-offload quantize` run (no manifest.json); re-run the same command to resume it"
    )
    # A temporary left by a kill in the middle of a write is swept away on resume.
    (killed / f".experts-002.safetensors{checkpoint._TMP_MARK}99999").write_bytes(b"half")

    second = _run(script, killed, kill_after=0)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split("\n")[:-1] == [
        "skip experts-000.safetensors",
        "skip experts-001.safetensors",
        "wrote experts-002.safetensors",
        "wrote experts-003.safetensors",
        "wrote resident.safetensors",
        "finished",
    ]

    # The uninterrupted run happens in this process (one interpreter start less; bytes must not care).
    monkeypatch.setattr(sys, "argv", [str(script), str(whole), "0"])
    runpy.run_path(str(script), run_name="__main__")
    assert "skip" not in capsys.readouterr().out
    assert _folder_bytes(killed) == _folder_bytes(whole)
    expert_files = [expert_file(layer) for layer in range(4)]
    assert sorted(os.listdir(whole)) == sorted([MANIFEST, *expert_files, "resident.safetensors"])

    # The experts read back from the memory map equal the same experts packed here, in this process.
    ckpt = QuantizedCheckpoint.open(killed)
    fmt = ExpertFormat.from_dict(ckpt.manifest["expert_format"])
    generator = torch.Generator().manual_seed(3)
    for expert in range(2):
        w1, w3 = torch.randn(128, 64, generator=generator), torch.randn(128, 64, generator=generator)
        w2 = torch.randn(64, 128, generator=generator)
        assert torch.equal(ckpt.expert(3, expert), fmt.pack(w1, w2, w3))
    assert ckpt.expert(0, 1).dtype == torch.uint8 and ckpt.expert(0, 1).shape == (fmt.nbytes,)
    resident = ckpt.read("resident.safetensors")
    assert sorted(resident) == ["layers.0.q_proj.codes", "layers.0.q_proj.scale", "layers.0.q_proj.zero"]
    manifest = json.loads((killed / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["family"] == "test"
    assert manifest["files"]["resident.safetensors"]["bytes"] == (killed / "resident.safetensors").stat().st_size


def _finished(folder: Path) -> Path:
    writer = CheckpointWriter(folder, job=JOB)
    writer.write(expert_file(0), {"0": torch.arange(256, dtype=torch.uint8), "1": torch.zeros(256, dtype=torch.uint8)})
    writer.write("resident.safetensors", {"norm": torch.ones(8, dtype=torch.bfloat16)})
    writer.write_bytes("tokenizer.json", b'{"tokenizer": true}')
    writer.finish({"family": "test"})
    return folder


@pytest.fixture
def finished(tmp_path) -> Path:
    return _finished(tmp_path / "ckpt")


def test_finished_folder_reads_back(finished):
    assert is_quantized_checkpoint(finished) and not is_quantized_checkpoint(finished.parent)
    names = [MANIFEST, "experts-000.safetensors", "resident.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(finished)) == sorted(names)
    ckpt = QuantizedCheckpoint.open(finished)
    assert torch.equal(ckpt.expert(0, 0), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(ckpt.read("resident.safetensors")["norm"], torch.ones(8, dtype=torch.bfloat16))
    view = ckpt.expert(0, 0)
    view[0] = 7  # a private map: the file never changes
    assert QuantizedCheckpoint.open(finished, verify=True).manifest == ckpt.manifest


def _open_error(folder: Path, verify: bool = True) -> str:
    with pytest.raises(MoEOffloadError) as err:
        QuantizedCheckpoint.open(folder, verify=verify)
    return str(err.value)


def test_truncated_file(finished):
    path = finished / expert_file(0)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-1])
    assert _open_error(finished) == f"{path} is truncated: {size - 1} bytes, manifest.json says {size}; {RERUN}"
    assert _open_error(finished, verify=False).startswith(f"{path} is truncated")


def test_altered_byte(finished):
    path = finished / "resident.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert _open_error(finished) == f"{path} is altered or corrupt: its sha256 differs from manifest.json; {RERUN}"
    QuantizedCheckpoint.open(finished, verify=False)  # sizes still agree; only the hash would tell


def test_missing_file(finished):
    path = finished / "tokenizer.json"
    path.unlink()
    assert _open_error(finished) == f"{path} is missing (listed in manifest.json); {RERUN}"


def test_corrupt_manifest(finished):
    manifest_path = finished / MANIFEST
    good = json.loads(manifest_path.read_text())
    manifest_path.write_text('{"format_version": 1, "files": {')
    assert _open_error(finished) == f"{manifest_path} is a corrupt manifest (not valid JSON); {RERUN}"
    manifest_path.write_text(json.dumps({k: v for k, v in good.items() if k != "files"}))
    assert _open_error(finished) == f"{manifest_path} is a corrupt manifest (no 'files'); {RERUN}"
    bad_name = {**good, "files": {"../escape": {"bytes": 1, "sha256": "0"}}}
    manifest_path.write_text(json.dumps(bad_name))
    assert _open_error(finished) == f"{manifest_path} is a corrupt manifest (bad file name '../escape'); {RERUN}"


def test_unknown_format_version(finished):
    manifest_path = finished / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    assert _open_error(finished) == (
        f"{manifest_path} has format_version 99, but this moe-offload reads format_version 1; {RERUN}"
    )


def test_no_manifest(tmp_path):
    assert _open_error(tmp_path) == f"{tmp_path} has no manifest.json, so it is not a quantized checkpoint; {RERUN}"


def test_non_empty_out_without_force(tmp_path, finished):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MoEOffloadError) as err:
        CheckpointWriter(other, job=JOB)
    assert str(err.value) == (
        f"{other} is not empty and is not an unfinished run of this job; "
        "pass --force to overwrite it, or choose another OUT"
    )
    # --force only ever deletes what a checkpoint writer could have made.
    with pytest.raises(MoEOffloadError) as err:
        CheckpointWriter(other, job=JOB, force=True)
    assert str(err.value) == (
        f"{other} holds 'notes.txt', which is not part of a quantized checkpoint; "
        "--force only replaces quantized checkpoints, so choose another OUT"
    )
    assert (other / "notes.txt").read_text() == "mine"

    with pytest.raises(MoEOffloadError) as err:
        CheckpointWriter(finished, job=JOB)  # finished, even by the same job
    assert str(err.value) == (
        f"{finished} already holds a quantized checkpoint and is not an unfinished run of this job; "
        "pass --force to overwrite it, or choose another OUT"
    )
    CheckpointWriter(finished, job=JOB, force=True)
    assert os.listdir(finished) == [JOURNAL]


def test_force_never_deletes_a_users_own_safetensors(tmp_path, finished):
    """A *.safetensors that no manifest lists and that is not named as ours (experts-NNN, resident) is the
    user's: --force refuses the folder rather than delete it, even beside a finished checkpoint."""
    for folder in (tmp_path / "alone", finished):
        folder.mkdir(exist_ok=True)
        (folder / "my-finetune.safetensors").write_bytes(b"weights")
        with pytest.raises(MoEOffloadError) as err:
            CheckpointWriter(folder, job=JOB, force=True)
        assert str(err.value) == (
            f"{folder} holds 'my-finetune.safetensors', which is not part of a quantized checkpoint; "
            "--force only replaces quantized checkpoints, so choose another OUT"
        )
        assert (folder / "my-finetune.safetensors").read_bytes() == b"weights"


def test_a_full_disk_is_one_line_leaves_nothing_under_the_final_name_and_keeps_what_was_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = CheckpointWriter(out, job=JOB)
    writer.write(expert_file(0), {"0": torch.zeros(64, dtype=torch.uint8)})

    def full(tensors, filename):  # what safetensors raises on ENOSPC, after part of the file
        Path(filename).write_bytes(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(MoEOffloadError) as error:
        writer.write(expert_file(1), {"0": torch.zeros(64, dtype=torch.uint8)})
    assert str(error.value) == (
        f"cannot write {out / expert_file(1)}: Error while serializing: I/O error: No space left on device (os error "
        "28); make room and run the same command again, which keeps the files already written"
    )
    assert sorted(os.listdir(out)) == [JOURNAL, expert_file(0)]  # no temporary left

    def refused(tensors, filename):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "save_file", refused)
    with pytest.raises(MoEOffloadError) as error:  # not a full disk: no advice to make room
        writer.write(expert_file(1), {"0": torch.zeros(64, dtype=torch.uint8)})
    assert str(error.value) == (
        f"cannot write {out / expert_file(1)}: Permission denied; fix that and run the same command again, which "
        "keeps the files already written"
    )
    assert not writer.done(expert_file(1))
    assert list(json.loads((out / JOURNAL).read_text())["files"]) == [expert_file(0)]
    assert CheckpointWriter(out, job=JOB).done(expert_file(0))


def test_unfinished_run_of_another_job_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    writer = CheckpointWriter(out, job=JOB)
    writer.write(expert_file(0), {"0": torch.zeros(64, dtype=torch.uint8)})
    with pytest.raises(MoEOffloadError) as error:  # it said "is not empty", of a run it could name
        CheckpointWriter(out, job={**JOB, "revision": "r2"})
    assert str(error.value) == (
        f"{out} is an unfinished run with other settings (revision {JOB.get('revision')!r} there, 'r2' here): run "
        "that command again to finish it, pass --force to start this one over it, or choose another OUT"
    )
    resumed = CheckpointWriter(out, job=dict(JOB))
    assert resumed.done(expert_file(0)) and not resumed.done(expert_file(1))
    # A journaled file altered since is not trusted: it will be written again.
    path = out / expert_file(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not CheckpointWriter(out, job=JOB).done(expert_file(0))


@pytest.mark.parametrize("attn", [("4", "hqq"), ("4", "bnb"), ("none", "hqq")])
def test_quantize_and_synth_refuse_a_disk_too_small_before_writing(tmp_path, monkeypatch, attn):
    """A full disk stopped a quantize late (hours in, on a CPU) and synth's default preset writes 18 GB: the size
    each will write is known before the first file, to the tensor bytes (safetensors headers aside)."""
    import shutil
    from collections import namedtuple

    from safetensors import safe_open

    from offload.convert import quantize_model
    from offload.planner import format_bytes
    from offload.synth import folder_bytes, synthesize
    from tests.tiny import make_tiny_mixtral

    src = make_tiny_mixtral(tmp_path / "src", layers=2, experts=4, intermediate=128)
    folder = quantize_model(str(src), tmp_path / "q", expert_bits="2", attn_bits=attn[0], attn_quant=attn[1],
                            device="cpu")  # fmt: skip
    written = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            written += sum(f.get_tensor(name).nbytes for name in f.keys())
    usage = namedtuple("usage", "total used free")
    # the prediction is the tensors' bytes: with one byte less free, quantize refuses
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, written - 1))
    with pytest.raises(MoEOffloadError) as error:
        quantize_model(str(src), tmp_path / "q2", expert_bits="2", attn_bits=attn[0], attn_quant=attn[1], device="cpu")
    assert str(error.value) == (f"quantize writes {format_bytes(written)} to {tmp_path / 'q2'}, and {tmp_path} has "
                                f"{format_bytes(written - 1)} free; free some space or write elsewhere")  # fmt: skip
    assert not (tmp_path / "q2").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, written))
    quantize_model(str(src), tmp_path / "q3", expert_bits="2", attn_bits=attn[0], attn_quant=attn[1], device="cpu")
    need = folder_bytes("tiny", attn_bits=attn[0]) if attn[1] == "hqq" else None
    if need is not None:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, need - 1))
        with pytest.raises(MoEOffloadError) as error:
            synthesize(tmp_path / "s", "tiny", attn_bits=attn[0])
        assert str(error.value).startswith(f"synth writes {format_bytes(need)} to {tmp_path / 's'}, and ")
        assert not (tmp_path / "s").exists()


def test_free_space_counts_no_link_as_room(tmp_path, monkeypatch):
    """A link in OUT (to a large file elsewhere) counted as room the run would free."""
    import shutil
    from collections import namedtuple

    from offload.convert import check_free_space

    big = tmp_path / "elsewhere.bin"
    big.write_bytes(b"x" * 100_000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "link.bin").symlink_to(big)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(0, 0, 1000))
    with pytest.raises(MoEOffloadError, match=r"^quantize writes 97\.7 KiB to .*; free some space or write elsewhere$"):
        check_free_space(out, 100_000, "quantize")
    (out / "own.bin").write_bytes(b"y" * 100_000)  # a file of OUT's own is room
    check_free_space(out, 100_000, "quantize")
