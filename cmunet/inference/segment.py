"""The segmentation job: image files -> vessel masks, overlays and per-image diameters.

:func:`run_segment` reads one file or every image directly in a folder (PNG, JPEG, TIFF, DICOM;
every frame of a multi-frame DICOM), segments them as :func:`cmunet.inference.predict.segment` does,
``batch_size`` frames at a time, and writes to ``out``:

* ``masks/<name>.png`` -- uint8, 0 background / 255 vessel, at the image's original size;
* ``overlays/<name>.png`` -- the image in gray with the vessels blended in red;
* ``diameters.csv`` -- one row per image: mean, min and max vessel diameter along the skeleton
  (:func:`cmunet.evaluation.metrics.diameter_stats`), in mm when the pixel spacing is known (DICOM
  header, else the ``spacing`` argument), else in pixels; an empty mask gets empty cells and a note;
* ``errors.csv`` -- ``file, problem`` for every input that could not be used (header only if none);
* with ``outputs.probabilities``: ``probabilities/<name>.npy`` (float32) or ``.png`` (uint16,
  ``round(p x 65535)``), the vessel probability at the original size before the threshold;
* with ``outputs.dicom_seg``: ``dicom_seg/<stem>.dcm``, a DICOM Segmentation object of every
  DICOM input (all its frames), BINARY (the masks) or FRACTIONAL (the probabilities), referencing
  the source image (:mod:`cmunet.inference.dicom_seg`).

``<name>`` is the file's stem, ``<stem>_fNNNN`` for the frames of a multi-frame DICOM. Every file is
written to a temporary name and renamed, so no output is ever half-written. A bad input (unreadable,
corrupt, too small, constant, colour, or an output name already taken) is reported by name and
skipped; the others are processed. :attr:`SegmentReport.exit_code` turns the outcome into the exit
status of ``launch/segment.py``: 0 all done, 3 some inputs failed, 2 nothing segmented.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cmunet.config import check
from cmunet.data.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, BadInput, find_images, read_frames
from cmunet.evaluation.figures import OVERLAY_ALPHA, to_gray_uint8
from cmunet.evaluation.metrics import diameter_stats
from cmunet.inference.dicom_seg import SEG_TYPES, write_dicom_seg
from cmunet.inference.model import InferenceModel
from cmunet.inference.predict import SegmentOptions, storage_note, to_mask, vessel_probabilities
from cmunet.log import bar_disable
from cmunet.outdir import check_out

EXIT_OK = 0  # every input segmented
EXIT_NOTHING = 2  # nothing segmented: no usable image, or the model or arguments were unusable
EXIT_PARTIAL = 3  # some inputs failed (listed in errors.csv), the others were written

#: Overlay colour of vessel pixels (RGB).
VESSEL_COLOR = (255, 40, 40)
DIAMETER_COLUMNS = ("image", "file", "mean_diameter", "min_diameter", "max_diameter", "unit",
                    "spacing_row_mm", "spacing_col_mm", "skeleton_points", "vessel_pixels", "note")

Spacing = tuple[float, float]
PROBABILITY_FORMATS = ("npy", "png16")


@dataclass(frozen=True)
class OutputOptions:
    """What is written beside the masks, overlays and CSV files."""

    probabilities: str = ""  # "" (none), "npy" (float32) or "png16" (uint16, p x 65535)
    dicom_seg: str = ""  # "" (none), "binary" or "fractional": a SEG per DICOM input

    def __post_init__(self) -> None:
        check(self.probabilities in ("", *PROBABILITY_FORMATS), "probabilities",
              f"= {self.probabilities!r} must be one of {', '.join(PROBABILITY_FORMATS)}")
        check(self.dicom_seg in ("", *SEG_TYPES), "dicom_seg",
              f"= {self.dicom_seg!r} must be one of {', '.join(SEG_TYPES)}")


@dataclass
class SegmentReport:
    images: list[str] = field(default_factory=list)  # output names written, in input order
    errors: list[BadInput] = field(default_factory=list)  # inputs skipped, in input order

    @property
    def exit_code(self) -> int:
        if not self.images:
            return EXIT_NOTHING
        return EXIT_PARTIAL if self.errors else EXIT_OK

    def summary(self, out: Path) -> str:
        lines = [f"segmented {len(self.images)} image(s) into {out}"]
        if self.errors:
            lines.append(f"{len(self.errors)} input(s) failed (also in {out / 'errors.csv'}):")
            lines += [f"  {err}" for err in self.errors]
        return "\n".join(lines)


@dataclass
class _Frame:
    """A frame waiting for its batch."""

    name: str
    file: Path
    pixels: np.ndarray
    spacing: Spacing | None
    index: int = 0  # frame of its file
    count: int = 1  # frames in its file


class _SegFrames:
    """The per-frame results of DICOM files until every frame of a file is in: then its SEG."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder = kind, folder
        self.pending: dict[Path, list[np.ndarray | None]] = {}

    def add(self, frame: _Frame, mask: np.ndarray, probability: np.ndarray) -> BadInput | None:
        frames = self.pending.setdefault(frame.file, [None] * frame.count)
        frames[frame.index] = mask if self.kind == "binary" else probability
        if any(f is None for f in frames):
            return None
        del self.pending[frame.file]
        try:
            write_dicom_seg(frame.file, frames, self.kind, self.folder / f"{frame.file.stem}.dcm")
        except ValueError as err:
            return BadInput(frame.file, str(err))
        return None


