"""Build WebDataset shards, a manifest and patient-grouped splits from folders of angiograms.

The output folder holds ``shard-NNNNNN.tar`` files, ``index.npz`` (every sample's key, patient,
spacing, source hash and statistics: :mod:`cmunet.data.index`), ``manifest.json`` (counts,
statistics, the shards and their SHA-256, no per-sample entries), ``splits.json`` (patient
lists: :mod:`cmunet.data.splits`) and ``config.yaml``. Each sample is ``<key>.image.png``
(lossless, uint8 or uint16), optionally ``<key>.mask.png`` (uint8, 0/255) and
``<key>.sample.json`` (patient group, pixel spacing).
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
from cmunet.data.cine import choose_frames
from cmunet.data.index import FORMAT, INDEX, OLD_FORMAT, SampleIndex, file_sha256
from cmunet.data.io import (IMAGE_SUFFIXES, BadInput, find_images, frame_count, read_frames,
                            read_mask)
from cmunet.data.meta import ImageMeta, load_meta, sample_key
from cmunet.data.png import encode_png
from cmunet.data.preprocess import PreprocessConfig, preprocess_image, preprocess_mask
from cmunet.data.splits import PAPER_RATIOS, SampleInfo, make_splits, pool_ids, save_splits
from cmunet.log import logger
from cmunet.outdir import (OutputError, check_out, foreign_name, names_in, not_replaceable,
                           remove_stale, temp_sibling)
from cmunet.preempt import default_sigterm, sigterm_exits

LOG = logger(__name__)
SET_FILES = ("manifest.json", INDEX, "splits.json", "config.yaml")  # besides its shards
PART_FORMAT = "cmunet-shards-part/1"  # one machine's part (--part i/n), for --merge
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
INDEX_NAME = re.compile(r"index(-\d{6})?\.npz")  # -NNNNNN: the generation after --append


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
    # which frames of multi-frame DICOM; contrast: the contrast phase (cmunet/data/cine.py)
    dicom_frames: Literal["all", "first", "middle", "contrast"] = "all"
    dicom_stride: int = 1  # then every N-th of those frames (1 = each)
    # dicom_frames=contrast: keep the frames scoring at least this fraction of the way from the
    # loop's lowest vessel-contrast score to its highest
    contrast_keep: float = 0.4
    dicom_max_frames: int = 0  # then at most this many per file, evenly spaced; 0 = no limit
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
        check(self.dicom_stride >= 1, "dicom_stride",
              f"must be >= 1, not {self.dicom_stride} (--dicom-stride N keeps every N-th frame)")
        check(0 <= self.contrast_keep <= 1, "contrast_keep", f"must be in [0, 1], not "
              f"{self.contrast_keep} (--contrast-keep: a fraction of the loop's score range)")
        check(self.dicom_max_frames >= 0, "dicom_max_frames",
              f"must be >= 0, not {self.dicom_max_frames} (--dicom-max-frames; 0 = no limit)")

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
    info: dict  # patient, spacing (and loop, frame of a cine loop): in the shard and manifest
    sha256: str
    mean: float
    std: float
    dtype: str
    mask_problem: dict | None = None  # {file, problem} of a bad mask skipped with skip_bad
    patient_known: bool = True  # False: no metadata or DICOM PatientID, the key stands in


def build_shards(cfg: ShardConfig, salt: str | None = None, log=LOG.info,
                 part: tuple[int, int] | None = None) -> dict:
    """Run the whole job; returns the manifest. Raises BadInput on the first bad file unless
    ``cfg.skip_bad``. An ``out`` URL (``s3://``, ``gs://``, ...) is written in a local temporary
    folder first, then uploaded (:func:`cmunet.data.location.upload`: manifest last). ``part``
    (i, n): only part i of n of the files, into a part folder that
    :func:`cmunet.data.parts.merge_parts` joins with the others."""
    if location.is_url(cfg.out):
        if part is not None:
            raise OutputError("--part writes a local folder: merge the parts (--merge), then "
                              "upload the set")
        return _build_remote(cfg, salt, log)
    start = time.perf_counter()
    out = check_out(cfg.out, {"images": cfg.images, "masks": cfg.masks, "meta": cfg.meta,
                              "test_list": cfg.test_list}, cfg.overwrite, _foreign_local,
                    must_be_new=True)
    remove_stale(out, log)
    cfg, files, masks, orphans, meta = inputs(cfg)
    salt = salt or os.environ.get("CMUNET_SALT") or os.urandom(16).hex()
    tmp = temp_sibling(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    with sigterm_exits():  # SIGTERM raises SystemExit here, so the temporary folder goes
        tmp.mkdir()
        try:
            manifest = _write(cfg, files, masks, meta, salt, tmp, log, part)
            manifest["orphan_masks"] = orphan_masks(masks, orphans, log)
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
        listed = ([s["name"] for s in manifest["shards"]]
                  if manifest["format"] in (FORMAT, OLD_FORMAT) else None)
        index = manifest.get("index", {}).get("name", INDEX)  # index-NNNNNN.npz after --append
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if listed is None:
        return "was not written by this tool (it has no manifest.json of the shard format)"
    ours = {*SET_FILES, *(n for n in listed if SHARD_NAME.fullmatch(str(n)))}
    if INDEX_NAME.fullmatch(str(index)):
        ours.add(index)
    name = foreign_name(names, ours)
    return name and f"holds {name}, which was not written by this tool (its manifest.json " \
                    "does not list it)"


def _foreign_local(folder: Path) -> str | None:
    return foreign_in_set(names_in(folder), (folder / "manifest.json").read_text)


def inputs(cfg: ShardConfig) -> tuple[ShardConfig, list[Path], dict[str, Path], list[str],
                                       dict[str, ImageMeta] | None]:
    """(cfg with its size resolved, the image files, the masks by key, the keys of masks
    without an image, the metadata): what a build or an append reads before processing."""
    files = find_images(cfg.images)
    if cfg.preprocess.size == 0:
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, size=_native_size(files, cfg)))
    masks = _index_masks(cfg.masks) if cfg.masks else {}
    orphans = sorted(set(masks) - {sample_key(f) for f in files})
    if orphans and not cfg.skip_bad:
        raise BadInput(masks[orphans[0]], f"mask without an image of the same name in "
                       f"{cfg.images} ({len(orphans)} such masks); rename or remove it, or pass "
                       "--skip-bad to list and ignore them")
    return cfg, files, masks, orphans, load_meta(cfg.meta) if cfg.meta else None


def orphan_masks(masks: dict[str, Path], orphans: list[str], log) -> list[str]:
    for key in orphans:
        log(f"skipped {masks[key]}: mask without an image of the same name")
    return [str(masks[key]) for key in orphans]


@dataclass
class Processed:
    """What processing a list of files gave: the samples (manifest records, in order), the shards
    written (name, count, SHA-256), skipped files, dropped masks, keys without a patient."""
    samples: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    dropped_masks: list[dict] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    dtype: str | None = None  # the storage type, when the samples are not listed (a merge)


def process_files(cfg: ShardConfig, files, masks, meta, salt: str, folder: Path, log,
                  shard_size: int, first_shard: int = 0, allow_empty: bool = False) -> Processed:
    """Process ``files`` in a pool of workers into shards ``shard-<first_shard>.tar``... in
    ``folder``; a BadInput (unless ``cfg.skip_bad``) or no usable image (unless
    ``allow_empty``: a part) raises."""
    jobs = [(f, masks.get(sample_key(f)), _meta_for(f, meta)) for f in files]
    workers = cfg.workers or len(os.sched_getaffinity(0))
    got = Processed()
    writer = _ShardWriter(folder, shard_size, first_shard)
    results = _run(jobs, cfg, salt, workers)
    try:
        _collect(results, cfg, writer, got.samples, got.skipped, got.dropped_masks, got.unknown,
                 log)
    finally:
        results.close()  # stops the worker pool at once, also on error
    got.shards = writer.close()
    if not got.samples and not allow_empty:
        raise BadInput(cfg.images, "no usable image (every file was skipped)")
    _check_patients(cfg, got.unknown, len(got.samples), log)
    for shard in got.shards:
        shard["sha256"] = file_sha256(folder / shard["name"])
    return got


def set_stats(index: SampleIndex, splits: dict) -> tuple[float, float]:
    """Mean and std over all pixels of the non-test samples of ``index`` (every sample when all
    are test samples), pooled from the per-image mean and std of equally sized images."""
    keep = np.ones(len(index), dtype=bool)
    keep[pool_ids(splits, "test", index=index)] = False
    keep |= not keep.any()
    means = index["mean"][keep].astype(np.float64)
    stds = index["std"][keep].astype(np.float64)
    mean = float(means.mean())
    return mean, math.sqrt(float((stds**2 + (means - mean) ** 2).mean()))


def shard_size(cfg: ShardConfig, files: list[Path]) -> int:
    """Samples per shard: ``cfg.shard_size``, else about 16 shards of at most 1000 samples, for
    the samples that ``files`` may give (every frame of a cine loop that the frame choice can
    keep, from the DICOM headers; an upper bound for ``contrast``)."""
    if cfg.shard_size:
        return cfg.shard_size
    samples = sum(_frames_kept(cfg, frame_count(path)) for path in files)
    return min(1000, max(1, math.ceil(samples / 16)))


def _frames_kept(cfg: ShardConfig, frames: int) -> int:
    if frames == 1:
        return 1
    kept = frames if cfg.dicom_frames in ("all", "contrast") else 1
    kept = math.ceil(kept / cfg.dicom_stride)
    return min(kept, cfg.dicom_max_frames) if cfg.dicom_max_frames else kept


def _write(cfg, files, masks, meta, salt, tmp: Path, log, part: tuple[int, int] | None) -> dict:
    if part is not None:
        return _write_part(cfg, files, masks, meta, salt, tmp, log, part)
    got = process_files(cfg, files, masks, meta, salt, tmp, log, shard_size(cfg, files))
    index = SampleIndex.from_records(got.samples, [s["name"] for s in got.shards])
    return write_set(cfg, index, got, tmp)


def write_set(cfg: ShardConfig, index: SampleIndex, got: Processed, folder: Path) -> dict:
    """Write the index and the splits of ``index`` (in shards ``got.shards`` of ``folder``);
    returns the manifest, to be written last."""
    splits = make_splits([SampleInfo(k, p, bool(lab)) for k, p, lab in zip(
        index.keys_of(np.arange(len(index))), index.patient_names_of(), index["labelled"])],
        seed=cfg.split_seed, test_fraction=cfg.test_fraction, ratios=cfg.ratios,
        test_keys=_read_test_list(cfg.test_list) if cfg.test_list else None)
    mean, std = set_stats(index, splits)
    index_sha256 = index.save(folder / INDEX)  # the shards first, then the index and splits
    save_splits(splits, folder / "splits.json")
    return {
        "format": FORMAT,
        "tool": f"cmunet {cmunet.__version__} tools/shard.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "count": len(index),
        "labelled": int(np.count_nonzero(index["labelled"])),
        "patients": len(index["patients"]),
        "size": cfg.preprocess.size,
        "dtype": got.samples[0]["dtype"] if got.samples else got.dtype,
        "mean": mean,
        "std": std,
        "stats_over": "non-test samples",
        "preprocess": to_dict(cfg.preprocess),
        "shards": got.shards,
        "index": {"name": INDEX, "sha256": index_sha256},
        "skipped": got.skipped,
        "dropped_masks": got.dropped_masks,
        # images without patient information, each counted as its own patient in the splits
        "patient_unknown": len(got.unknown),
    }


def _write_part(cfg, files, masks, meta, salt, tmp: Path, log, part: tuple[int, int]) -> dict:
    """Part i of n (``--part i/n``): the i-th of n runs of the input files, its index and a
    manifest of :data:`PART_FORMAT`, for :func:`cmunet.data.parts.merge_parts`."""
    number, of = part
    lo, hi = len(files) * (number - 1) // of, len(files) * number // of
    size = shard_size(cfg, files)
    got = process_files(cfg, files[lo:hi], masks, meta, salt, tmp, log, size, allow_empty=True)
    index = SampleIndex.from_records(got.samples, [s["name"] for s in got.shards])
    return {"format": PART_FORMAT, "part": number, "of": of, "files": len(files),
            "first_file": lo, "count": len(index), "size": cfg.preprocess.size,
            "dtype": got.samples[0]["dtype"] if got.samples else None,
            "shard_size": size, "shards": got.shards,
            "index": {"name": INDEX, "sha256": index.save(tmp / INDEX)},
            "skipped": got.skipped, "dropped_masks": got.dropped_masks, "unknown": got.unknown}


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
    chosen = [0] if len(frames) == 1 else choose_frames(
        [f.pixels for f in frames], cfg.dicom_frames, cfg.dicom_stride, cfg.contrast_keep,
        cfg.dicom_max_frames)
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
        info = {"patient": patient, "spacing": list(spacing) if spacing else None}
        if len(frames) > 1:  # a frame of a cine loop: the loop (its file's key) and frame index
            info.update(loop=key, frame=index)
        samples.append(Sample(
            key=key if len(frames) == 1 else f"{key}_f{index:04d}",
            image_png=encode_png(pixels), mask_png=mask_png, info=info,
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


class _ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of ``size`` samples, byte-reproducibly."""

    def __init__(self, folder: Path, size: int, first: int = 0):
        self.folder, self.size, self.first = folder, size, first  # first: the first one's number
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, sample: Sample) -> str:
        return self.add_members(sample.key, {
            "image.png": sample.image_png, "mask.png": sample.mask_png,
            "sample.json": json.dumps(sample.info, sort_keys=True).encode()})

    def add_members(self, key: str, members: dict[str, bytes | None]) -> str:
        """Write one sample's members (suffix -> bytes, None: left out); returns its shard."""
        if self.tar is None or self.shards[-1]["count"] >= self.size:
            self._close_current()
            name = f"shard-{self.first + len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "count": 0})
        for suffix, data in members.items():
            if data is not None:
                info = tarfile.TarInfo(f"{key}.{suffix}")
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
