"""The numbers of a study's reports: mean ± std over seeds, the paired gain over the reference
arm with its t interval, and how many cells' search winners sat on an edge of their grid."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

UNKNOWN = "unknown"  # grid_edge of a cell whose search predates that record


def mean_std(values: list[float]) -> str:
    """``0.812 ± 0.034`` over the finite values (sample SD; 0 for one), "–" for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {std:.3f}"


def paired_gain(rows: list[dict], arm: str, budget: str,
                reference: str) -> tuple[float, float, float, int] | None:
    """(mean, low, high, n): the mean Dice gain over the reference arm on the same seeds, with a
    95 % t interval (low = high = mean for one pair); None without a pair."""
    from scipy import stats

    mine = {r["seed"]: r["dice"] for r in rows if r["arm"] == arm and r["budget"] == budget}
    base = {r["seed"]: r["dice"] for r in rows if r["arm"] == reference and r["budget"] == budget}
    diffs = [mine[s] - base[s] for s in sorted(mine.keys() & base.keys())]
    if arm == reference or not diffs:
        return None
    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return mean, mean, mean, 1
    half = stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def format_gain(mean: float, low: float, high: float, n: int) -> str:
    """``+0.012 [-0.020, +0.044] (n=6)``; one pair has no interval: ``+0.012 (n=1)``."""
    return f"{mean:+.3f} (n=1)" if n == 1 else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n={n})"


def grid_edge_line(rows: list[dict]) -> str:
    """How many cells' search winners sat on an edge of their grid, and on which (the labels of
    ``grid_edge``, counted). A row without ``grid_edge`` (an older results.csv) is unknown."""
    known = [r["grid_edge"] for r in rows if r.get("grid_edge") not in (None, UNKNOWN)]
    on_edge = [value for value in known if value]
    labels = Counter(label for value in on_edge for label in value.split("; "))
    unknown = len(rows) - len(known)
    text = (f"Grid edges: the search's winner sat on an edge of its grid in {len(on_edge)} of "
            f"{len(known)} cells"
            + (f" ({unknown} more unknown: searched before this was recorded)" if unknown else "")
            + "".join(f"; `{label}` in {n}" for label, n in labels.items()))
    return text + (". The optimum may lie beyond the grid: widen it (docs/tuning.md)."
                   if on_edge else ".")
