"""The sample index of a shard set: a few bytes per sample, memory-mapped, read lazily.

A set of format ``cmunet-shards/2`` keeps its per-sample metadata in ``index.npz`` beside the
shards, not in ``manifest.json`` (which holds the counts, the statistics and the shard list):
one column per field, the samples in shard and tar order, so a sample's id is its row. The
file is an uncompressed ``.npz`` (each column a ``.npy`` member) that is mapped straight from the
disk: a process reads only the pages it touches, and the ranks and loader workers of a machine
share them. A set at a URL is downloaded once per machine into a cache folder
(``$CMUNET_CACHE``, default ``~/.cache/cmunet``), checked against the SHA-256 its manifest lists,
and mapped from there. Nothing is unpickled.

=============== ==================== =========================================================
column          type                 per sample (rows), or as said
=============== ==================== =========================================================
key             S<n>                 the sample key (UTF-8)
key_order       int32                the rows sorted by key (lookups by key: binary search)
patient         int32                a row of ``patients``
patients        S<n>                 the patient names, sorted (one per patient)
labelled        bool                 the sample has a mask
spacing         float64 (n, 2)       pixel spacing in mm, NaN where unknown
mean, std       float32              the image's intensity statistics
sha256          uint8 (n, 32)        the source file's SHA-256 (:mod:`cmunet.data.overlap`)
shards          S<n>                 the shard file names, one per shard
shard_offsets   int64 (shards + 1)   shard s holds rows offsets[s] to offsets[s + 1] - 1
info_<name>     int32 or float32     an optional field of ``sample.json`` (the source loop, the
                                     frame index): -1 (NaN) where a sample has none
table_<name>    S<n>                 a text field's values (``info_<name>`` is a row of it)
=============== ==================== =========================================================

Sets of format ``cmunet-shards/1`` (every sample listed in ``manifest.json``) are read into the
same class, in memory; ``tools/shard.py --upgrade SET`` rewrites one in the new format.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import mmap
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cmunet.data import location

FORMAT = "cmunet-shards/2"  # manifest.json + index.npz
OLD_FORMAT = "cmunet-shards/1"  # every sample in manifest.json
INDEX = "index.npz"
REQUIRED = ("key", "key_order", "patient", "patients", "labelled", "spacing", "mean", "std",
            "sha256", "shards", "shard_offsets")


def load_manifest(shards: str | Path) -> Manifest:
    """The ``manifest.json`` of the shard set at ``shards`` (a folder or a URL: see
    :mod:`cmunet.data.location`)."""
    try:
        raw = location.read_bytes(shards, "manifest.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{location.public(location.join(shards, 'manifest.json'))} does "
                                f"not exist: is {location.public(shards)} a shard set written by "
                                "tools/shard.py?") from None
    if len(raw) < LARGE:
        return Manifest(json.loads(raw), shards)
    key = (str(shards), hashlib.sha256(raw).hexdigest())  # format 1: parsed once a process
    return _remember(key, lambda: Manifest(json.loads(raw), shards, key))


LARGE = 1 << 20  # bytes of a manifest that is parsed once a process (format 1 of a large set)
_REMEMBERED: dict = {}  # (location, SHA-256 of its manifest) -> its Manifest, SampleIndex


def _remember(key, make):
    """``make()``, kept for the next calls with ``key`` (the last four things made)."""
    if key not in _REMEMBERED:
        while len(_REMEMBERED) >= 4:
            _REMEMBERED.pop(next(iter(_REMEMBERED)))
        _REMEMBERED[key] = make()
    return _REMEMBERED[key]


class Manifest(dict):
    """A ``manifest.json`` (a dict, as in the file) of the set at ``shards``. The per-sample list
    ``"samples"`` that format 1 stored is built from the index the first time it is asked for:
    a list of dicts, costly for a large set, where :class:`SampleIndex` costs nothing."""

    def __init__(self, document: dict, shards: str | Path, key: tuple | None = None):
        super().__init__(document)
        self.shards, self.key = shards, key  # key: where it is remembered (a large one)

    def __missing__(self, name: str):
        if name != "samples" or self.get("format") != FORMAT:
            raise KeyError(name)
        records = SampleIndex.open(self.shards, self).records()
        self["samples"] = value = [{**r, "dtype": self.get("dtype")} for r in records]
        return value


class SampleIndex:
    """The samples of one shard set as columns (see the module docstring); ``ids`` everywhere
    are rows (sample ids)."""

    def __init__(self, columns: dict[str, np.ndarray], where: str = "index",
                 path: str | None = None):
        missing = [name for name in REQUIRED if name not in columns]
        if missing:
            raise ValueError(f"{where}: lacks the column(s) {', '.join(missing)}")
        self.columns, self.where, self.path = columns, where, path
        n, offsets = len(columns["key"]), columns["shard_offsets"]
        wrong = [name for name, a in columns.items() if name not in ("patients", "shards",
                 "shard_offsets") and not name.startswith("table_") and len(a) != n]
        if wrong or len(offsets) != len(columns["shards"]) + 1 or offsets[0] != 0 \
                or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{where}: the columns disagree in length "
                             f"({', '.join(wrong) or 'shard_offsets'}); rebuild the set")

    def __len__(self) -> int:
        return len(self.columns["key"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __reduce__(self):  # a mapped index is mapped again in another process, not copied
        if self.path is not None:
            return _mapped, (self.path, self.where)
        return SampleIndex, (self.columns, self.where)

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def open(cls, shards: str | Path, manifest: dict | None = None) -> SampleIndex:
        """The index of the set at ``shards`` (``manifest``: its manifest.json, if read)."""
        manifest = load_manifest(shards) if manifest is None else manifest
        where = location.public(location.join(shards, "manifest.json"))
        if manifest.get("format") == OLD_FORMAT:
            def build():
                return cls.from_records(manifest.get("samples", []),
                                        [s["name"] for s in manifest["shards"]], where)
            key = getattr(manifest, "key", None)
            return build() if key is None else _remember((*key, "index"), build)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("index"), dict):
            raise ValueError(f"{where}: format {manifest.get('format')!r} is not a shard set "
                             f"format this version reads ({FORMAT}, {OLD_FORMAT})")
        entry = manifest["index"]
        index = load_index_file(location.absolute(shards), entry["name"], entry["sha256"])
        if len(index) != manifest["count"]:
            raise ValueError(f"{index.where}: holds {len(index)} samples but the manifest "
                             f"{manifest['count']}: the set is damaged; rebuild it")
        return index

    def keys_of(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [k.decode() for k in self.columns["key"][np.asarray(ids, dtype=np.int64)]]

    def find(self, keys: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """(the ids of ``keys`` that are in the set, in their order; the keys that are not)."""
        keys = list(keys)
        ids, hit = _lookup(self.columns["key"], self.columns["key_order"], keys)
        return ids[hit], [k for k, h in zip(keys, hit) if not h]

    def patient_codes(self, names: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """(the rows of ``patients`` of ``names`` that are in the set; the names that are not)."""
        names = list(names)
        table = self.columns["patients"]
        codes, hit = _lookup(table, np.arange(len(table)), names)
        return codes[hit], [p for p, h in zip(names, hit) if not h]

    def of_patients(self, codes: np.ndarray) -> np.ndarray:
        """A boolean mask over the samples: those of the patients ``codes``."""
        chosen = np.zeros(len(self.columns["patients"]), dtype=bool)
        chosen[codes] = True
        return chosen[self.columns["patient"]]

    def patient_names(self, samples: np.ndarray) -> list[str]:
        """The distinct patients of ``samples`` (ids or a boolean mask), sorted."""
        codes = np.unique(self.columns["patient"][samples])
        return [self.columns["patients"][c].decode() for c in codes]

    def patient_names_of(self, ids: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """Each sample's patient (of ``ids``, default all), in their order."""
        names = [p.decode() for p in self.columns["patients"]]
        codes = self.columns["patient"] if ids is None else \
            self.columns["patient"][np.asarray(ids, dtype=np.int64)]
        return [names[c] for c in codes.tolist()]

    def patient_of(self) -> dict[str, str]:
        """Sample key -> patient, of every sample."""
        return dict(zip(self.keys_of(np.arange(len(self))), self.patient_names_of()))

    def shard_names(self) -> list[str]:
        return [name.decode() for name in self.columns["shards"]]

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.columns["shard_offsets"], ids, side="right") - 1

    def records(self, ids: Sequence[int] | np.ndarray | None = None) -> list[dict]:
        """The samples ``ids`` (default all) as the dicts a format-1 manifest listed."""
        c = self.columns
        ids = np.arange(len(self)) if ids is None else np.asarray(ids, dtype=np.int64)
        names, patients = self.shard_names(), c["patients"]
        infos = {name[5:]: (c[name], c.get(f"table_{name[5:]}")) for name in c
                 if name.startswith("info_")}
        out = []
        for i, shard in zip(ids.tolist(), self.shard_of(ids).tolist()):
            spacing = c["spacing"][i]
            record = {"key": c["key"][i].decode(), "patient": patients[c["patient"][i]].decode(),
                      "spacing": None if np.isnan(spacing).any() else spacing.tolist(),
                      "labelled": bool(c["labelled"][i]), "shard": names[shard],
                      "sha256": bytes(c["sha256"][i]).hex() if c["sha256"][i].any() else None,
                      "mean": float(c["mean"][i]), "std": float(c["std"][i])}
            for name, (values, table) in infos.items():
                value = values[i].item()
                if values.dtype.kind == "f" and not np.isnan(value):
                    record[name] = value
                elif values.dtype.kind != "f" and value >= 0:  # -1: the sample has none
                    record[name] = value if table is None else table[value].decode()
            out.append(record)
        return out

    # ---- writing -------------------------------------------------------------------------------
    @classmethod
    def from_records(cls, samples: list[dict], shards: list[str],
                     where: str = "index") -> SampleIndex:
        """The index of ``samples`` (dicts with key, patient, labelled, shard and optionally
        spacing, sha256, mean, std and further fields of ``sample.json``), which lie in the
        shards ``shards`` in that order, each shard's samples together."""
        position = {name: s for s, name in enumerate(shards)}
        shard_of = np.array([position.get(s["shard"], -1) for s in samples], dtype=np.int64)
        if np.any(shard_of < 0) or np.any(np.diff(shard_of) < 0):
            raise ValueError(f"{where}: the samples are not in the order of the shards listed")
        columns = {
            "key": _text([s["key"] for s in samples]),
            "labelled": np.array([bool(s["labelled"]) for s in samples], dtype=bool),
            "spacing": np.array([s.get("spacing") or (np.nan, np.nan) for s in samples],
                                dtype=np.float64).reshape(-1, 2),
            "mean": np.array([s.get("mean", np.nan) for s in samples], dtype=np.float32),
            "std": np.array([s.get("std", np.nan) for s in samples], dtype=np.float32),
            "sha256": np.array([np.frombuffer(bytes.fromhex(s.get("sha256") or "0" * 64),
                                              np.uint8) for s in samples],
                               dtype=np.uint8).reshape(-1, 32),
            "shards": _text(shards),
            "shard_offsets": np.searchsorted(shard_of, np.arange(len(shards) + 1)),
        }
        columns["patients"], columns["patient"] = _codes([str(s["patient"]) for s in samples])
        columns["key_order"] = _order(columns["key"])
        known = set(REQUIRED) | {"shard", "dtype"}
        for name in sorted({k for s in samples for k in s} - known):
            columns.update(_info(name, [s.get(name) for s in samples], where))
        return cls(columns, where)

    @classmethod
    def concat(cls, parts: Sequence[SampleIndex], where: str = "index") -> SampleIndex:
        """One index of ``parts`` laid end to end (their shards in that order); a key in two
        parts is a ValueError."""
        c = [p.columns for p in parts]
        columns = {name: np.concatenate([x[name] for x in c]) for name in
                   ("key", "labelled", "spacing", "mean", "std", "sha256", "shards")}
        columns["key_order"] = _order(columns["key"])
        ordered = columns["key"][columns["key_order"]]
        twice = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(twice):
            raise ValueError(f"{where}: the sample key {ordered[twice[0]].decode()!r} is in the "
                             "set twice")
        columns["patients"], columns["patient"] = _merged([(x["patients"], x["patient"])
                                                           for x in c])
        starts = np.cumsum([0] + [len(p) for p in parts])
        columns["shard_offsets"] = np.concatenate(
            [[0]] + [x["shard_offsets"][1:] + start for x, start in zip(c, starts)])
        for name in sorted({n[5:] for x in c for n in x if n.startswith("info_")}):
            kinds = {x[f"info_{name}"].dtype.kind + ("t" if f"table_{name}" in x else "")
                     for x in c if f"info_{name}" in x}
            if len(kinds) > 1:
                raise ValueError(f"{where}: the sample field {name!r} differs in type")
            kind = kinds.pop()
            missing = {"f": np.nan}.get(kind, -1)
            values = [x.get(f"info_{name}", np.full(len(p), missing, "f4" if kind == "f" else
                                                    "i4")) for x, p in zip(c, parts)]
            if kind == "it":  # text: the tables merged, each part's rows renumbered
                tables = [(x.get(f"table_{name}", np.zeros(0, "S1")), v) for x, v in zip(c, values)]
                columns[f"table_{name}"], codes = _merged(tables, keep_missing=True)
                columns[f"info_{name}"] = codes
            else:
                columns[f"info_{name}"] = np.concatenate(values)
        return cls(columns, where)

    def save(self, path: Path) -> str:
        """Write ``path`` (a temporary name, then renamed); returns its SHA-256."""
        with replacing(Path(path)) as tmp:
            with tmp.open("wb") as f:  # the columns by name: the same index, the same bytes
                np.savez(f, **dict(sorted(self.columns.items())))
            return file_sha256(tmp)


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary name beside ``path``, renamed to ``path`` when the block ends without an
    error (and removed when it raises): a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, document: dict) -> None:
    """``document`` as indented JSON in ``path``, through a temporary name."""
    with replacing(Path(path)) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")


