"""The search's retrained winner: its model folder (OUT/model), its ONNX export, its one test
evaluation and its registration in MLflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cmunet.config import save_config
from cmunet.tracking.mlflow_run import Tracker
from cmunet.training.finetune import FinetuneConfig, FitResult, save_outputs
from cmunet.training.tune_config import TuneConfig


def save_model(final: FinetuneConfig, result: FitResult, best: dict, pool: list[str]) -> Path:
    """The retrained model's folder, as launch/finetune.py writes one (best.safetensors holds the
    weights after the last epoch), with the cross-validation scores in result.json."""
    folder = Path(final.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(final, folder / "config.yaml")
    cv = {k: v for k, v in best.items() if k.startswith(("cv_", "fold"))}
    save_outputs(result, {"width": final.model_width, "init": final.init,
                          "ratio": final.data.ratio, "epochs": final.train.epochs,
                          "n_train": len(pool), "train_keys": pool,
                          "n_unlabelled": result.n_unlabelled, "cv": cv}, final, folder)
    return folder


def evaluate_once(final: FinetuneConfig, model_dir: Path, out: Path,
                  log: Callable[[str], None]) -> dict[str, float]:
    """Evaluate the retrained model on the test split (OUT/test); the mean of every metric as
    ``test_<metric>``, and the images where HD / ADD are undefined as ``test_hd_n_undefined``.
    Its MLflow record is the search's run, not a run of its own."""
    # imported here, not at the top: Ray's trial workers import the search and never evaluate
    from cmunet.evaluation.evaluate import run_evaluation

    metrics = run_evaluation(replace(final, model=str(model_dir), out=str(out),
                                     tracking=replace(final.tracking, enabled=False)), log)
    summaries = {k: v for k, v in metrics.items() if isinstance(v, dict) and "n_undefined" in v}
    return {**{f"test_{k}": v["mean"] for k, v in summaries.items() if v["mean"] is not None},
            **{f"test_{k}_n_undefined": v["n_undefined"] for k, v in summaries.items()
               if k in ("hd", "add")}}


def export_winner(model_dir: Path, path: Path, log: Callable[[str], None]) -> dict | None:
    """The retrained model as ONNX (cmunet/models/onnx_export.py), checked against onnxruntime:
    ``{"path", "opset", "max_abs_diff"}``, or None (with a warning) when the export fails: the
    search's results do not depend on it."""
    from cmunet.evaluation.evaluate import load_finetuned
    from cmunet.models.onnx_export import OPSET, check_onnx, export_onnx

    net = load_finetuned(model_dir)
    try:
        worst = check_onnx(export_onnx(net, path), net)
    except Exception as err:  # an exporter limitation must not lose a finished search
        log(f"warning: no ONNX export: {type(err).__name__}: {str(err).splitlines()[0]}")
        path.unlink(missing_ok=True)
        return None
    log(f"wrote {path} (opset {OPSET}; onnxruntime within {worst:.1e} of PyTorch)")
    return {"path": str(path), "opset": OPSET, "max_abs_diff": worst}


def register(cfg: TuneConfig, parent: Tracker, model_dir: Path, best: dict, epochs: int,
             log: Callable[[str], None], onnx: dict | None = None) -> dict | None:
    """Log ``model_dir`` as the pyfunc model of the search's run, register it as a new version
    of ``tracking.register_as`` and give it ``alias``; log the ``onnx`` export beside it (its URI
    in the version's tag ``onnx``). None when tracking or registering is off."""
    if not (parent.enabled and cfg.tracking.register_as):
        return None
    from mlflow.tracking import MlflowClient

    from cmunet.tracking.segmenter import log_onnx, log_segmenter

    parent.flush()  # the run's queued metrics before the fluent API resumes it
    tags = {"cv_dice": f"{best['cv_dice']:.5f}", "cv_dice_std": f"{best['cv_dice_std']:.5f}",
            "lr": best["lr"], "batch_size": best["batch_size"], "epochs": epochs,
            "init": cfg.init, "ratio": cfg.data.ratio, "width": cfg.model_width}
    name = cfg.tracking.register_as
    version = log_segmenter(cfg.tracking.uri, parent.run_id, model_dir, name, cfg.alias, tags)
    log(f"registered models:/{name}/{version}"
        + (f" as models:/{name}@{cfg.alias}" if cfg.alias else ""))
    registered = {"name": name, "version": version, "alias": cfg.alias}
    if onnx is not None:
        uri = log_onnx(cfg.tracking.uri, parent.run_id, Path(onnx["path"]),
                       {"opset": onnx["opset"], "max_abs_diff": f"{onnx['max_abs_diff']:.2e}"})
        MlflowClient(cfg.tracking.uri).set_model_version_tag(name, version, "onnx", uri)
        registered["onnx"] = uri
    return registered
