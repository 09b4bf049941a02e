"""Where a shard set lives: a local folder or a URL.

``data.shards`` (and ``tools/shard.py --out``) is one of

* a local folder: ``/shared/shards/xca512``;
* an object store or web server, read through fsspec: ``s3://bucket/xca512``,
  ``gs://bucket/xca512``, ``https://host/xca512`` (any protocol fsspec knows);
* a WebDataset ``pipe:`` command that writes one file of the set to its standard output, with
  ``{name}`` where the file's name goes: ``pipe:aws s3 cp s3://bucket/xca512/{name} -``.

The small files (``manifest.json``, ``splits.json``) are read through fsspec (a ``pipe:``
command is run). The tar shards are opened by WebDataset's own URL handling (``gopen``: local
files, ``pipe:``, ``http(s)://`` with curl, ``gs://`` with gsutil); for the protocols gopen has no
handler for (``s3://`` among them) they are streamed through fsspec.

Credentials come from each tool's usual environment variables and files (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or ``~/.aws``; ``GOOGLE_APPLICATION_CREDENTIALS``;
...). A URL holding a password (``https://user:secret@host/...``) is refused: the location is
logged with the run's configuration, so it must not carry a secret.
"""

from __future__ import annotations

import shlex
import subprocess
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


def read_bytes(location: str | Path, name: str) -> bytes:
    """File ``name`` of the set at ``location``; FileNotFoundError when it is not there."""
    return read_file(join(location, name))


def read_file(url: str | Path) -> bytes:
    """The bytes of one file: a path, an fsspec URL or a ``pipe:`` command's output;
    FileNotFoundError when it is not there (or the command fails)."""
    url = str(url)
    if url.startswith(PIPE):
        result = subprocess.run(url[len(PIPE):], shell=True, capture_output=True)
        if result.returncode != 0:
            raise FileNotFoundError(f"{url} failed (exit {result.returncode}): "
                                    f"{result.stderr.decode(errors='replace').strip()[-300:]}")
        return result.stdout
    if not is_url(url):
        if not Path(url).is_file():
            raise FileNotFoundError(url)
        return Path(url).read_bytes()
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(public(url)) from None


def open_shard(url: str):
    """A binary stream of the tar at ``url``: WebDataset's gopen where it has a handler for the
    protocol (files, pipe:, http(s), gs), fsspec otherwise (s3 and the rest)."""
    kind = scheme(url)
    from webdataset.gopen import gopen, gopen_schemes  # the training stack: imported when used

    if kind in ("", "file") or kind in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def tar_samples(url: str):
    """The raw samples (dicts of member bytes, ``__key__``, ``__url__``) of the tar at ``url``,
    grouped as WebDataset groups them."""
    stream = open_shard(url)
    try:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        files = tar_file_expander(iter([{"url": url, "stream": stream}]))
        yield from group_by_keys(files)
    finally:
        stream.close()


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


def remote_is_empty(location: str) -> bool:
    fs, root = remote_fs(location)
    return not _listing(fs, root.rstrip("/"))
