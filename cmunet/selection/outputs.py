"""What ``cmunet-select`` hands to annotators: ``picks.csv`` (the frames in pick order) and
``contact_sheet.png`` (their thumbnails, titled rank, patient and key)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from cmunet.data.stream import InMemorySet
from cmunet.evaluation.figures import contact_sheet

COLUMNS = ("rank", "key", "source", "patient", "score")


def write_picks(picks: Sequence[dict], path: Path) -> Path:
    """``picks`` (dicts with :data:`COLUMNS`) as CSV, written to a temporary name and renamed;
    a score that is not a number (the first k-center pick) is an empty cell."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for pick in picks:
            score = pick["score"]
            writer.writerow({**pick, "score": "" if math.isnan(score) else f"{score:.6g}"})
    os.replace(tmp, path)
    return path


def draw_picks(shards: str, picks: Sequence[dict], path: Path, ncols: int = 6) -> Path:
    """The contact sheet of ``picks``: each frame as stored in the shards (only these are read)."""
    frames = InMemorySet(shards, [p["key"] for p in picks], with_masks=False)
    images = [frames[i]["image"][0] for i in range(len(frames))]
    titles = [f"{p['rank']}. {p['patient']}\n{p['key']}" for p in picks]
    return contact_sheet(images, titles, path, ncols=ncols)
