"""Where a shard set lives: a local folder or a URL.

``data.shards`` (and ``tools/shard.py --out``) is one of

* a local folder: ``/shared/shards/xca512``;
* an object store or web server: ``s3://bucket/xca512``, ``gs://bucket/xca512`` (through
  fsspec: s3fs, gcsfs), ``https://host/xca512`` (requests), or any other protocol fsspec knows;
* a WebDataset-style ``pipe:`` command that writes one file of the set to its standard output,
  with ``{name}`` where the file's name goes: ``pipe:aws s3 cp s3://bucket/xca512/{name} -``.

Every file at a URL, the small ones (``manifest.json``, ``splits.json``) and the tar shards, is
read front to back by one reader with a connect and a read time-out and a bounded number of
retries (:class:`RemoteConfig`, ``data.remote`` of the jobs, set with :func:`configure`): a hang,
a dropped connection, a truncated shard or a missing file ends in one line naming the URL and the
cause (:class:`ReadError`, :class:`MissingFile`).

Credentials come from each tool's usual environment variables and files (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or ``~/.aws``; ``GOOGLE_APPLICATION_CREDENTIALS``;
...). A URL holding a password (``https://user:secret@host/...``) is refused: the location is
logged with the run's configuration, so it must not carry a secret.
"""

from __future__ import annotations

import io
import os
import re
import select
import shlex
import signal
import subprocess
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


PIPE = "pipe:"


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``scheme://...`` or ``pipe:...``) rather than a path."""
    text = str(location)
    return text.startswith(PIPE) or "://" in text


def scheme(location: str | Path) -> str:
    """``"s3"``, ``"https"``, ``"pipe"``, ... or ``""`` for a local path."""
    text = str(location)
    if text.startswith(PIPE):
        return "pipe"
    return urlsplit(text).scheme if "://" in text else ""


def check(location: str | Path, what: str = "data.shards") -> str:
    """``location`` as a string; a password inside a URL or a ``pipe:`` without ``{name}`` is an
    error naming ``what``."""
    text = str(location)
    if text.startswith(PIPE):
        if "{name}" not in text:
            raise ValueError(f"{what}: a pipe: location needs {{name}} where the file name goes, "
                             "e.g. pipe:aws s3 cp s3://bucket/shards/{name} -")
    elif "://" in text and urlsplit(text).password:
        raise ValueError(f"{what}: the URL {public(text)} holds a password; put credentials in "
                         "the usual environment variables (AWS_ACCESS_KEY_ID, ...) instead")
    return text


def public(location: str | Path) -> str:
    """``location`` with any ``user:password@`` part of a URL removed (for messages)."""
    text = str(location)
    if "://" not in text or text.startswith(PIPE):
        return text
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def absolute(location: str | Path) -> str:
    """A local folder made absolute; a URL as it is (trials and ranks run in other folders)."""
    return str(location) if is_url(location) else str(Path(location).resolve())


def join(location: str | Path, name: str) -> str:
    """The URL or path of file ``name`` of the set at ``location``."""
    text = check(location)
    if text.startswith(PIPE):
        return text.replace("{name}", shlex.quote(name))
    if is_url(text):
        return f"{text.rstrip('/')}/{name}"
    return str(Path(text) / name)


def folder_of(url: str | Path, name: str) -> str:
    """The set whose file ``name`` is at ``url``: the inverse of :func:`join`."""
    text = str(url)
    if text.startswith(PIPE):
        return text.replace(shlex.quote(name), "{name}")
    if is_url(text):
        return text.rpartition("/")[0]
    return str(Path(text).parent)


def read_bytes(location: str | Path, name: str) -> bytes:
    """File ``name`` of the set at ``location``; FileNotFoundError when it is not there."""
    return read_file(join(location, name))


def read_file(url: str | Path) -> bytes:
    """The bytes of one file: a path, a URL or a ``pipe:`` command's output, read with the
    time-outs and retries of :func:`configure`; FileNotFoundError when it is not there
    (:class:`MissingFile` for a URL), :class:`ReadError` when it cannot be read."""
    url = str(url)
    if not is_url(url):
        if not Path(url).is_file():
            raise FileNotFoundError(url)
        return Path(url).read_bytes()
    with _Reader(url, _settings) as reader:
        return reader.readall()


