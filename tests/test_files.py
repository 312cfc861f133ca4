"""quant/files.py: an output path checked before the work, written under a temporary name and renamed."""

import os
from pathlib import Path

import pytest

from cache.trace import TraceWriter
from offload.bench import write_json
from quant.errors import MoEOffloadError
from quant.files import check_writable, write_atomically


def test_a_name_too_long_is_one_line(tmp_path):
    path = tmp_path / ("x" * 300)
    with pytest.raises(MoEOffloadError) as err:
        check_writable(path, "--plot")
    assert str(err.value) == f"--plot {path}: File name too long"


def test_a_folder_nobody_can_write_in_is_refused_even_for_root():
    """os.access says yes to root everywhere; /proc takes no file whoever asks."""
    with pytest.raises(MoEOffloadError) as err:
        check_writable("/proc/moe-offload.json", "--json")
    assert str(err.value).startswith("--json /proc/moe-offload.json: cannot write in /proc (")


def test_a_broken_link_on_the_way_is_one_line(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    path = tmp_path / "gone" / "t.jsonl"
    with pytest.raises(MoEOffloadError) as err:
        check_writable(path, "--out")
    assert str(err.value) == f"--out {path}: {tmp_path / 'gone'} is a broken link"


def test_a_home_path_is_expanded(monkeypatch, tmp_path):
    """`--plot=~/p.png` reaches us unexpanded (the shell expands ~ only at a word's start): it means home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    write_json("~/results/r.json", {"a": 1}, "--json")
    assert (tmp_path / "results" / "r.json").read_text() == '{\n  "a": 1\n}\n'
    assert not Path("~").exists()


def test_a_failed_write_leaves_neither_file(tmp_path):
    """The writer fails half way: no file under the final name, and no temporary one beside it."""
    path = tmp_path / "out.json"

    def half(temp: Path) -> None:
        temp.write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half, "--json")
    assert os.listdir(tmp_path) == []
    path.write_text("old")
    write_atomically(path, lambda temp: temp.write_text("new"), "--json")  # an existing file is replaced
    assert os.listdir(tmp_path) == ["out.json"] and path.read_text() == "new"


def test_a_trace_whose_temporary_name_cannot_be_made_is_one_line(tmp_path):
    """A 250-character name is a valid file name, but the temporary one beside it is past 255."""
    path = tmp_path / ("t" * 244 + ".jsonl")
    with pytest.raises(MoEOffloadError) as err:
        TraceWriter(path)
    assert str(err.value) == f"the trace {path}: cannot write it (File name too long)"
    assert os.listdir(tmp_path) == []
