"""Fine-tuning and evaluation: the loss has a gradient, exports load fully, the test split is never
read while training, and the two launchers write what they promise (on the tiny shards)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cmunet
import cmunet.data.stream as stream
import cmunet.evaluation.evaluate as evaluate
import cmunet.training.finetune as finetune
from cmunet.config import load_config
from cmunet.data.splits import load_splits, pool_keys
from cmunet.models.export import load_export, save_export
from cmunet.models.unet import UNet
from cmunet.training.finetune import (FinetuneConfig, build_model, carve_validation, fit,
                                      init_from_export, soft_dice_loss)
from conftest import ROOT, load_tool

CPU_YAML = str(ROOT / "configs" / "finetune" / "cpu.yaml")
TINY = ["model_width=8", "train.epochs=2", "train.batch_size=4", "data.ratio=50-30"]


def make_export(folder: Path, width: int = 8, info_width: int | None = None) -> UNet:
    """A CM-UNet-like export: encoder and decoder of a UNet whose every tensor was perturbed."""
    torch.manual_seed(123)
    source = UNet(width)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.add_(torch.randint_like(tensor, 1, 5) if tensor.dtype == torch.long
                        else torch.randn_like(tensor))
    state = {k: v for k, v in source.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    save_export(folder, state, {"method": "cmunet", "width": info_width or width}, "", None)
    return source


def tiny_cfg(shards: Path, **changes) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, CPU_YAML, [f"data.shards={shards}", *TINY,
                                                  "tracking.enabled=false"])
    return dataclasses.replace(cfg, **changes)


# ---- loss ----------------------------------------------------------------------------------------

def test_soft_dice_alone_has_a_gradient_wrt_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    target = (torch.rand(2, 16, 16) > 0.7).long()
    soft_dice_loss(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_soft_dice_hand_computed_cases():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # 8 foreground pixels
    perfect = torch.stack([1 - target, target], dim=1).float() * 40 - 20
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 17, abs=1e-6)
    half = torch.zeros(1, 2, 4, 4)  # p = 0.5 everywhere: 1 - (2*4 + 1) / (8 + 8 + 1)
    assert soft_dice_loss(half, target).item() == pytest.approx(1 - 9 / 17, abs=1e-6)


# ---- initialisation ------------------------------------------------------------------------------

def test_export_fills_every_encoder_and_decoder_tensor(tmp_path):
    source = make_export(tmp_path / "export")
    cfg = FinetuneConfig(init=str(tmp_path / "export"), model_width=16)
    model, report = build_model(cfg)
    assert model.width == 8  # the export's width, not model_width
    assert not report.missing and not report.unexpected
    expected = source.state_dict()
    for key, tensor in model.state_dict().items():
        if key.startswith("head."):
            assert not torch.equal(tensor, expected[key]), key  # fresh head
        else:
            assert torch.equal(tensor, expected[key]), key
    assert len(report.loaded) == sum(not k.startswith("head.") for k in expected)


def test_export_of_another_width_fails_with_a_clear_message(tmp_path):
    make_export(tmp_path / "export", width=8)
    state, info = load_export(tmp_path / "export")
    with pytest.raises(ValueError, match=r"pre-trained with width 8 .* has width 16"):
        init_from_export(UNet(16), state, info, "export E")
    save_file(state, tmp_path / "bare.safetensors")  # no info: the width is read off the tensors
    bare, bare_info = load_export(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="width 8"):
        init_from_export(UNet(16), bare, bare_info, "bare.safetensors")


def test_export_whose_tensors_contradict_its_width_fails_in_the_launcher(tmp_path, tiny_shards,
                                                                         capsys):
    make_export(tmp_path / "export", width=8, info_width=16)
    code = load_tool("finetune")(["--config", CPU_YAML, f"data.shards={tiny_shards}",
                                  f"init={tmp_path / 'export'}", f"out={tmp_path / 'out'}",
                                  "tracking.enabled=false", *TINY])
    assert code == 2
    assert "does not fit this model" in capsys.readouterr().err


@pytest.mark.parametrize("launcher, config", [("finetune", CPU_YAML),
                                              ("tune", str(ROOT / "configs" / "tune" / "cpu.yaml"))])
def test_a_corrupt_export_is_a_one_line_error(tmp_path, tiny_shards, launcher, config):
    make_export(tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file\n" * 8)  # garbage where the weights should be
    run = subprocess.run([sys.executable, str(ROOT / "launch" / f"{launcher}.py"), "--config",
                          config, f"data.shards={tiny_shards}", f"init={tmp_path / 'export'}",
                          f"out={tmp_path / 'out'}", "tracking.enabled=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights}: not a readable "
                                                   "safetensors file (")
    with pytest.raises(ValueError, match="not a readable safetensors file"):  # as a bare file too
        load_export(weights)


# ---- validation carve and data access ------------------------------------------------------------

def test_validation_is_carved_by_patient_and_seeded():
    patient_of = {f"k{i:02d}": f"p{i // 3}" for i in range(15)}
    keys = sorted(patient_of)
    train, val = carve_validation(keys, patient_of, 0.2, seed=1)
    assert sorted(train + val) == keys and len(val) == 3
    assert not {patient_of[k] for k in train} & {patient_of[k] for k in val}
    assert (train, val) == carve_validation(keys, patient_of, 0.2, seed=1)
    assert val != carve_validation(keys, patient_of, 0.2, seed=2)[1] or \
        val != carve_validation(keys, patient_of, 0.2, seed=3)[1]


def test_single_patient_pool_falls_back_to_frames_with_a_warning():
    patient_of = {f"k{i}": "p0" for i in range(5)}
    warnings: list[str] = []
    train, val = carve_validation(sorted(patient_of), patient_of, 0.2, 0, warn=warnings.append)
    assert len(val) == 1 and len(train) == 4 and not set(train) & set(val)
    assert warnings and "single patient" in warnings[0]


def test_finetune_never_reads_the_test_split(tmp_path, tiny_shards, monkeypatch):
    asked: list[str] = []  # keys any InMemorySet is built with
    decoded: list[str] = []  # keys of every sample decoded from a shard, by any loader
    pools: list[str] = []
    fitted: dict[str, list[str]] = {}

    class Recording(stream.InMemorySet):
        def __init__(self, shards, keys, **kw):
            keys = list(keys)
            asked.extend(keys)
            super().__init__(shards, keys, **kw)

    real_call, real_fit, real_pool_keys = stream._Decoder.__call__, finetune.fit, finetune.pool_keys

    def decode(self, raw):
        decoded.append(raw["__key__"])
        return real_call(self, raw)

    def recording_fit(cfg, train_keys, val_keys, *args, **kw):
        fitted.update(train=list(train_keys), val=list(val_keys))
        return real_fit(cfg, train_keys, val_keys, *args, **kw)

    def recording_pool_keys(splits, pool, ratio=None):
        pools.append(pool)
        return real_pool_keys(splits, pool, ratio)

    monkeypatch.setattr(finetune, "InMemorySet", Recording)
    monkeypatch.setattr(stream._Decoder, "__call__", decode)
    monkeypatch.setattr(finetune, "fit", recording_fit)
    monkeypatch.setattr(finetune, "pool_keys", recording_pool_keys)
    code = load_tool("finetune")(["--config", CPU_YAML, f"data.shards={tiny_shards}", "init=none",
                                  f"out={tmp_path / 'out'}", "tracking.enabled=false", *TINY,
                                  "train.epochs=1"])
    assert code == 0
    splits = load_splits(tiny_shards / "splits.json")
    test, pool = set(pool_keys(splits, "test")), set(pool_keys(splits, "finetune", "50-30"))
    assert pools == ["finetune"]
    assert asked and decoded and not (set(asked) | set(decoded)) & test
    assert set(asked) == set(decoded) == pool
    assert set(fitted["train"]) | set(fitted["val"]) == pool
    assert not set(fitted["train"]) & set(fitted["val"])


def test_fit_starts_every_call_from_the_given_state(tiny_shards):
    cfg = tiny_cfg(tiny_shards, train=finetune.TrainConfig(epochs=1, batch_size=4))
    keys = pool_keys(load_splits(tiny_shards / "splits.json"), "finetune", "50-30")
    initial = UNet(8).state_dict()
    before = copy.deepcopy(initial)
    first = fit(cfg, keys[:4], keys[4:], initial)
    second = fit(cfg, keys[:4], keys[4:], initial)
    assert all(torch.equal(initial[k], before[k]) for k in before)  # not modified
    assert first.history[0]["train_loss"] == second.history[0]["train_loss"]
    assert first.best_epoch == 1 and set(first.best_state) == set(initial)


# ---- end to end ----------------------------------------------------------------------------------

def runs_of(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cmunet-finetune")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}, client


@pytest.mark.slow
def test_finetune_and_evaluate_end_to_end(tmp_path, tiny_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_export(tmp_path / "export")
    common = ["--config", CPU_YAML, f"data.shards={tiny_shards}", f"tracking.uri={uri}", *TINY]
    for init in ("none", str(tmp_path / "export")):
        out = tmp_path / ("scratch" if init == "none" else "pretrained")
        assert load_tool("finetune")([*common, f"init={init}", f"out={out}"]) == 0
        result = json.loads((out / "result.json").read_text())
        assert result["width"] == 8 and 1 <= result["best_epoch"] <= 2
        assert result["n_train"] + result["n_val"] == 6
        assert (result["init_report"] is None) == (init == "none")
        state = load_file(out / "best.safetensors")
        assert {v.dtype for k, v in state.items() if "num_batches" not in k} == {torch.float32}
        UNet(8).load_state_dict(state)
        with (out / "history.csv").open() as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
        assert load_config(FinetuneConfig, out / "config.yaml").init == init

    evaluation = tmp_path / "eval"
    assert load_tool("evaluate")([*common, f"model={tmp_path / 'pretrained'}",
                                  f"out={evaluation}"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    test = pool_keys(load_splits(tiny_shards / "splits.json"), "test")
    assert metrics["n_images"] == len(test)
    for key in ("dice", "cldice", "iou", "hd", "hd95", "nsd", "nsd_mm", "add"):
        assert {"mean", "std", "ci95", "n", "n_undefined"} <= set(metrics[key]), key
        assert metrics[key]["n"] + metrics[key]["n_undefined"] == len(test)
    assert {"pearson_r", "p_value", "mean_diff", "loa", "n"} <= set(metrics["pearson_r"])
    assert metrics["pearson_r"]["units"] == "mm"  # the tiny set has a pixel spacing
    assert metrics["nsd_tolerance"] == {"px": 1.0, "mm": 0.5}
    assert metrics["cmunet_version"] == cmunet.__version__
    with (evaluation / "per_image.csv").open() as f:
        per_image = list(csv.DictReader(f))
    assert sorted(r["key"] for r in per_image) == sorted(test)
    assert {"hd95", "hd95_mm", "nsd", "nsd_mm"} <= set(per_image[0])
    for name in ("overlays.png", "bland_altman.png"):
        assert (evaluation / name).stat().st_size > 1000

    runs, client = runs_of(uri)
    assert set(runs) == {"scratch", "pretrained", "eval-pretrained"}
    assert len(client.get_metric_history(runs["scratch"].info.run_id, "val_dice")) == 2
    assert runs["pretrained"].data.params["init"] == str(tmp_path / "export")
    artifacts = {a.path for a in client.list_artifacts(runs["eval-pretrained"].info.run_id)}
    assert {"metrics.json", "per_image.csv", "overlays.png", "bland_altman.png"} <= artifacts
    assert "test_dice" in runs["eval-pretrained"].data.metrics
    for name, context in (("scratch", "training"), ("eval-pretrained", "evaluation")):
        run = client.get_run(runs[name].info.run_id)  # provenance (tests/test_tracking.py)
        assert "mlflow.source.git.commit" in run.data.tags
        inputs = run.inputs.dataset_inputs
        assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [(tiny_shards.name, context)]


def test_evaluation_excludes_and_counts_images_without_ground_truth(tmp_path, tiny_folder,
                                                                    tiny_shards, monkeypatch):
    test = sorted(pool_keys(load_splits(tiny_shards / "splits.json"), "test"))
    folder = tmp_path / "images"
    shutil.copytree(tiny_folder, folder)
    empty = np.zeros((64, 64), np.uint8)
    Image.fromarray(empty).save(folder / "masks" / f"{test[0]}.png")  # dropped: unlabelled
    shards = tmp_path / "shards"
    assert load_tool("shard")(["--images", str(folder / "images"), "--masks",
                               str(folder / "masks"), "--meta", str(folder / "meta.csv"),
                               "--out", str(shards), "--size", "64", "--workers", "1",
                               "--skip-bad"]) == 0
    assert sorted(pool_keys(load_splits(shards / "splits.json"), "test")) == test

    class EmptyMask(stream.InMemorySet):  # a labelled image whose mask has no foreground
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            key, image, mask = self.items[0]
            self.items[0] = (key, image, np.zeros_like(mask))
            self.spacing[-1] = None  # and one image of unknown pixel spacing

    monkeypatch.setattr(evaluate, "InMemorySet", EmptyMask)
    model = tmp_path / "model"
    model.mkdir()
    save_file({k: v.contiguous() for k, v in UNet(8).state_dict().items()},
              model / "best.safetensors")
    (model / "result.json").write_text('{"width": 8}')
    cfg = tiny_cfg(shards, model=str(model), out=str(tmp_path / "eval"))
    metrics = evaluate.run_evaluation(cfg, log=lambda _: None)
    assert metrics["excluded"] == {"unlabelled": [test[0]], "empty_ground_truth": [test[1]]}
    assert metrics["n_excluded"] == {"unlabelled": 1, "empty_ground_truth": 1}
    assert metrics["n_images"] == metrics["dice"]["n"] == len(test) - 2
    assert metrics["hd_mm"]["n"] + metrics["hd_mm"]["n_undefined"] == len(test) - 2
    assert metrics["pearson_r"]["units"] == "px"  # not every image has a spacing
    with (tmp_path / "eval" / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test) - 2 and sum(r["hd_mm"] == "" for r in rows) == 1


def test_evaluation_names_a_missing_model(tmp_path, tiny_shards):
    cfg = tiny_cfg(tiny_shards, model=str(tmp_path / "nothing"), out=str(tmp_path / "eval"))
    with pytest.raises(FileNotFoundError, match="best.safetensors"):
        evaluate.run_evaluation(cfg)


def test_paper_config_has_the_paper_settings():
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / "paper.yaml")
    assert (cfg.model_width, cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == \
        (64, 256, 1e-4, 16)