def _text(values: Sequence[str]) -> np.ndarray:
    """Strings as UTF-8 bytes of one width."""
    try:
        return np.array(values, dtype="S") if len(values) else np.zeros(0, "S1")
    except UnicodeEncodeError:
        return np.array([v.encode() for v in values], dtype="S")


def _codes(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted distinct values, each value's row in them as int32)."""
    table, codes = np.unique(_text(values), return_inverse=True)
    return table, codes.astype(np.int32).reshape(-1)


def _merged(parts: list[tuple[np.ndarray, np.ndarray]],
            keep_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(one sorted table of the values of ``parts``' tables, their codes renumbered into it and
    laid end to end); with ``keep_missing`` a code of -1 stays -1."""
    table = np.unique(np.concatenate([t for t, _ in parts]))
    codes = []
    for part_table, part_codes in parts:
        new = np.searchsorted(table, part_table).astype(np.int32)
        renumbered = new[part_codes] if len(new) else np.zeros(len(part_codes), np.int32)
        if keep_missing:
            renumbered = np.where(part_codes < 0, -1, renumbered).astype(np.int32)
        codes.append(renumbered)
    return table, np.concatenate(codes)


def _order(keys: np.ndarray) -> np.ndarray:
    if len(keys) >= 2**31:
        raise ValueError(f"a shard set holds at most {2**31 - 1} samples")
    return np.argsort(keys, kind="stable").astype(np.int32)


def _info(name: str, values: list, where: str) -> dict[str, np.ndarray]:
    """The columns of an optional per-sample field: integers, or text (with its table)."""
    given = [v for v in values if v is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in given):
        return {f"info_{name}": np.array([-1 if v is None else v for v in values], np.int32)}
    if all(isinstance(v, str) for v in given):
        table, codes = _codes(given)
        column = np.full(len(values), -1, dtype=np.int32)
        column[[i for i, v in enumerate(values) if v is not None]] = codes
        return {f"info_{name}": column, f"table_{name}": table}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given):
        return {f"info_{name}": np.array([np.nan if v is None else v for v in values],
                                         np.float32)}
    raise ValueError(f"{where}: the sample field {name!r} is neither a number nor a text")


def _lookup(table: np.ndarray, order: np.ndarray,
            names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the row of each name in ``table`` — sorted by ``order`` — or 0; whether it is there)."""
    wanted = _text(names)
    if not len(table) or not len(wanted):
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    position = np.minimum(np.searchsorted(table, wanted, sorter=order), len(table) - 1)
    rows = np.asarray(order[position], dtype=np.int64)
    return rows, table[rows] == wanted


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ---- loading index.npz ---------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def load_index_file(shards: str, name: str, sha256: str) -> SampleIndex:
    """The index file ``name`` of the set at ``shards``: mapped from the folder, or from a copy
    in the cache folder for a URL (kept by its SHA-256, so a new index is a new file)."""
    url = location.join(shards, name)
    if not location.is_url(shards):
        if not Path(url).is_file():
            raise FileNotFoundError(f"{url} does not exist: the shard set is incomplete; "
                                    "rebuild it with tools/shard.py")
        return _mapped(url, url)
    cache = Path(os.environ.get("CMUNET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                        Path.home() / ".cache") / "cmunet")
    cache /= "index"
    path = cache / f"{sha256}.npz"
    if path.is_file():
        return _mapped(str(path), location.public(url))
    data = location.read_file(url)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise location.ReadError(url, "differs from the SHA-256 its manifest lists: the set "
                                      "is damaged or being rewritten")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_bytes(data)
    except OSError:  # no writable cache: hold it in memory
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return SampleIndex({k: arrays[k] for k in arrays.files}, location.public(url))
    return _mapped(str(path), location.public(url))


def _mapped(path: str, where: str) -> SampleIndex:
    """The index at ``path`` with every column mapped read-only from the file."""
    try:
        with open(path, "rb") as f:
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            columns = {}
            for member in zipfile.ZipFile(f).infolist():
                columns[member.filename.removesuffix(".npy")] = _member(f, member, whole)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"{where}: not an index file of this tool ({err}); rebuild the "
                         "set with tools/shard.py") from None
    return SampleIndex(columns, where, path)


def _member(f, member: zipfile.ZipInfo, whole: mmap.mmap) -> np.ndarray:
    """One stored (uncompressed) ``.npy`` member of a zip file, as a view of ``whole``."""
    if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy"):
        raise ValueError(f"{member.filename} is compressed or not an array")
    f.seek(member.header_offset)
    local = f.read(30)  # the local file header: its name and extra field come before the data
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"{member.filename}: no local header")
    f.seek(member.header_offset + 30 + int.from_bytes(local[26:28], "little")
           + int.from_bytes(local[28:30], "little"))
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{member.filename}: .npy version {version}")
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"{member.filename} holds Python objects")
    count = int(np.prod(shape))
    array = np.frombuffer(whole, dtype, count, f.tell()) if count else np.zeros(0, dtype)
    return array.reshape(shape, order="F" if fortran else "C")
