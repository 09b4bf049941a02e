"""One configuration cross-validated: every fold fine-tuned from the same initial weights, and the
scores a trial reports (``cv_dice``, per-fold best Dice and best epoch). No Ray here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cmunet.training.finetune import FinetuneConfig, fit
from cmunet.training.folds import Folds

if TYPE_CHECKING:
    import torch

Report = Callable[[dict], None]


@dataclass
class FoldScore:
    dice: float  # best validation Dice of the fold
    epoch: int  # its epoch (1-based)


def cv_metrics(scores: Sequence[FoldScore], current: float | None = None) -> dict[str, float]:
    """What a trial reports: ``cv_dice``, the mean best validation Dice of the finished folds
    (and, while a fold runs, its best so far: ``current``); ``cv_dice_std``, their sample SD over
    finished folds; ``folds_done``; ``foldK_dice`` and ``foldK_best_epoch`` of each finished
    fold."""
    dices = [s.dice for s in scores]
    metrics = {"cv_dice": float(np.mean(dices + ([current] if current is not None else []))),
               "cv_dice_std": float(np.std(dices, ddof=1)) if len(dices) > 1 else 0.0,
               "folds_done": len(scores)}
    for k, score in enumerate(scores, start=1):
        metrics[f"fold{k}_dice"] = score.dice
        metrics[f"fold{k}_best_epoch"] = score.epoch
    return metrics


def cross_validate(cfg: FinetuneConfig, folds: Folds, initial_state: dict[str, torch.Tensor],
                   report: Report | None = None, every_epoch: bool = False,
                   device: torch.device | None = None,
                   done: Sequence[FoldScore] = ()) -> dict[str, float]:
    """Fine-tune every fold from the same ``initial_state`` (never from the previous fold's
    weights) and return :func:`cv_metrics` of all folds.

    ``done``: the scores of the first folds, already finished (an interrupted trial's, read back
    by :func:`cmunet.training.trial.run_trial`); only the folds after them are trained. Every
    fold starts from the same seed, so the result is the one of an uninterrupted run.

    ``report`` receives the metrics after every fold (the last report is the final result), or
    with ``every_epoch`` after every epoch of every fold (folds x epochs reports), which is what
    an early stopping scheduler needs: at a given report count, every trial has trained the same
    folds for the same epochs, so their running ``cv_dice`` are comparable. Either way the report
    that ends fold k is the first with ``folds_done`` = k.
    """
    scores = list(done)
    for train_keys, val_keys in folds[len(scores):]:
        on_epoch = None
        if report is not None and every_epoch:
            on_epoch = _epoch_reporter(scores, cfg.train.epochs, report)
        result = fit(cfg, train_keys, val_keys, initial_state, on_epoch, device)
        scores.append(FoldScore(result.best_val_dice, result.best_epoch))
        if report is not None and not every_epoch:
            report(cv_metrics(scores))
    metrics = cv_metrics(scores)
    if report is not None and len(done) == len(folds):  # nothing left to train: the result again
        report(metrics)
    return metrics


def _epoch_reporter(scores: list[FoldScore], epochs: int, report: Report) -> Callable[[dict], None]:
    """``fit``'s ``on_epoch``: report the running metrics, the fold's best so far included (as a
    finished fold at its last epoch)."""
    best = FoldScore(-1.0, 0)

    def on_epoch(row: dict) -> None:
        if row["val_dice"] > best.dice:  # the same rule as fit's choice of the best epoch
            best.dice, best.epoch = row["val_dice"], row["epoch"]
        if row["epoch"] == epochs:
            report(cv_metrics([*scores, best]))
        else:
            report(cv_metrics(scores, current=best.dice))

    return on_epoch
