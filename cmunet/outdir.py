"""Output folders on a shared file system: what a job may write into and what it may replace.

Rules every job that writes an ``out`` folder follows (:func:`check_out`):

* ``out`` is never one of the job's inputs, nor a folder that holds one, nor a folder inside one
  (replacing or filling it would destroy or mix with the data it reads);
* ``out`` is a folder or does not exist yet (an existing file is refused), and not another kind
  of output of this toolkit that jobs read (a shard set, a pre-training export, a fine-tuned
  model), unless it is the job's own kind;
* ``overwrite`` replaces only a folder that is empty or that holds nothing but what this toolkit
  wrote there (``foreign`` names the first other file: for shards, anything the set's
  ``manifest.json`` does not list); never a folder of someone else's files, a symbolic link or
  the working folder.

Temporary folders are named ``.<out>.tmp-<host>-<pid>``; :func:`remove_stale` deletes those of
processes of this host that no longer run (a job killed with SIGKILL), and only those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping

from cmunet.log import logger


class OutputError(ValueError):
    """``out`` cannot be used: a user mistake, reported in one line (exit 2)."""


URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/|pipe:")  # s3://, https://, models:/, runs:/, pipe:
# what kind_of() recognises: outputs that other jobs read
SHARDS, EXPORT, MODEL = "a shard set", "a pre-training export", "a fine-tuned model"


def check_out(out: str | Path, inputs: Mapping[str, str | Path | None], overwrite: bool = False,
              foreign: Callable[[Path], str | None] | None = None, must_be_new: bool = False,
              kind: str | None = None) -> Path:
    """Refuse an ``out`` that is, holds or lies inside one of ``inputs`` (name -> path; None,
    "none", URLs and missing paths skipped), an existing file, or an existing output of another
    kind than ``kind`` (:func:`kind_of`). With ``must_be_new`` (``out`` is replaced as a whole), also a
    symbolic link, the working folder and an existing folder that is neither empty nor, with
    ``overwrite``, free of files this toolkit did not write (``foreign`` returns why not, or
    None). Returns ``out`` as a Path."""
    out = Path(out)
    real = out.resolve()
    for name, path in inputs.items():
        if not path or str(path) == "none" or URI.match(str(path)) or not Path(path).exists():
            continue  # not set, a URL or a registry name, or missing (the job says so)
        source = Path(path).resolve()
        if source == real or real in source.parents or source in real.parents:
            what = "is" if source == real else "holds" if real in source.parents else "lies inside"
            raise OutputError(f"out={out} {what} the input {name}={path}; choose an output "
                              "folder outside the input data")
    if out.exists() and not out.is_dir():
        raise OutputError(f"out={out} is an existing file, not a folder; choose another out")
    if must_be_new:
        _check_replaceable(out, real, overwrite, foreign)
    elif out.is_dir() and (found := kind_of(out)) not in (None, kind):
        raise OutputError(f"out={out} is {found}, which other jobs read; writing there would "
                          "mix files into it. Choose an output folder of its own")
    return out


def _check_replaceable(out: Path, real: Path, overwrite: bool,
                       foreign: Callable[[Path], str | None] | None) -> None:
    if out.is_symlink():
        raise OutputError(f"out={out} is a symbolic link (to {real}); give the folder itself, "
                          "or another out")
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or real == cwd or real in cwd.parents:
        raise OutputError(f"out={out} is (or holds) the working folder, which cannot be replaced; "
                          "run from outside it and name the folder, e.g. out=../NAME")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
        reason = foreign(out) if foreign else "was not written by this tool"
        if reason:
            raise not_replaceable(out, reason)


def not_replaceable(where: str | Path, reason: str) -> OutputError:
    """The error for an existing output that ``overwrite`` may not replace (nothing deleted)."""
    return OutputError(f"{where} {reason}; nothing was deleted: --overwrite replaces only an "
                       "earlier output of this tool that holds nothing else. Choose another --out "
                       "or move the other files away yourself")


def foreign_name(names: Iterable[str], written: Collection[str]) -> str | None:
    """The first of ``names`` (paths relative to an output) that is not in ``written``."""
    return next((name for name in sorted(names) if name not in written), None)


def names_in(folder: Path) -> list[str]:
    """Everything under ``folder`` as paths relative to it: files, symbolic links and empty
    folders (``sub/``); links are not followed."""
    names = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        names += [(base / n).as_posix() for n in files + links]
        names += [f"{(base / d).as_posix()}/" for d in dirs
                  if d not in links and not any((Path(root) / d).iterdir())]
    return names


def check_only(folder: Path, written: Collection[str], what: str) -> None:
    """Refuse to replace ``folder`` (``what``, e.g. "the export") when it holds a file that is not
    one of ``written``, naming that file."""
    name = foreign_name(names_in(folder), written) if folder.is_dir() else None
    if name:
        raise OutputError(f"{folder / name} was not written by this tool, and replacing {what} "
                          f"{folder} would delete it; move it away first")


def kind_of(folder: Path) -> str | None:
    """Which output of this toolkit that jobs read ``folder`` is, or None: :data:`EXPORT`
    (export.json, model.safetensors), :data:`MODEL` (best.safetensors), :data:`SHARDS`
    (manifest.json of the shard format)."""
    if (folder / "export.json").is_file() and (folder / "model.safetensors").is_file():
        return EXPORT
    if (folder / "best.safetensors").is_file():
        return MODEL
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return SHARDS if str(manifest.get("format", "")).startswith("cmunet-shards/") else None
    except (OSError, ValueError, AttributeError):
        return None


def check_private(folder: Path, what: str) -> None:
    """Refuse state that is read back with pickle (Ray Tune's search state) unless this user
    wrote it: every file and folder under ``folder`` must belong to this user, be writable by
    nobody else and not be a symbolic link. On a shared file system anyone who can write there
    could otherwise plant a file that runs code when the search resumes."""
    uid = os.getuid()
    for path in [folder, *sorted(folder.rglob("*"))]:
        status = path.lstat()
        problem = ("is a symbolic link" if stat.S_ISLNK(status.st_mode) else
                   "belongs to another user" if status.st_uid != uid else
                   "is writable by other users" if status.st_mode & 0o022 else "")
        if problem:
            raise ValueError(f"{path} {problem}: {what} is read back with pickle, so it is only "
                             "resumed from files that you alone can have written; check where "
                             "it came from, then fix it (chmod -R go-w) or start over with a new "
                             "out=")


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<host>-<pid>`` beside ``out``."""
    return out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}"


def remove_stale(out: Path, log: Callable[[str], None] = logger(__name__).info) -> list[Path]:
    """Delete the temporary siblings of ``out`` (``temp_sibling``) left by dead processes of this
    host; those of other hosts or of running processes are kept. Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-{_host()}-"
        for path in out.parent.glob(f".{glob_escape(out.name)}.{kind}-*"):
            pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed {path}, left by an interrupted run (process {pid})")
                removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that id
        return True
    return True