def open_shard(url: str):
    """A binary stream of the tar at ``url`` (a path, ``file://``, or a URL read like
    :func:`read_file`)."""
    if not is_url(url) or scheme(url) == "file":
        return open(urlsplit(url).path if scheme(url) == "file" else url, "rb")
    return io.BufferedReader(_Reader(url, _settings), 1 << 20)


def tar_samples(url: str):
    """The raw samples (dicts of member bytes, ``__key__``, ``__url__``) of the tar at ``url``,
    grouped as WebDataset groups them (``dir/key.suffix``: the key ends at the first dot of the
    file name); a truncated or damaged tar is a :class:`ReadError` naming ``url``."""
    stream = open_shard(url)
    sample: dict = {}
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for member in tar:
            tar.members = []  # a stream: keep no index of what was read
            folder, _, name = member.name.rpartition("/")
            if not member.isreg() or name.startswith("__") or "." not in name:
                continue  # folders, WebDataset's __meta__ files
            key = (folder + "/" if folder else "") + name.split(".", 1)[0]
            if sample.get("__key__") != key:
                if sample:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[name.split(".", 1)[1].lower()] = tar.extractfile(member).read()
        if sample:
            yield sample
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ReadError(url, f"not a whole tar file ({err}): the shard is truncated or damaged; "
                             "rebuild the set with tools/shard.py") from None
    finally:
        stream.close()


# ---- time-outs and retries of remote reads ------------------------------------------------------

@dataclass
class RemoteConfig:
    """How files of a shard set at a URL are read (``data.remote``). Every read of a URL is
    bounded: a server that accepts and never answers, or a command that writes nothing, fails the
    try after the time-out; a failed try is retried, resuming at the byte reached; then the job
    stops with one line naming the URL and the cause."""

    # seconds to reach the server (http(s), s3, gs); pipe: for the command's first output
    connect_timeout_s: float = 30.0
    # seconds a try may wait for more bytes (the server's answer, the next part of the file)
    read_timeout_s: float = 60.0
    # tries after the first failed one, per file (0.5 s, 1 s, 2 s, ... apart, at most 8 s); a
    # missing file (HTTP 404, no such object) and a refused one (HTTP 403) are not retried
    retries: int = 3

    def __post_init__(self):
        from cmunet.config import check

        check(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0 seconds")
        check(self.read_timeout_s > 0, "read_timeout_s", "must be > 0 seconds")
        check(self.retries >= 0, "retries", "must be >= 0")


_settings = RemoteConfig()


def configure(remote: RemoteConfig) -> None:
    """Read URLs with ``remote`` from now on in this process (a job calls it with its
    ``data.remote``; a :class:`~cmunet.data.stream.ShardStream` carries it into its workers)."""
    global _settings
    _settings = remote


def remote_config() -> RemoteConfig:
    return _settings


class ReadError(ValueError):
    """A file of a shard set cannot be read; ``str()`` is one line, ``"<url>: <cause>"``."""

    def __init__(self, url: str, cause: str | None = None):
        if cause is None:  # a message; torch re-raises a loader worker's error as
            # type(its traceback as text): keep the last line, the error itself
            lines = str(url).strip().splitlines() or [""]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            message = lines[-1].removeprefix(prefix)
        else:
            message = f"{public(url)}: {cause}"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self),)


class MissingFile(ReadError, FileNotFoundError):
    """The file is not at the URL (HTTP 404 or 410, no such object)."""


class _Failed(Exception):
    """A failed try, with the cause as it is shown; ``final``: retrying cannot help."""

    def __init__(self, cause: str, final: bool = False):
        super().__init__(cause)
        self.final = final


