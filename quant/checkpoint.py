"""The quantized checkpoint folder: atomic writes, resume after a kill, verified memory-mapped reads.

    OUT/
      manifest.json              written last; {"format_version", "files": {name: {bytes, sha256}}, ...caller's keys}
      resident.safetensors       everything that stays on the GPU (the caller decides what)
      experts-000.safetensors    one per layer; tensor str(e) is expert e's packed uint8 buffer
      ...
      .quantize-journal.json     only while unfinished: the job and every completed file's sha256

Every file goes to a temporary name, is fsynced and renamed, then journaled. A killed run of the
same job resumes: journaled files whose bytes still match are skipped. Nothing here knows models.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from quant.errors import MoEOffloadError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
JOURNAL = ".quantize-journal.json"
_TMP_MARK = ".tmp-"  # temporary files are named f".{final}{_TMP_MARK}{pid}"
RERUN = "re-run `moe-offload quantize` with --force"
SYNTH_RERUN = "re-run `moe-offload synth` with --force"


def rerun_hint(manifest: object) -> str:
    """What makes a damaged folder again: the command that made it (synth has no source quantize could read)."""
    quantization = manifest.get("quantization") if isinstance(manifest, dict) else None
    return SYNTH_RERUN if isinstance(quantization, dict) and quantization.get("synthetic") else RERUN


_HASH_CHUNK = 16 << 20


def expert_file(layer: int) -> str:
    return f"experts-{layer:03d}.safetensors"


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _readable_mode() -> int:
    """rw for everyone the umask allows, as an ordinary file gets (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _readable_mode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """A failed write of `path` (a full disk) as one line; the files finished before it stay journaled."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        full = getattr(error, "errno", None) == errno.ENOSPC or "os error 28" in str(error)  # safetensors' own
        raise MoEOffloadError(
            f"cannot write {path}: {reason}; {'make room' if full else 'fix that'} and run the same command "
            "again, which keeps the files already written"
        ) from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with _disk_errors(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj: Mapping) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share storage (e.g. slices of one arena): copy those."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


_EXPERT_FILE = re.compile(r"experts-\d{3,}\.safetensors")


def _is_ours(name: str) -> bool:
    """Is this a name a CheckpointWriter gives its files, whether or not a manifest lists it? (--force
    removes only these and the files a manifest or journal lists: never a user's own *.safetensors.)"""
    return name in (MANIFEST, JOURNAL, RESIDENT) or _EXPERT_FILE.fullmatch(name) is not None or _TMP_MARK in name


def read_journal(out_dir: Path) -> dict | None:
    """An unfinished run's journal in `out_dir`: {"job": ..., "files": ...}, or None."""
    try:
        journal = json.loads((Path(out_dir) / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(journal, dict) and isinstance(journal.get("files"), dict)
    return journal if ok else None


class CheckpointWriter:
    """Writes one quantized folder; a run killed part way resumes where it stopped."""

    def __init__(self, out_dir: Path, *, job: dict, force: bool = False):
        self.out_dir = Path(out_dir)
        self.job = json.loads(json.dumps(job))  # as the journal will hold it (tuples -> lists)
        self._files: dict[str, dict] = {}
        self._verified: set[str] = set()
        try:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise MoEOffloadError(f"{self.out_dir} is a file, not a folder; choose another OUT")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in self.out_dir.iterdir())
        except OSError as error:  # a file on the way, a name too long, no permission
            reason = error.strerror or error
            raise MoEOffloadError(f"cannot make the folder {self.out_dir}: {reason}; choose another OUT") from None
        if names and not force:
            journal = read_journal(self.out_dir)
            other = None if journal is None or MANIFEST in names else journal.get("job")
            if isinstance(other, dict) and other != self.job:  # the same OUT, other settings: say which
                differ = [f"{key} {other.get(key)!r} there, {value!r} here" for key, value in self.job.items()
                          if other.get(key) != value]  # fmt: skip
                raise MoEOffloadError(
                    f"{self.out_dir} is an unfinished run with other settings ({'; '.join(differ)}): run that "
                    "command again to finish it, pass --force to start this one over it, or choose another OUT"
                )
            if journal is None or journal.get("job") != self.job or MANIFEST in names:
                what = "already holds a quantized checkpoint" if MANIFEST in names else "is not empty"
                raise MoEOffloadError(
                    f"{self.out_dir} {what} and is not an unfinished run of this job; "
                    "pass --force to overwrite it, or choose another OUT"
                )
            self._files = dict(journal["files"])
        elif names:
            self._clear(names)
        for name in os.listdir(self.out_dir):  # temporaries of a killed run
            if _TMP_MARK in name:
                (self.out_dir / name).unlink()
        self._write_journal()

    def _clear(self, names: list[str]) -> None:
        """--force: delete what a writer made (listed files, its own file names, temporaries), nothing else."""
        listed = set(self._listed(self.out_dir / MANIFEST)) | set(self._listed(self.out_dir / JOURNAL))
        foreign = [n for n in names if not (_is_ours(n) or n in listed) or not (self.out_dir / n).is_file()]
        if foreign:
            raise MoEOffloadError(
                f"{self.out_dir} holds {foreign[0]!r}, which is not part of a quantized checkpoint; "
                "--force only replaces quantized checkpoints, so choose another OUT"
            )
        for name in names:
            (self.out_dir / name).unlink()

    @staticmethod
    def _listed(path: Path) -> list[str]:
        """File names a manifest or journal lists ([] when it is absent or unreadable)."""
        try:
            files = json.loads(path.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            return []
        return [name for name in files if isinstance(name, str)] if isinstance(files, dict) else []

    def _write_journal(self) -> None:
        _atomic_write_bytes(self.out_dir / JOURNAL, _json_bytes({"job": self.job, "files": self._files}))

    def done(self, file_name: str) -> bool:
        """Completed by an earlier (killed) run of this job, and its bytes still match the journal."""
        if file_name in self._verified:
            return True
        entry = self._files.get(file_name)
        path = self.out_dir / file_name
        if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if file_sha256(path) != entry["sha256"]:
            return False
        self._verified.add(file_name)
        return True

    def write(self, file_name: str, tensors: Mapping[str, Tensor]) -> None:
        """One safetensors file: deterministic bytes (no metadata), temp name + fsync + rename, journal."""
        self._write(file_name, lambda tmp: save_file(_unshared(tensors), str(tmp)))

    def write_bytes(self, file_name: str, data: bytes) -> None:
        """Any other file (e.g. the tokenizer's), with the same guarantees as `write`."""

        def dump(tmp: Path) -> None:
            tmp.write_bytes(data)

        self._write(file_name, dump)

    def _write(self, file_name: str, dump) -> None:
        if "/" in file_name or file_name in (MANIFEST, JOURNAL) or _TMP_MARK in file_name:
            raise ValueError(f"invalid checkpoint file name {file_name!r}")
        path = self.out_dir / file_name
        tmp = path.with_name(f".{file_name}{_TMP_MARK}{os.getpid()}")
        self._files.pop(file_name, None)
        self._verified.discard(file_name)
        try:
            with _disk_errors(path):
                dump(tmp)
                os.chmod(tmp, _FILE_MODE)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            entry = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.out_dir)
        self._files[file_name] = entry
        self._verified.add(file_name)
        self._write_journal()

    def finish(self, manifest: Mapping) -> Path:
        """Write manifest.json last (format_version and files added), then drop the journal."""
        if "files" in manifest or "format_version" in manifest:
            raise ValueError("the caller's manifest must not set 'files' or 'format_version'")
        full = dict(manifest)
        full["format_version"] = FORMAT_VERSION
        full["files"] = {name: self._files[name] for name in sorted(self._files)}
        path = self.out_dir / MANIFEST
        _atomic_write_bytes(path, _json_bytes(full))
        (self.out_dir / JOURNAL).unlink()
        _fsync_dir(self.out_dir)
        return path


# ---------------------------------------------------------------------------------------------------
# reading

_ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}


class MappedSafetensors(Mapping):
    """A safetensors file as a read-only-in-spirit mapping of zero-copy tensors over one memory map.

    The map is private (copy-on-write): writing to a returned tensor never reaches the file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            self._header = json.loads(f.read(header_len))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._header.pop("__metadata__", None)
        self._data_start = 8 + header_len

    def __getitem__(self, name: str) -> Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(info["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + begin)
        return flat.view(info["shape"])

    def nbytes(self, name: str) -> int:
        """Tensor `name`'s size in bytes, from the header alone."""
        begin, end = self._header[name]["data_offsets"]
        return end - begin

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


class QuantizedCheckpoint:
    """A finished quantized folder, checked against its manifest, read through memory maps."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._open: dict[str, MappedSafetensors] = {}

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> QuantizedCheckpoint:
        """Check the manifest and every file's size (and sha256 when `verify`); errors name the file."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            if (path / JOURNAL).is_file():
                job = (read_journal(path) or {}).get("job")
                synthetic = isinstance(job, dict) and str(job.get("source")).startswith("synthetic:")
                command = "synth" if synthetic else "quantize"
                raise MoEOffloadError(
                    f"{path} is an unfinished `moe-offload {command}` run (no {MANIFEST}); "
                    "re-run the same command to resume it"
                )
            raise MoEOffloadError(f"{path} has no {MANIFEST}, so it is not a quantized checkpoint; {RERUN}")
        manifest = _load_manifest(manifest_path)
        # what made the folder is what makes it again
        rerun = rerun_hint(manifest)
        version = manifest["format_version"]
        if version != FORMAT_VERSION:
            raise MoEOffloadError(
                f"{manifest_path} has format_version {version!r}, but this moe-offload reads "
                f"format_version {FORMAT_VERSION}; {rerun}"
            )
        for name, entry in manifest["files"].items():
            file_path = path / name
            if not file_path.is_file():
                raise MoEOffloadError(f"{file_path} is missing (listed in {MANIFEST}); {rerun}")
            size = file_path.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "larger than listed"
                raise MoEOffloadError(f"{file_path} is {what}: {size} bytes, {MANIFEST} says {entry['bytes']}; {rerun}")
        if verify:
            # hashlib drops the GIL on large chunks, so threads hash files in parallel (~17 GB at 2-bit).
            names = list(manifest["files"])
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                digests = pool.map(file_sha256, [path / name for name in names])
            for name, digest in zip(names, digests):
                if digest != manifest["files"][name]["sha256"]:
                    raise MoEOffloadError(
                        f"{path / name} is altered or corrupt: its sha256 differs from {MANIFEST}; {rerun}"
                    )
        return cls(path, manifest)

    def close(self) -> None:
        """Drop the memory maps (each unmaps once no tensor read from it is alive)."""
        self._open.clear()

    def read(self, file_name: str) -> MappedSafetensors:
        """Lazy, memory-mapped tensors of one listed safetensors file."""
        if file_name not in self.manifest["files"]:
            raise KeyError(f"{file_name} is not listed in {self.path / MANIFEST}")
        if file_name not in self._open:
            self._open[file_name] = MappedSafetensors(self.path / file_name)
        return self._open[file_name]

    def expert(self, layer: int, expert: int) -> Tensor:
        """Expert (layer, expert)'s packed uint8 buffer, zero-copy over the file's memory map."""
        return self.read(expert_file(layer))[str(expert)]


def _load_manifest(manifest_path: Path) -> dict:
    manifest = None

    def corrupt(why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{manifest_path} is a corrupt manifest ({why}); {rerun_hint(manifest)}")

    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt("not valid JSON") from e
    if not isinstance(manifest, dict):
        raise corrupt("not a JSON object")
    for key in ("format_version", "files"):
        if key not in manifest:
            raise corrupt(f"no {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise corrupt("'files' is not an object")
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise corrupt(f"bad file name {name!r}")
        ok = isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        if not ok:
            raise corrupt(f"bad entry for {name!r}")
    return manifest
