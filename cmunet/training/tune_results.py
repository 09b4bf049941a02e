"""What the search's trials decide: ``trials.csv``, the winner, the grid edges it sits on and how
long it is retrained. No Ray here: a study reads these from finished searches."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from cmunet.training.tune_config import OPTIONAL, SearchConfig, searched


def write_table(table: Sequence[dict], folds: int, path: Path) -> None:
    """trials.csv: one row per trial (:func:`cmunet.training.search.trials_table`)."""
    optional = [name for name in OPTIONAL if any(name in row for row in table)]
    columns = ["trial_id", "lr", "batch_size", *optional, "status", "cv_dice", "cv_dice_std",
               "folds_done",
               *[f"fold{k}_{m}" for k in range(1, folds + 1) for m in ("dice", "best_epoch")],
               "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)


def choose(table: Sequence[dict]) -> dict:
    """The completed trial with the highest ``cv_dice`` (ties: the first trial)."""
    completed = [row for row in table if row["status"] == "COMPLETED"]
    if not completed:
        raise RuntimeError("no trial completed all its folds (see trials.csv and the Ray log "
                           "above); check the data and the lr range")
    return max(completed, key=lambda row: row["cv_dice"])


def edge_of_grid(best: dict, search: SearchConfig) -> list[str]:
    """One warning per searched dimension (:func:`searched`) of two or more values whose
    winning value is the smallest or the largest of them: the optimum may lie beyond the grid.
    A message starts with its short form, up to the first ": " (:func:`edge_labels`), e.g.
    ``lr=0.001 (top of [0.0001, 0.001])``. A two-value grid always has its winner on an edge;
    in random mode a drawn lr lies inside its range and is flagged only at an end of it. A
    bottom of 0 (an unlabelled weight of 0: off) is no edge: nothing lies below it."""
    messages = []
    for name in searched(search):
        grid, value = sorted(set(getattr(search, name))), best[name]
        if len(grid) < 2:
            continue
        edge = ("top" if math.isclose(value, grid[-1]) else
                "bottom" if math.isclose(value, grid[0]) and grid[0] > 0 else "")
        if edge:
            values = ", ".join(f"{v:g}" for v in grid)
            messages.append(f"{name}={value:g} ({edge} of [{values}]): the optimum may lie "
                            f"beyond the grid; widen search.{name} beyond it")
    return messages


def edge_labels(messages: Sequence[str]) -> str:
    """The short forms of :func:`edge_of_grid`'s messages, joined by "; " ("" for none)."""
    return "; ".join(message.split(": ", 1)[0] for message in messages)


def retrain_epochs(row: dict, folds: int) -> int:
    """The median of the folds' best epochs (rounded half up), at least 1."""
    median = statistics.median(row[f"fold{k}_best_epoch"] for k in range(1, folds + 1))
    return max(1, math.floor(median + 0.5))