def input_files(path: str | Path) -> list[Path]:
    """The image files to segment: ``path`` itself, or the images directly in the folder."""
    path = Path(path)
    if path.is_dir():
        return find_images(path)
    if not path.is_file():
        raise BadInput(path, "does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInput(path, f"is not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
    return [path]


def run_segment(model: InferenceModel, inputs: str | Path, out: str | Path,
                options: SegmentOptions, spacing: Spacing | None = None,
                progress: bool = True, outputs: OutputOptions = OutputOptions()) -> SegmentReport:
    """Segment ``inputs`` (a file or a folder) into ``out`` (see the module docstring).

    ``spacing`` (row, col mm) applies to images whose file gives none. Raises BadInput only when
    ``inputs`` holds no image file at all; problems with single files are collected in the report
    (a DICOM SEG that cannot be made is one, its masks are written all the same).
    """
    out = check_out(out, {"--input": inputs, "--model": model.weights.parent})
    files = input_files(inputs)
    folders = ["masks", "overlays"] + (["probabilities"] if outputs.probabilities else []) + \
        (["dicom_seg"] if outputs.dicom_seg else [])
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    writer = _Writer(model, options, outputs, out)
    report, rows = SegmentReport(), []
    pending: list[_Frame] = []
    sources: dict[str, Path] = {}  # output name -> the file that took it
    for path in tqdm(files, desc="segment", unit="file", disable=bar_disable(progress)):
        try:
            frames = read_frames(path)
        except BadInput as err:
            _skip(report, err)
            continue
        names = [path.stem] if len(frames) == 1 else [f"{path.stem}_f{i:04d}"
                                                      for i in range(len(frames))]
        taken = next((name for name in names if name in sources), None)
        if taken is not None:
            _skip(report, BadInput(path, f"its output name {taken} is taken by "
                                         f"{sources[taken].name}; rename one of the two"))
            continue
        for i, (name, frame) in enumerate(zip(names, frames)):
            sources[name] = path
            pending.append(_Frame(name, path, frame.pixels, frame.spacing or spacing, i,
                                  len(frames)))
        while len(pending) >= options.batch_size:
            rows += writer.batch(pending[:options.batch_size])
            del pending[:options.batch_size]
    rows += writer.batch(pending)
    for err in writer.errors:  # its masks were written
        report.errors.append(err)
        tqdm.write(f"warning: {err}", file=sys.stderr)
    report.images = [row["image"] for row in rows]
    write_csv(out / "diameters.csv", DIAMETER_COLUMNS, rows)
    write_csv(out / "errors.csv", ("file", "problem"),
              [{"file": err.path, "problem": err.problem} for err in report.errors])
    return report


def _skip(report: SegmentReport, err: BadInput) -> None:
    report.errors.append(err)
    tqdm.write(f"skipped {err}", file=sys.stderr)


class _Writer:
    """Segments batches of frames and writes their files."""

    def __init__(self, model: InferenceModel, options: SegmentOptions, outputs: OutputOptions,
                 out: Path):
        self.model, self.options, self.outputs, self.out = model, options, outputs, out
        self.seg = _SegFrames(outputs.dicom_seg, out / "dicom_seg") if outputs.dicom_seg else None
        self.errors: list[BadInput] = []

    def batch(self, frames: Sequence[_Frame]) -> list[dict]:
        """Segment ``frames``, write their files; their diameters.csv rows."""
        if not frames:
            return []
        probabilities = vessel_probabilities(self.model, [f.pixels for f in frames], self.options)
        rows = []
        for frame, probability in zip(frames, probabilities):
            mask = to_mask(probability, self.options)
            write_png(self.out / "masks" / f"{frame.name}.png", mask.astype(np.uint8) * 255)
            write_png(self.out / "overlays" / f"{frame.name}.png",
                      mask_overlay(frame.pixels, mask))
            if self.outputs.probabilities:
                write_probability(self.out / "probabilities" / frame.name, probability,
                                  self.outputs.probabilities)
            if self.seg is not None and frame.file.suffix.lower() in DICOM_SUFFIXES:
                error = self.seg.add(frame, mask, probability)
                if error is not None:
                    self.errors.append(error)
            note = storage_note(frame.pixels, self.model.preprocessing)
            rows.append(diameter_row(frame.name, frame.file.name, mask, frame.spacing, note))
        return rows


def write_probability(stem: Path, probability: np.ndarray, kind: str) -> None:
    """``stem.npy`` (float32) or ``stem.png`` (uint16, ``round(p x 65535)``), atomically."""
    if kind == "png16":
        write_png(stem.with_suffix(".png"),
                  np.rint(np.clip(probability, 0.0, 1.0) * 65535).astype(np.uint16))
        return
    path = stem.with_suffix(".npy")
    temporary = _temporary(path)
    try:
        with temporary.open("wb") as f:
            np.save(f, probability.astype(np.float32))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def diameter_row(name: str, file: str, mask: np.ndarray, spacing: Spacing | None,
                 note: str = "") -> dict:
    """The diameters.csv row of one mask (diameters in mm with ``spacing``, else in pixels)."""
    stats = diameter_stats(mask, spacing)
    row = {"image": name, "file": file, "unit": "mm" if spacing else "px",
           "spacing_row_mm": "" if spacing is None else spacing[0],
           "spacing_col_mm": "" if spacing is None else spacing[1],
           "vessel_pixels": int(mask.sum()), "note": note}
    if stats is None:
        why = ("empty mask: no vessel found" if not mask.any()
               else "no diameter: the mask covers the whole image")
        return row | {"note": "; ".join(filter(None, [why, note]))}
    return row | {"mean_diameter": f"{stats['mean']:.4f}", "min_diameter": f"{stats['min']:.4f}",
                  "max_diameter": f"{stats['max']:.4f}", "skeleton_points": stats["n_points"]}


def mask_overlay(pixels: np.ndarray, mask: np.ndarray,
                 alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8: the image in gray (:func:`~cmunet.evaluation.figures.to_gray_uint8`), vessel
    pixels blended with :data:`VESSEL_COLOR` at opacity ``alpha``."""
    rgb = np.repeat(to_gray_uint8(pixels)[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(VESSEL_COLOR, np.float32)
    return np.rint(rgb).astype(np.uint8)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write a uint8 gray or RGB (or uint16 gray) array as a PNG, atomically (temporary name,
    then rename)."""
    temporary = _temporary(path)
    try:
        Image.fromarray(pixels).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Write ``rows`` under the header ``columns`` (missing cells empty), atomically."""
    temporary = _temporary(path)
    try:
        with temporary.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
