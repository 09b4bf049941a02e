"""Output folders on a shared file system: what a job may write into and what it may replace.

Rules every job that writes an ``out`` folder follows (:func:`check_out`):

* ``out`` is never one of the job's inputs, nor a folder that holds one (replacing or filling
  it would destroy or mix with the data it reads);
* ``out`` is a folder or does not exist yet (an existing file is refused);
* ``overwrite`` replaces only a folder that is empty or that this toolkit wrote (``owned``, e.g.
  it holds a ``manifest.json`` of the shard format): never a folder of someone else's files.

Temporary folders are named ``.<out>.tmp-<host>-<pid>``; :func:`remove_stale` deletes those of
processes of this host that no longer run (a job killed with SIGKILL), and only those.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Callable, Mapping

from cmunet.log import logger


class OutputError(ValueError):
    """``out`` cannot be used: a user mistake, reported in one line (exit 2)."""


def check_out(out: str | Path, inputs: Mapping[str, str | Path | None], overwrite: bool = False,
              owned: Callable[[Path], bool] | None = None, must_be_new: bool = False) -> Path:
    """Refuse an ``out`` that is, or holds, one of ``inputs`` (name -> path; None skipped), an
    existing file, or (with ``must_be_new``) an existing folder that is neither empty nor, with
    ``overwrite``, ``owned``. Returns ``out`` as a Path."""
    out = Path(out)
    real = out.resolve()
    for name, path in inputs.items():
        if not path or "://" in str(path):
            continue
        source = Path(path).resolve()
        if source == real or real in source.parents:
            what = "is" if source == real else "holds"
            raise OutputError(f"out={out} {what} the input {name}={path}; choose an output "
                              "folder outside the input data")
    if out.exists() and not out.is_dir():
        raise OutputError(f"out={out} is an existing file, not a folder; choose another out")
    if must_be_new and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
        if owned is None or not owned(out):
            raise OutputError(f"{out} is not empty and was not written by this tool; --overwrite "
                              "replaces only an empty folder or an earlier output of this tool. "
                              "Choose another --out or remove the folder yourself")
    return out


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
