"""The dose-response report of a study whose arms fine-tune from the exports of one pre-training
(its periodic exports and its final one: the doses), and the check of the pre-training probe.

For every budget: the paired test-Dice gain of each dose over the reference arm (95 % t interval
over seeds) against the pre-training epochs, as ``dose.md`` and ``gain_vs_dose.png``. With
``probe_seeds``, every dose's export is also probed (:func:`cmunet.training.probe.probe_dice`,
fine-tuning-pool images only, one probe per seed, cached in ``probes.json``), as is a random
initialisation with the same seeds (the probe gain is the paired difference), and the Spearman
correlation of the mean probe Dice with the mean test gain over the doses is reported with a
bootstrap interval (resampling the doses) and plotted (``probe_vs_gain.png``). The study's
other pre-trained arms (a second pre-training seed, baselines, ablations: arms whose one
pre-training, ``pretrain_once``, has an export) are probed and tabulated too, and a second
correlation runs over every pre-trained export: a user comparing runs by ``probe_dice`` in MLflow
compares such exports, not only the checkpoints of one run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmunet.study_config import Cell, StudyConfig, arm_of, pretrain_name
from cmunet.study_stats import format_gain, grid_edge_line, mean_std, paired_gain
from cmunet.training.probe import RANDOM_INIT


def dose_arms(cfg: StudyConfig, out: Path) -> dict[str, int]:
    """Arm -> pre-training epochs of the arms that fine-tune from one shared pre-training's
    exports (its periodic ones and its final one), when the study has at least two of them."""
    doses: dict[str, int] = {}
    for name in cfg.arms:
        arm = arm_of(cfg, name)
        if not arm.share:
            continue
        folder = out / "pretrain" / pretrain_name(cfg, Cell(arm.share, "all", cfg.seeds[0]))[0]
        info = (folder / "exports" / arm.export if arm.export else folder / "export") / \
            "export.json"
        if info.exists():
            doses[name] = int(json.loads(info.read_text())["epoch"])
    return doses if len(doses) >= 2 else {}


def dose_report(cfg: StudyConfig, out: Path, rows: list[dict]) -> Path:
    doses = dose_arms(cfg, out)
    reference = cfg.reference or cfg.arms[0]
    others = other_pretrained(cfg, out, rows, doses) if doses else []
    probes = probe_scores(cfg, out, [*doses, *others]) if cfg.probe_seeds else {}
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    lines = ["# Dose-response", "",
             f"Paired test-Dice gain over `{reference}` (95 % t interval over seeds) for "
             "fine-tuning from the exports of one pre-training after E epochs (passes over "
             "its pool)" + (", then the study's other pre-trained arms" if others else "") + "."
             + (f" Probe: mean probe_dice over seeds {cfg.probe_seeds} "
                f"({cfg.probe.epochs} epochs on {cfg.probe.labelled} fine-tuning-pool "
                "images), and its mean paired gain over a random initialisation "
                f"probed with the same seeds ({np.mean(probes[RANDOM_INIT]):.3f})."
                if probes else ""), "", grid_edge_line(rows), ""]
    series = {}
    for budget in budgets:
        lines += [f"## budget {budget}", "", "| arm | epochs | views | Dice | gain vs "
                  f"{reference} | probe_dice | probe gain |", "|---|---|---|---|---|---|---|"]
        points = []
        for arm in [*sorted(doses, key=doses.get), *others]:
            dice = [r["dice"] for r in rows if r["arm"] == arm and r["budget"] == budget]
            gain = paired_gain(rows, arm, budget, reference)
            if gain is None:
                continue
            mean, low, high, n = gain
            probe = np.mean(probes[arm]) if arm in probes else None
            probe_gain = (np.mean(np.subtract(probes[arm], probes[RANDOM_INIT]))
                          if arm in probes else None)
            info = _export_info(cfg, out, arm)
            points.append(Point(arm, arm in doses, info["epoch"], mean, low, high, probe))
            views = info["step"] * info["global_batch"] if "global_batch" in info else None
            lines.append(f"| {arm} | {info['epoch']} | {views or '–'} | {mean_std(dice)} | "
                         f"{format_gain(mean, low, high, n)} | "
                         f"{'–' if probe is None else f'{probe:.3f}'} | "
                         f"{'–' if probe_gain is None else f'{probe_gain:+.3f}'} |")
        series[budget] = points
        with_probe = [p for p in points if p.probe is not None]
        doses_only = [p for p in with_probe if p.dose]
        groups = [("doses", doses_only)]
        if len(with_probe) > len(doses_only):
            groups.append(("pre-trained exports (every row above)", with_probe))
        for kind, chosen in groups:
            if len(chosen) >= 3:
                rho, low, high = spearman_interval([p.probe for p in chosen],
                                                   [p.gain for p in chosen])
                lines += ["", f"Spearman(probe_dice, gain) over {len(chosen)} {kind}: "
                          f"{rho:+.2f} [{low:+.2f}, {high:+.2f}] (bootstrap over the points)"]
        lines.append("")
    (out / "dose.md").write_text("\n".join(lines))
    _figure(series, reference, out / "gain_vs_dose.png")
    if probes:
        _probe_figure(series, out / "probe_vs_gain.png")
    return out / "dose.md"


@dataclass
class Point:
    """One export's mean test gain (with its interval) and mean probe Dice, for one budget."""

    arm: str
    dose: bool  # one of the doses (else another pre-trained arm)
    epochs: int
    gain: float
    low: float
    high: float
    probe: float | None


