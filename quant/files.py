"""Writing an output file safely: checked before the long work that makes it, then written to a
temporary name beside it and renamed, so its final name never holds half a file.

Checkpoint folders have their own, hashing writer (quant/checkpoint.py); this is for single files: a
trace, a benchmark's JSON, a plot.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from quant.errors import MoEOffloadError


def cache_dir() -> Path:
    """Where moe-offload keeps what it makes once for a machine (the CPU's kernel, launches tuned for a GPU):
    $XDG_CACHE_HOME/moe-offload, by default ~/.cache/moe-offload."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-offload"
    except RuntimeError:  # no HOME, and a user without a passwd entry (a container's --user 1234)
        return Path(tempfile.gettempdir()) / "moe-offload"


def check_writable(path: Path | str, option: str) -> Path:
    """`path` as a Path (~ expanded), or a one-line error naming `option` (e.g. "--json") if no file can be
    written there: it is a folder, a parent is a file or a broken link, or the nearest existing folder is
    not writable."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise MoEOffloadError(f"{option} {path} is a folder; give a file name")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            if folder.is_symlink():
                raise MoEOffloadError(f"{option} {path}: {folder} is a broken link")
            folder = folder.parent
        if not folder.is_dir():
            raise MoEOffloadError(f"{option} {path}: {folder} is a file, not a folder")
        try:  # a file really made there: os.access says yes to root, even where nobody can write (/proc, /sys)
            probe, name = tempfile.mkstemp(dir=folder, prefix=".moe-offload-probe.")
        except OSError as error:
            raise MoEOffloadError(f"{option} {path}: cannot write in {folder} ({error.strerror or error})") from None
        os.close(probe)
        os.unlink(name)
    except OSError as error:  # e.g. a name too long
        raise MoEOffloadError(f"{option} {path}: {error.strerror or error}") from None
    return path


def refuse_overwriting(path: Path | str, option: str, source: Path | str, what: str) -> None:
    """A one-line error naming `option` if writing `path` would replace what the run reads: the file `source`,
    or a file in the folder `source` (`what` names it: "the trace being read", "the model")."""
    path, source = Path(path).expanduser(), Path(source).expanduser()
    try:
        if not path.is_file() or not source.exists():
            return  # a new file replaces nothing
        if source.is_dir():
            if path.resolve().is_relative_to(source.resolve()):
                raise MoEOffloadError(f"{option} {path} is a file of {what} ({source}), which it would overwrite; "
                                      "give another file name")  # fmt: skip
        elif path.samefile(source):
            raise MoEOffloadError(f"{option} {path} is {what}, which it would overwrite; give another file name")
    except OSError:  # unreadable, a name too long: check_writable says what
        return


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_atomically(path: Path | str, write: Callable[[Path], None], option: str) -> Path:
    """write(temporary) then rename it to `path`, making its folders. Any failure, Ctrl-C included, removes
    the temporary file; an OSError becomes a one-line error naming `option`."""
    path = check_writable(path, option)
    temp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        os.replace(temp, path)
    except OSError as error:
        remove_quietly(temp)
        reason = error.strerror or error
        raise MoEOffloadError(f"{option} {path}: cannot write it ({reason}); pick a writable path") from None
    except BaseException:
        remove_quietly(temp)
        raise
    return path
