"""Build WebDataset shards, a manifest and patient-grouped splits from folders of angiograms.

The output folder holds ``shard-NNNNNN.tar`` files, ``manifest.json``, ``splits.json`` and
``config.yaml``. Each sample is ``<key>.image.png`` (lossless, uint8 or uint16), optionally
``<key>.mask.png`` (uint8, 0/255) and ``<key>.sample.json`` (patient group, pixel spacing).
Everything is written to a temporary folder beside the output and renamed at the end, so a failed
or terminated (SIGTERM) run leaves nothing behind; a later run removes the temporary folders of
killed runs (SIGKILL). ``overwrite`` replaces only an empty folder or an earlier output of this
tool holding nothing but the files its manifest lists (see :mod:`cmunet.outdir`), never an
input. An output URL (``s3://``, ``gs://``) is built locally, then uploaded with the manifest
last. Intensity statistics (for the dataset z-score) are
computed over the non-test samples only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

import cmunet
from cmunet.config import check, save_config, to_dict
from cmunet.data import location
from cmunet.data.io import IMAGE_SUFFIXES, BadInput, find_images, read_frames, read_mask
from cmunet.data.meta import ImageMeta, load_meta, sample_key
from cmunet.data.png import encode_png
from cmunet.data.preprocess import PreprocessConfig, preprocess_image, preprocess_mask
from cmunet.data.splits import PAPER_RATIOS, SampleInfo, make_splits, save_splits
from cmunet.log import logger
from cmunet.outdir import (OutputError, check_out, foreign_name, names_in, not_replaceable,
                           remove_stale, temp_sibling)
from cmunet.preempt import default_sigterm, sigterm_exits

LOG = logger(__name__)
FORMAT = "cmunet-shards/1"
SET_FILES = ("manifest.json", "splits.json", "config.yaml")  # besides the shards it lists
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


@dataclass
class ShardConfig:
    images: str = ""  # folder of PNG/JPEG/TIFF/DICOM images
    masks: str | None = None  # folder of binary masks with the images' stems
    meta: str | None = None  # CSV or JSON: image -> patient (and pixel spacing)
    out: str = ""  # output folder, or an object-store URL (s3://, gs://): built here, uploaded
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    workers: int = 0  # processes; 0 = every core
    skip_bad: bool = False  # skip (and list) bad files instead of stopping
    overwrite: bool = False
    shard_size: int = 0  # samples per shard; 0 = about 16 shards, at most 1000 samples each
    dicom_frames: Literal["all", "first", "middle"] = "all"  # which frames of multi-frame DICOM
    split_seed: int = 0
    test_fraction: float = 0.2
    ratios: list[str] = field(default_factory=lambda: list(PAPER_RATIOS))
    test_list: str | None = None  # file of image names forming an official test split
    # stop when an image has no patient (no metadata entry, no DICOM PatientID) instead of
    # counting it as its own patient with a warning (frames of one patient could then land on
    # both sides of the split)
    require_patient: bool = False

    def __post_init__(self) -> None:
        check(bool(self.images), "images", "is required (a folder of images)")
        check(bool(self.out), "out", "is required (the output folder)")
        check(self.workers >= 0, "workers", "must be >= 0")
        check(self.shard_size >= 0, "shard_size", "must be >= 0")
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")

    @classmethod
    def for_folder(cls, folder: str | Path, out: str | Path, **keys) -> ShardConfig:
        """The config for FOLDER/images, FOLDER/masks and FOLDER/meta.csv (what tools/synth.py
        writes) sharded into ``out``; ``keys`` set any other field."""
        folder = Path(folder)
        return cls(images=str(folder / "images"), masks=str(folder / "masks"),
                   meta=str(folder / "meta.csv"), out=str(out), **keys)


@dataclass
class Sample:
    """One preprocessed sample, ready to be written (produced in a worker process)."""

    key: str
    image_png: bytes
    mask_png: bytes | None
    info: dict  # patient, spacing: stored in the shard and the manifest
    sha256: str
    mean: float
    std: float
    dtype: str
    mask_problem: dict | None = None  # {file, problem} of a bad mask skipped with skip_bad
    patient_known: bool = True  # False: no metadata or DICOM PatientID, the key stands in


def build_shards(cfg: ShardConfig, salt: str | None = None, log=LOG.info) -> dict:
    """Run the whole job; returns the manifest. Raises BadInput on the first bad file unless
    ``cfg.skip_bad``. An ``out`` URL (``s3://``, ``gs://``, ...) is written in a local temporary
    folder first, then uploaded (:func:`cmunet.data.location.upload`: manifest last)."""
    if location.is_url(cfg.out):
        return _build_remote(cfg, salt, log)
    start = time.perf_counter()
    out = check_out(cfg.out, {"images": cfg.images, "masks": cfg.masks, "meta": cfg.meta,
                              "test_list": cfg.test_list}, cfg.overwrite, _foreign_local,
                    must_be_new=True)
    remove_stale(out, log)
    files = find_images(cfg.images)
    if cfg.preprocess.size == 0:
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, size=_native_size(files, cfg)))
    masks = _index_masks(cfg.masks) if cfg.masks else {}
    orphans = sorted(set(masks) - {sample_key(f) for f in files})
    if orphans and not cfg.skip_bad:
        raise BadInput(masks[orphans[0]], f"mask without an image of the same name in "
                       f"{cfg.images} ({len(orphans)} such masks); rename or remove it, or pass "
                       "--skip-bad to list and ignore them")
    meta = load_meta(cfg.meta) if cfg.meta else None
    salt = salt or os.environ.get("CMUNET_SALT") or os.urandom(16).hex()
    tmp = temp_sibling(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    with sigterm_exits():  # SIGTERM raises SystemExit here, so the temporary folder goes
        tmp.mkdir()
        try:
            manifest = _write(cfg, files, masks, meta, salt, tmp, log)
            manifest["orphan_masks"] = [str(masks[key]) for key in orphans]
            for key in orphans:
                log(f"skipped {masks[key]}: mask without an image of the same name")
            manifest["seconds"] = round(time.perf_counter() - start, 2)
            _write_json(tmp / "manifest.json", manifest)
            save_config(cfg, tmp / "config.yaml")
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def _build_remote(cfg: ShardConfig, salt: str | None, log) -> dict:
    """Build in a local temporary folder, then upload to the URL ``cfg.out``. The same rule as
    for a folder: an existing set is replaced only with ``overwrite``, other files never."""
    target = cfg.out
    try:
        names = location.remote_names(target)
    except ValueError as err:  # a read-only protocol, a password in the URL
        raise OutputError(str(err)) from None
    if names:
        where = location.public(target)
        if not cfg.overwrite:
            raise OutputError(f"{where} already exists; choose another --out or pass --overwrite")
        reason = foreign_in_set(names, lambda: location.read_bytes(target, "manifest.json"))
        if reason:
            raise not_replaceable(where, reason)
    with tempfile.TemporaryDirectory(prefix="cmunet-shards-") as tmp:
        local = Path(tmp) / "out"
        manifest = build_shards(replace(cfg, out=str(local), overwrite=False), salt, log)
        save_config(cfg, local / "config.yaml")  # names the URL, not the temporary folder
        try:
            location.upload(local, target, log=log)
        except OSError as err:  # no such bucket, no permission, no connection
            raise OutputError(f"uploading to {location.public(target)} failed: {err}") from None
    return manifest


def foreign_in_set(names: list[str], read_manifest) -> str | None:
    """Why an existing output holding ``names`` (paths relative to it) may not be replaced: it
    has no manifest.json of the shard format, or it holds a file that is neither one of the
    shards its manifest lists nor one of :data:`SET_FILES`. None for an earlier set holding
    nothing else (what --overwrite may replace)."""
    try:
        manifest = json.loads(read_manifest())
        listed = [s["name"] for s in manifest["shards"]] if manifest["format"] == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        return "was not written by this tool (it has no manifest.json of the shard format)"
    name = foreign_name(names, {*SET_FILES, *(n for n in listed if SHARD_NAME.fullmatch(str(n)))})
    return name and f"holds {name}, which was not written by this tool (its manifest.json " \
                    "does not list it)"


def _foreign_local(folder: Path) -> str | None:
    return foreign_in_set(names_in(folder), (folder / "manifest.json").read_text)


def _write(cfg, files, masks, meta, salt, tmp: Path, log) -> dict:
    jobs = [(f, masks.get(sample_key(f)), _meta_for(f, meta)) for f in files]
    workers = cfg.workers or len(os.sched_getaffinity(0))
    samples: list[dict] = []
    skipped: list[dict] = []
    dropped_masks: list[dict] = []
    unknown: list[str] = []  # keys of images without patient information
    shard_size = cfg.shard_size or min(1000, max(1, math.ceil(len(files) / 16)))
    writer = _ShardWriter(tmp, shard_size)
    results = _run(jobs, cfg, salt, workers)
    try:
        _collect(results, cfg, writer, samples, skipped, dropped_masks, unknown, log)
    finally:
        results.close()  # stops the worker pool at once, also on error
    shards = writer.close()
    if not samples:
        raise BadInput(cfg.images, "no usable image (every file was skipped)")
    _check_patients(cfg, unknown, len(samples), log)
    dtypes = sorted({s["dtype"] for s in samples})
    splits = make_splits([SampleInfo(s["key"], s["patient"], s["labelled"]) for s in samples],
                         seed=cfg.split_seed, test_fraction=cfg.test_fraction, ratios=cfg.ratios,
                         test_keys=_read_test_list(cfg.test_list) if cfg.test_list else None)
    save_splits(splits, tmp / "splits.json")
    test = set(splits["test"]["keys"])
    mean, std = _pooled_stats([s for s in samples if s["key"] not in test] or samples)
    return {
        "format": FORMAT,
        "tool": f"cmunet {cmunet.__version__} tools/shard.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "count": len(samples),
        "labelled": sum(s["labelled"] for s in samples),
        "patients": len({s["patient"] for s in samples}),
        "size": cfg.preprocess.size,
        "dtype": dtypes[0],
        "mean": mean,
        "std": std,
        "stats_over": "non-test samples",
        "preprocess": to_dict(cfg.preprocess),
        "shards": shards,
        "samples": samples,
        "skipped": skipped,
        "dropped_masks": dropped_masks,
        # images without patient information, each counted as its own patient in the splits
        "patient_unknown": len(unknown),
    }


def _collect(results, cfg: ShardConfig, writer, samples: list, skipped: list,
             dropped_masks: list, unknown: list, log) -> None:
    """Write each processed file's samples in input order; record skipped files and masks, and
    the keys of samples without patient information."""
    seen: set[str] = set()
    first: tuple[Path, str] | None = None  # the first image's file and storage type
    for path, result in results:
        if not isinstance(result, BadInput) and result:
            first = first or (path, result[0].dtype)
            if result[0].dtype != first[1]:
                result = BadInput(path, f"is stored as {result[0].dtype} but {first[0].name} and "
                                        f"the images before it as {first[1]}; convert the images "
                                        "to one bit depth (or --skip-bad to skip such files)")
        if isinstance(result, BadInput):
            if not cfg.skip_bad:
                raise result
            skipped.append({"file": result.path, "problem": result.problem})
            log(f"skipped {result}")
            continue
        for sample in result:
            if sample.key in seen:
                raise BadInput(path, f"two inputs share the sample key {sample.key!r}; "
                                     "rename one of them")
            seen.add(sample.key)
            if sample.mask_problem:
                dropped_masks.append(sample.mask_problem)
                log(f"mask dropped, image kept unlabelled: {sample.mask_problem['file']}: "
                    f"{sample.mask_problem['problem']}")
            if not sample.patient_known:
                unknown.append(sample.key)
            shard = writer.add(sample)
            samples.append({"key": sample.key, **sample.info,
                            "labelled": sample.mask_png is not None, "shard": shard,
                            "sha256": sample.sha256, "mean": sample.mean, "std": sample.std,
                            "dtype": sample.dtype})


def _check_patients(cfg: ShardConfig, unknown: list[str], total: int, log) -> None:
    """Warn about (or, with ``require_patient``, refuse) images without patient information."""
    if not unknown:
        return
    message = (f"{len(unknown)} of {total} images have no patient information (no metadata "
               f"entry, no DICOM PatientID), e.g. {', '.join(unknown[:3])}")
    if cfg.require_patient:
        raise BadInput(cfg.images, f"{message}; give --meta FILE (image,patient), or drop "
                                   "--require-patient to count each as its own patient")
    log(f"warning: {message}: each counts as its own patient, so frames of one patient may land "
        "on both sides of the split (manifest: patient_unknown); give --meta FILE, or "
        "--require-patient to make this an error")


def _run(jobs, cfg: ShardConfig, salt: str, workers: int) -> Iterator[tuple[Path, list | BadInput]]:
    """Process files in parallel, yielding results in input order, with a progress bar."""
    from tqdm import tqdm

    args = [(job, cfg, salt) for job in jobs]
    bar = dict(total=len(jobs), unit="img", desc="sharding", disable=None, mininterval=1)
    if workers <= 1:
        for arg in tqdm(args, **bar):
            yield arg[0][0], _process(arg)
        return
    with Pool(min(workers, len(jobs)), initializer=default_sigterm) as pool:
        results = pool.imap(_process, args, chunksize=4)
        for arg, result in tqdm(zip(args, results), **bar):
            yield arg[0][0], result


def _process(arg) -> list[Sample] | BadInput:
    (path, mask_path, meta), cfg, salt = arg
    try:
        return _samples_of(path, mask_path, meta, cfg, salt)
    except BadInput as err:
        return err


def _samples_of(path: Path, mask_path: Path | None, meta: ImageMeta | None | Exception,
                cfg: ShardConfig, salt: str) -> list[Sample]:
    if isinstance(meta, Exception):
        raise meta
    frames = read_frames(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    chosen = {"all": range(len(frames)), "first": [0], "middle": [len(frames) // 2]}[cfg.dicom_frames]
    key = sample_key(path)
    samples = []
    for index in chosen:
        frame = frames[index]
        pixels = preprocess_image(frame.pixels, cfg.preprocess)
        mask_png, problem = None, None
        if mask_path is not None and len(frames) == 1:
            try:
                mask = preprocess_mask(read_mask(mask_path, frame.pixels.shape), cfg.preprocess)
                if not mask.any():
                    raise BadInput(mask_path, "mask is empty after preprocessing")
                mask_png = encode_png(mask.astype(np.uint8) * 255)
            except BadInput as err:
                if not cfg.skip_bad:
                    raise
                problem = {"file": err.path, "problem": err.problem}
        if meta is not None:
            patient = meta.patient
        elif frame.patient_id:
            patient = _pseudonym(frame.patient_id, salt)
        else:
            patient = key  # no grouping information: every image is its own patient (warned)
        spacing = meta.spacing if meta is not None and meta.spacing else frame.spacing
        if spacing is not None and cfg.preprocess.fit == "resize":
            factor = min(frame.pixels.shape) / cfg.preprocess.size
            spacing = (spacing[0] * factor, spacing[1] * factor)
        values = pixels.astype(np.float64)
        samples.append(Sample(
            key=key if len(frames) == 1 else f"{key}_f{index:04d}",
            image_png=encode_png(pixels), mask_png=mask_png,
            info={"patient": patient, "spacing": list(spacing) if spacing else None},
            sha256=digest, mean=float(values.mean()), std=float(values.std()),
            dtype=str(pixels.dtype), mask_problem=problem,
            patient_known=meta is not None or bool(frame.patient_id)))
    return samples


def _native_size(files: list[Path], cfg: ShardConfig) -> int:
    """The shorter side of the first readable image (the output size when none is given)."""
    for path in files:
        try:
            return min(read_frames(path)[0].pixels.shape)
        except BadInput:
            if not cfg.skip_bad:
                raise
    raise BadInput(cfg.images, "no readable image")


def _meta_for(path: Path, meta: dict[str, ImageMeta] | None) -> ImageMeta | None | BadInput:
    if meta is None:
        return None
    entry = meta.get(sample_key(path))
    return entry if entry is not None else BadInput(path, "is not listed in the metadata file")


def _pseudonym(patient_id: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:12]


def _index_masks(folder: str) -> dict[str, Path]:
    path = Path(folder)
    if not path.is_dir():
        raise BadInput(path, "mask folder does not exist")
    return {sample_key(p): p for p in sorted(path.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _read_test_list(path: str) -> set[str]:
    file = Path(path)
    if not file.is_file():
        raise BadInput(file, "test list does not exist")
    names = [line.strip() for line in file.read_text().splitlines()]
    return {sample_key(n) for n in names if n and not n.startswith("#")}


def _pooled_stats(samples: list[dict]) -> tuple[float, float]:
    """Mean and std over all pixels of equally sized images, from per-image mean and std."""
    means = np.array([s["mean"] for s in samples])
    stds = np.array([s["std"] for s in samples])
    mean = float(means.mean())
    var = float((stds**2 + (means - mean) ** 2).mean())
    return mean, math.sqrt(var)


class _ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of ``size`` samples, byte-reproducibly."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, sample: Sample) -> str:
        if self.tar is None or self.shards[-1]["count"] >= self.size:
            self._close_current()
            name = f"shard-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "count": 0})
        members = {"image.png": sample.image_png, "mask.png": sample.mask_png,
                   "sample.json": json.dumps(sample.info, sort_keys=True).encode()}
        for suffix, data in members.items():
            if data is not None:
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                self.tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["count"] += 1
        return self.shards[-1]["name"]

    def _close_current(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing output is replaced only after success."""
    if out.exists():
        old = temp_sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