def other_pretrained(cfg: StudyConfig, out: Path, rows: list[dict],
                     doses: dict[str, int]) -> list[str]:
    """The arms with result rows, other than the doses and the reference, that fine-tune from
    the final or periodic export of one pre-training (``pretrain_once``) found under ``out``."""
    if not cfg.pretrain_once:
        return []
    reference = cfg.reference or cfg.arms[0]
    found = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm in doses or arm == reference:
            continue
        if arm_of(cfg, arm).method != "none" and (_export(cfg, out, arm) / "export.json").exists():
            found.append(arm)
    return found


def _export_info(cfg: StudyConfig, out: Path, arm: str) -> dict:
    return json.loads(_export(cfg, out, arm).joinpath("export.json").read_text())


def _export(cfg: StudyConfig, out: Path, arm: str) -> Path:
    shared = arm_of(cfg, arm)
    source = shared.share or arm
    folder = out / "pretrain" / pretrain_name(cfg, Cell(source, "all", cfg.seeds[0]))[0]
    return folder / "exports" / shared.export if shared.export else folder / "export"


def probe_scores(cfg: StudyConfig, out: Path, arms: list[str]) -> dict[str, list[float]]:
    """Arm -> probe Dice of its export, one per probe seed, and the same for a random
    initialisation (:data:`RANDOM_INIT`), cached in ``probes.json``
    (:func:`cmunet.training.probe.probe_exports`)."""
    from cmunet.training.probe import probe_exports

    return probe_exports({arm: _export(cfg, out, arm) for arm in arms}, cfg.data.shards,
                         cfg.data.ratio, cfg.probe, cfg.probe_seeds, out / "probes.json")


def spearman_interval(x, y, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of (x, y) and a 95 % percentile bootstrap interval (pairs resampled;
    resamples with a constant side are skipped). With a handful of points the interval is wide:
    it says how little a few doses can establish."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            draws.append(spearmanr(x[pick], y[pick]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return rho, float(low), float(high)


def _figure(series: dict[str, list[Point]], reference: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for budget, points in series.items():
        points = [p for p in points if p.dose]
        if not points:
            continue
        epochs, mean, low, high = (np.array(v, dtype=float) for v in
                                   zip(*[(p.epochs, p.gain, p.low, p.high) for p in points]))
        ax.errorbar(epochs, mean, yerr=[mean - low, high - mean], marker="o", capsize=3,
                    label=f"{budget} labels")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("pre-training epochs (passes over the pre-training pool)")
    ax.set_ylabel(f"test Dice gain over {reference} (95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _probe_figure(series: dict[str, list[Point]], path: Path) -> None:
    """Doses as filled circles labelled with their epochs, other arms as open squares labelled
    with their names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for budget, points in series.items():
        color = None
        for dose in (True, False):
            shown = [p for p in points if p.probe is not None and p.dose == dose]
            if not shown:
                continue
            drawn = ax.scatter([p.probe for p in shown], [p.gain for p in shown], color=color,
                               marker="o" if dose else "s",
                               facecolors=None if dose else "none",
                               label=f"{budget} labels" + ("" if dose else ", other arms"))
            color = drawn.get_edgecolor()[0] if dose else color
            for p in shown:
                ax.annotate(str(p.epochs) if dose else p.arm, (p.probe, p.gain), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("probe_dice of the export (mean over probe seeds)")
    ax.set_ylabel("mean test Dice gain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    tmp.replace(path)
