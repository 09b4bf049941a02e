"""Per-image metadata files: which patient each image belongs to, and its pixel spacing.

Two formats are read:

* CSV with a header holding ``image`` (file name, with or without extension) and ``patient``,
  optionally ``spacing_mm`` (one number: square pixels) — what ``tools/synth.py`` writes;
* JSON: a list of objects with ``case`` or ``image`` and ``patient_group`` or ``patient``, optionally
  ``imager_pixel_spacing_mm`` or ``spacing_mm`` (a number or [row, col]) — the layout of the
  xca-cadml ``metadata.json``.

Patient values are stored as given: put pseudonyms in your metadata file, not hospital numbers.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from cmunet.data.io import BadInput


@dataclass(frozen=True)
class ImageMeta:
    patient: str
    spacing: tuple[float, float] | None = None


def sample_key(path: str | Path) -> str:
    """The WebDataset key of an image file: its stem, with dots (extension separators) replaced."""
    return Path(path).stem.replace(".", "_")


def load_meta(path: str | Path) -> dict[str, ImageMeta]:
    """``{sample key: ImageMeta}`` from a CSV or JSON metadata file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(path, "metadata file does not exist")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise BadInput(path, "a JSON metadata file must hold a list of objects")
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise BadInput(path, f"cannot parse metadata ({type(err).__name__}: {err})") from None
    table: dict[str, ImageMeta] = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("image") or row.get("case")
        patient = row.get("patient") or row.get("patient_group")
        if not name or not patient:
            raise BadInput(path, f"entry {number} lacks an 'image' (or 'case') and a 'patient' "
                                 "(or 'patient_group') value")
        key = sample_key(name)
        if key in table:
            raise BadInput(path, f"image {name!r} is listed twice")
        spacing = row.get("spacing_mm", row.get("imager_pixel_spacing_mm"))
        table[key] = ImageMeta(str(patient), _spacing(path, number, spacing))
    return table


def _spacing(path: Path, number: int, value) -> tuple[float, float] | None:
    if value is None or value == "" or value == []:
        return None
    try:
        if isinstance(value, (list, tuple)):
            row, col = (float(v) for v in value)
        else:
            row = col = float(value)
    except (TypeError, ValueError):
        raise BadInput(path, f"entry {number}: pixel spacing {value!r} is not a number "
                             "or a [row, col] pair") from None
    if row <= 0 or col <= 0:
        raise BadInput(path, f"entry {number}: pixel spacing must be positive, got {value!r}")
    return row, col
