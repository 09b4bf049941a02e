"""What the labelled frames of a label study's cells look like: for each cell of OUT/cells, the
frames it trained on (the union of its search folds' validation frames, folds.json), their
patients, views (SeriesDescription) and mask foreground, from xca-cadml's metadata.json.

    python docs/results/labels-picks.py runs/labels-pilot ../shared/data/xca-cadml/metadata.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def view(description: str) -> str:
    for name in ("Left", "Right"):
        if description.startswith(f"{name} Coronary"):
            return name
    return "other"


def main(out: Path, metadata: Path) -> None:
    cases = {c["case"]: c for c in json.loads(metadata.read_text())}
    print("| cell | frames | patients | views L/R/other | mean mask foreground | frames |")
    print("|---|---|---|---|---|---|")
    for cell in sorted((out / "cells").iterdir()):
        folds = cell / "folds.json"
        if not folds.is_file():
            continue
        keys = sorted({k for fold in json.loads(folds.read_text()) for k in fold["validation"]},
                      key=lambda k: int(k.removeprefix("case")))
        meta = [cases[k] for k in keys]
        views = [view(m.get("series_description", "")) for m in meta]
        counts = "/".join(str(views.count(v)) for v in ("Left", "Right", "other"))
        fg = sum(m["mask_fg"] for m in meta) / len(meta)
        print(f"| {cell.name} | {len(keys)} | {len({m['patient_group'] for m in meta})} | "
              f"{counts} | {fg:.3f} | {', '.join(keys)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