class _Reader(io.RawIOBase):
    """A file at a URL read front to back: each try opens it at the byte reached, and a failed
    try (time-out, dropped connection, server error, short body) is retried up to
    ``remote.retries`` times in all; then :class:`ReadError` naming the URL and the cause."""

    def __init__(self, url: str, remote: RemoteConfig):
        self.url, self.remote = url, remote
        self.offset, self.tries = 0, 0
        self.body = None  # the current try: .read(n), .close()
        self.size: int | None = None  # of the whole file, where the server says it

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.body is None:
                    self.body, self.size = _open_at(self.url, self.offset, self.remote)
                data = self.body.read(len(buffer))
                if not data and self.size is not None and self.offset < self.size:
                    raise _Failed(self._ended())
            except MissingFile:
                self._drop()
                raise
            except Exception as err:  # every library raises its own types
                self._drop()
                final = getattr(err, "final", False) or isinstance(err, PermissionError)
                if final or self.tries >= self.remote.retries:
                    tries = f" ({self.tries + 1} tries)" if self.tries else ""
                    cause = _cause(err, self.remote)
                    if "incompleteread" in cause.lower() and self.size is not None:
                        cause = self._ended()  # urllib3's words for a body cut short
                    raise ReadError(self.url, cause + tries) from None
                time.sleep(min(0.5 * 2 ** self.tries, 8.0))
                self.tries += 1
                continue
            buffer[:len(data)] = data
            self.offset += len(data)
            return len(data)

    def _ended(self) -> str:
        return f"the connection ended after {self.offset} of {self.size} bytes"

    def _drop(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def _cause(err: BaseException, remote: RemoteConfig) -> str:
    """One line saying why a try failed."""
    if isinstance(err, _Failed):
        return str(err)
    names = [type(e).__name__.lower() for e in (err, err.__cause__, err.__context__) if e]
    if any("timeout" in name for name in names):
        if any(name.startswith("connect") and "timeout" in name for name in names):
            return f"timed out: no connection within {remote.connect_timeout_s:g} s"
        return f"timed out: no answer within {remote.read_timeout_s:g} s"
    text = " ".join(str(err).split())
    refused = re.search(r"\[Errno -?\d+\] ([^\"')\]]+)", text)  # requests, aiohttp, botocore
    if refused and any("connect" in name for name in names):
        return f"cannot connect: {refused.group(1).strip()}"
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _open_at(url: str, offset: int, remote: RemoteConfig):
    """(body, size of the whole file or None) of one try reading ``url`` from byte ``offset``."""
    kind = scheme(url)
    if kind == "pipe":
        body, size = _Command(url[len(PIPE):], remote), None
    elif kind in ("http", "https"):
        body, size, offset = _http_at(url, offset, remote)
    else:
        return _fsspec_at(url, offset, remote)
    while offset > 0:  # the try starts at byte 0: skip what earlier tries delivered
        skipped = body.read(min(offset, 1 << 20))
        if not skipped:
            raise _Failed("the file is shorter than on the earlier try")
        offset -= len(skipped)
    return body, size


def _http_at(url: str, offset: int, remote: RemoteConfig):
    """(body, size, bytes to skip): a GET of ``url`` asking for the bytes from ``offset``."""
    import requests

    response = requests.get(url, headers={"Range": f"bytes={offset}-"} if offset else {},
                            stream=True, timeout=(remote.connect_timeout_s, remote.read_timeout_s))
    status = response.status_code
    if status >= 400:
        response.close()
        cause = f"HTTP {status} {response.reason or ''}".rstrip()
        if status in (404, 410):
            raise MissingFile(url, f"not found ({cause})")
        raise _Failed(cause, final=status < 500 and status not in (408, 429))
    skip = 0 if status == 206 else offset  # a server that ignores Range sends the whole file
    length = response.headers.get("Content-Length", "")
    size = int(length) + offset - skip if length.isdigit() else None
    response.raw.decode_content = False  # the bytes as stored (tarfile reads gzip itself)
    return response.raw, size, skip


def _fsspec_at(url: str, offset: int, remote: RemoteConfig):
    """(file, size) of an fsspec URL (s3, gs, ...) opened at ``offset``, with the time-outs set;
    s3fs's and botocore's own retries are off (the :class:`_Reader` retries), gcsfs keeps its
    own (fixed when the class is defined)."""
    import fsspec

    connect, read = remote.connect_timeout_s, remote.read_timeout_s
    options: dict = {}
    if scheme(url) in ("s3", "s3a"):
        options = {"config_kwargs": {"connect_timeout": connect, "read_timeout": read,
                                     "retries": {"total_max_attempts": 1}}}
    elif scheme(url) in ("gs", "gcs"):  # gcsfs passes it to every aiohttp request
        import aiohttp

        options = {"requests_timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=connect, sock_read=read)}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if scheme(url) in ("s3", "s3a"):
        fs.retries = 1  # tries per request (this instance: these options only)
    try:
        file = fs.open(path, "rb")
    except FileNotFoundError:
        raise MissingFile(url, "not found") from None
    file.seek(offset)
    return file, file.size


class _Command:
    """The standard output of a ``pipe:`` command: its first bytes within the connect time-out,
    then no pause longer than the read time-out; a non-zero exit status fails the try."""

    def __init__(self, command: str, remote: RemoteConfig):
        self.remote, self.started = remote, False
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                        stderr=self.errors, start_new_session=True)

    def read(self, n: int) -> bytes:
        wait = self.remote.read_timeout_s if self.started else self.remote.connect_timeout_s
        if not select.select([self.process.stdout], [], [], wait)[0]:
            raise _Failed(f"timed out: the command wrote nothing for {wait:g} s")
        self.started = True
        data = os.read(self.process.stdout.fileno(), n)
        if not data:
            try:
                code = self.process.wait(self.remote.read_timeout_s)
            except subprocess.TimeoutExpired:
                raise _Failed("timed out: the command closed its output but did not "
                              f"exit within {self.remote.read_timeout_s:g} s") from None
            if code != 0:
                self.errors.seek(0)
                said = " ".join(self.errors.read().decode(errors="replace").split())[-300:]
                raise _Failed(f"the command failed (exit {code})" + (f": {said}" if said else ""))
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the shell and what it started
            self.process.wait()
        self.process.stdout.close()
        self.errors.close()


# ---- writing (tools/shard.py --out URL) --------------------------------------------------------

def remote_fs(location: str):
    """(fsspec filesystem, path inside it) of a writable URL; ValueError for http(s) and pipe:."""
    kind = scheme(location)
    if kind in ("pipe", "http", "https"):
        raise ValueError(f"out={public(location)}: shards are written to a local folder or an "
                         "object store (s3://, gs://, ...); a web server or a pipe: is read only")
    import fsspec

    check(location, "out")
    return fsspec.core.url_to_fs(location)


def upload(folder: Path, location: str, last: str = "manifest.json", log=print) -> None:
    """Copy the files of ``folder`` to ``location`` with ``last`` (the manifest) copied last and
    removed first: a reader sees the old set, no set, or the whole new set, never half of one.
    Files at ``location`` that the new set lacks (shards of a larger earlier set) are removed."""
    fs, root = remote_fs(location)
    root = root.rstrip("/")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if fs.exists(f"{root}/{last}"):
        fs.rm_file(f"{root}/{last}")
    for name in [n for n in names if n != last] + [last]:
        fs.put_file(str(folder / name), f"{root}/{name}")
    stale = [p for p in _listing(fs, root) if p.rsplit("/", 1)[-1] not in names]
    for path in stale:
        fs.rm_file(path)
    fs.invalidate_cache()
    log(f"uploaded {len(names)} files to {public(location)}"
        + (f" (removed {len(stale)} files of the earlier set)" if stale else ""))


def _listing(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [p for p in fs.find(root) if p.rstrip("/") != root]
    except FileNotFoundError:
        return []


def remote_names(location: str) -> list[str]:
    """The files under the writable URL ``location``, as paths relative to it."""
    fs, root = remote_fs(location)
    root = root.rstrip("/")
    return [p[len(root) + 1:] for p in _listing(fs, root)]
