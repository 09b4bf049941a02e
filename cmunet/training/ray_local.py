"""Ray for the search (:func:`ray_session`): a cluster, or a local instance that only this user can
reach -- listening on 127.0.0.1 only, with a token, its sockets and session folders in a folder of
this user alone (:func:`private_folder`)."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from cmunet.training.tune_config import SearchConfig

RAY_FOLDER = "ray"  # Ray's own temp folder, inside the private one (Ray makes it mode 0777)


@contextmanager
def ray_session(search: SearchConfig) -> Iterator[None]:
    """Ray for the search: a cluster (``search.address``) or a local instance started here and
    shut down afterwards; an instance already running in this process is used as it is.

    The local instance listens on 127.0.0.1 only (:func:`loopback_node`), requires a token
    (Ray's token authentication: other users of the machine reach 127.0.0.1 too): a random one
    made for this session and kept in this process's environment (its workers inherit it), never
    written to a file, unless RAY_AUTH_MODE / RAY_AUTH_TOKEN are set (docs/multinode.md), and
    keeps its sockets and session folders under :func:`ray_temp_dir`."""
    if ray.is_initialized():
        yield
        return
    temp = None if search.address else ray_temp_dir(search)  # refused before anything starts
    with ray_token(local=temp is not None):
        if temp is None:
            ray.init(address=search.address, logging_level=logging.WARNING)
        else:
            with loopback_node():
                ray.init(num_cpus=search.num_cpus or None, include_dashboard=False,
                         _node_ip_address="127.0.0.1", _temp_dir=str(temp),
                         logging_level=logging.WARNING)
            tighten(temp)
        try:
            yield
        finally:
            ray.shutdown()


def default_temp_dir() -> Path:
    """``ray-cmunet-<uid>`` in the system temp folder: one per user."""
    return Path(tempfile.gettempdir()) / f"ray-cmunet-{os.getuid()}"


def ray_temp_dir(search: SearchConfig) -> Path:
    """The local Ray's ``_temp_dir``: a folder inside :func:`private_folder` of
    ``search.temp_dir`` (or :func:`default_temp_dir`). Ray makes the folders it creates
    world-writable (mode 0777), its own temp folder included; inside a 0700 folder nobody else
    reaches them."""
    return private_folder(Path(search.temp_dir) if search.temp_dir else default_temp_dir()) \
        / RAY_FOLDER


def private_folder(path: Path) -> Path:
    """``path`` (resolved) as a folder of this user alone: made with mode 0700 when missing;
    refused when it is a symbolic link or not a folder, belongs to another user or is open to
    other users (any group or other permission bit: they could have planted files in it)."""
    path = Path(os.path.abspath(path))  # the last part is checked, not followed, if a link
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    status = path.lstat()
    problem = ("is a symbolic link" if stat.S_ISLNK(status.st_mode) else
               "is not a folder" if not stat.S_ISDIR(status.st_mode) else
               f"belongs to another user (uid {status.st_uid})" if status.st_uid != os.getuid()
               else f"is open to other users (mode {stat.S_IMODE(status.st_mode):o})"
               if status.st_mode & 0o077 else "")
    if problem:
        raise ValueError(f"{path} {problem}: the local Ray keeps its sockets and session folders "
                         "in search.temp_dir, which must be a folder of yours alone (mode 700); "
                         "remove it or set search.temp_dir to another folder")
    return path.resolve()


def tighten(temp: Path) -> None:
    """Mode 0700 for the folders Ray made world-writable as it started: its temp folder, the
    session's folder and the session's folders (sockets, logs, ...). Those it makes later stay
    0777, unreachable inside :func:`private_folder`."""
    session = temp / "session_latest"
    folders = [temp]
    if session.is_dir():
        session = session.resolve()
        folders += [session, *(p for p in session.iterdir() if p.is_dir() and not p.is_symlink())]
    uid = os.getuid()
    for folder in folders:
        status = folder.lstat()
        if stat.S_ISDIR(status.st_mode) and status.st_uid == uid:
            folder.chmod(0o700)


@contextmanager
def loopback_node() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep that address.

    Ray's GCS server, raylet, agents and workers bind their servers to 127.0.0.1 when the node's
    address is 127.0.0.1, and to every interface otherwise. But ``ray.init`` replaces a loopback
    ``_node_ip_address`` by the machine's routable address
    (``ray._private.services.resolve_ip_for_localhost``) unless Ray clusters are disabled
    (``ray_constants.ENABLE_RAY_CLUSTER``, read once from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when
    ray is imported; True on Linux). It is False only while ``ray.init`` runs; the processes Ray
    starts are given the address explicitly. tests/test_listeners.py checks every listener."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def ray_token(local: bool = True) -> Iterator[None]:
    """For a ``local`` Ray: RAY_AUTH_MODE=token with a random RAY_AUTH_TOKEN (unless the user set
    them) for the session, the workers it starts included; restored afterwards."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if not local:
        yield
        return
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ValueError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: the local Ray of the "
                         "search runs only with token authentication; unset RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    Config.initialize("")  # Ray caches its settings and token: read them again
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
