"""The study: label budgets drawn from whole patients, the cell grid, shared pre-training, and
``launch/study.py --config configs/study/tiny.yaml`` end to end (results, resume, report)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmunet.config import load_config
from cmunet.data.splits import load_splits, pool_keys
from cmunet.study import Deferred, budget_keys, collect, pretrain_data, table
from cmunet.study_config import (Arm, Cell, StudyConfig, StudyData, arm_of, cells, pretrain_name,
                                 pretrain_ratio)
from cmunet.training.finetune import FinetuneConfig, patients_of
from cmunet.training.pretrain_config import PretrainConfig
from conftest import ROOT

TINY = ROOT / "configs" / "study" / "tiny.yaml"


def test_study_configs_load():
    for path in sorted((ROOT / "configs" / "study").glob("*.yaml")):
        cfg = load_config(StudyConfig, path)
        assert cells(cfg), path


def test_unknown_budget_is_refused():
    with pytest.raises(ValueError, match="budgets"):
        StudyConfig(budgets=["few"])
    with pytest.raises(ValueError, match="extra_cells"):
        StudyConfig(extra_cells=["mae"])


def test_cells_grid_and_extra_cells():
    cfg = StudyConfig(arms=["none", "cmunet"], budgets=["4", "all"], seeds=[0, 1],
                      extra_cells=["mae@4", "none@4"])
    grid = cells(cfg)
    assert len(grid) == (4 + 1) * 2  # none@4 is already in the grid
    assert Cell("mae", "4", 1) in grid and Cell("mae", "all", 0) not in grid
    assert len({c.name for c in grid}) == len(grid)
    fewer = cells(StudyConfig(arms=["none"], budgets=["4"], seeds=[0, 1, 2],
                              extra_cells=["mae@4"], extra_seeds=[0]))
    assert [c.name for c in fewer] == ["none-b4-s0", "none-b4-s1", "none-b4-s2", "mae-b4-s0"]


def test_shared_pretraining_cannot_chain():
    cfg = StudyConfig(variants={"a": Arm(share="cmunet"), "b": Arm(share="a")})
    assert arm_of(cfg, "a").share == "cmunet"
    assert arm_of(cfg, "mae").method == "mae"
    with pytest.raises(ValueError, match="shares"):
        arm_of(cfg, "b")


def test_seed_order_and_reference_arm():
    cfg = StudyConfig(arms=["a", "none"], budgets=["4", "16"], seeds=[0, 1], order="seed",
                      reference="none")
    assert [c.name for c in cells(cfg)[:4]] == ["a-b4-s0", "a-b16-s0", "none-b4-s0",
                                                "none-b16-s0"]
    with pytest.raises(ValueError, match="reference"):
        StudyConfig(arms=["a"], reference="none")


def test_dose_arms_use_the_periodic_exports_of_one_pretraining(tmp_path):
    from cmunet.study import pretrain

    cfg = StudyConfig(arms=["d2", "dfinal"], seeds=[0], pretrain_once=True, variants={
        "long": Arm(method="cmunet"), "d2": Arm(share="long", export="epoch_0002"),
        "d9": Arm(share="long", export="epoch_0009"), "dfinal": Arm(share="long")})
    folder = tmp_path / "pretrain" / "long-s0"
    for part in ("exports/epoch_0002", "export"):  # a finished pre-training's files
        (folder / part).mkdir(parents=True)
        (folder / part / "model.safetensors").write_bytes(b"")
    ran = []
    assert pretrain(cfg, Cell("d2", "4", 1), tmp_path, ran.append) == \
        str(folder / "exports" / "epoch_0002")
    assert pretrain(cfg, Cell("dfinal", "4", 1), tmp_path, ran.append) == str(folder / "export")
    assert not ran  # nothing was pre-trained again
    with pytest.raises(FileNotFoundError, match="export_epochs"):
        pretrain(cfg, Cell("d9", "4", 0), tmp_path, ran.append)
    waiting = replace(cfg, defer_pretraining=True)
    with pytest.raises(Deferred, match="epoch_0009 does not exist yet"):
        pretrain(waiting, Cell("d9", "4", 0), tmp_path, ran.append)
    with pytest.raises(Deferred, match="export does not exist yet"):
        pretrain(waiting, Cell("mae", "4", 0), tmp_path, ran.append)  # never pre-trained here
    assert not ran


def test_budgets_come_from_several_patients_and_nest(tiny_shards):
    splits = load_splits(tiny_shards / "splits.json")
    patient_of = patients_of(tiny_shards)
    ratio = "50-30"
    pool = pool_keys(splits, "finetune", ratio)
    pool_patients = {patient_of[k] for k in pool}
    assert len(pool_patients) >= 2
    for seed in (0, 1):
        small = budget_keys(splits, ratio, "2", patient_of, seed)
        large = budget_keys(splits, ratio, str(len(pool_patients) + 1), patient_of, seed)
        assert len(small) == 2 and len({patient_of[k] for k in small}) == 2  # round-robin
        assert set(small) <= set(large) <= set(pool)  # smaller budgets are subsets
        assert budget_keys(splits, ratio, "2", patient_of, seed) == small  # seeded
    assert set(budget_keys(splits, ratio, "all", patient_of, 0)) == set(pool)
    draws = {tuple(budget_keys(splits, ratio, "2", patient_of, s)) for s in range(8)}
    assert len(draws) > 1  # the seed chooses the frames
    with pytest.raises(ValueError, match="exceeds"):
        budget_keys(splits, ratio, str(len(pool) + 1), patient_of, 0)


def test_ratio_budgets_pretrain_on_their_own_pool(tiny_shards):
    splits = load_splits(tiny_shards / "splits.json")
    patient_of = patients_of(tiny_shards)
    cfg = StudyConfig(data=StudyData(shards=str(tiny_shards), ratio="79-1"),
                      budgets=["50-30", "all", "2"], seeds=[0])
    small_pool = set(pool_keys(splits, "pretrain", "79-1"))
    assert small_pool & set(budget_keys(splits, "79-1", "50-30", patient_of, 0))  # the old bug
    for budget in cfg.budgets:
        labels = set(budget_keys(splits, cfg.data.ratio, budget, patient_of, 0))
        pretrained = set(pool_keys(splits, "pretrain", pretrain_ratio(cfg, budget)))
        assert labels and pretrained and not labels & pretrained, budget
    assert [pretrain_name(cfg, Cell("cmunet", b, 0))[0] for b in cfg.budgets] == \
        ["cmunet-r50-30-s0", "cmunet-s0", "cmunet-s0"]
    assert pretrain_name(cfg, Cell("cmunet", "50-30", 0))[1] == "pretrain cmunet ratio 50-30 seed 0"


def test_pretrain_shards_replace_the_pool(tiny_shards, tmp_path):
    cfg = StudyConfig(data=StudyData(shards=str(tiny_shards), ratio="79-1",
                                     pretrain_shards=[str(tmp_path / "archive")]),
                      budgets=["50-30"])
    assert pretrain_ratio(cfg, "50-30") == "79-1"  # no pool: one pre-training for every budget
    assert pretrain_name(cfg, Cell("mae", "50-30", 1))[0] == "mae-s1"
    pretrain = load_config(PretrainConfig, ROOT / "configs/pretrain/mae-cpu.yaml",
                           pretrain_data(cfg))
    assert pretrain.data.pool == "none"
    assert pretrain.data.extra_shards == [str((tmp_path / "archive").resolve())]
    assert pretrain_data(StudyConfig()) == []


def test_undefined_distances_are_counted_beside_the_means(tiny_shards, tmp_path):
    """A model that outputs nothing: HD and ADD undefined on every test image, and said so."""
    from safetensors.torch import save_file

    from cmunet.evaluation.evaluate import run_evaluation
    from cmunet.models.unet import UNet

    model, out = tmp_path / "model", tmp_path / "study"
    model.mkdir()
    unet = UNet(4)
    with torch.no_grad():  # background logit 50, vessel -50 everywhere: an empty prediction
        unet.head.weight.zero_()
        unet.head.bias.copy_(torch.tensor([50.0, -50.0]))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              model / "best.safetensors")
    (model / "result.json").write_text(json.dumps({"width": 4, "train_keys": ["a", "b"]}))
    cell = out / "cells" / "none-ball-s0"
    metrics = run_evaluation(load_config(FinetuneConfig, ROOT / "configs/finetune/cpu.yaml", [
        f"data.shards={tiny_shards}", f"model={model}", f"out={cell / 'test'}", "model_width=4",
        "tracking.enabled=false", "eval.overlays=1"]), log=lambda _: None)
    n = metrics["n_images"]
    assert metrics["dice"]["mean"] == 0.0
    for name in ("hd", "add"):
        assert metrics[name]["mean"] is None and metrics[name]["n_undefined"] == n > 0
    shutil.copytree(model, cell / "model")
    (cell / "result.json").write_text(json.dumps({
        "best": {"cv_dice": 0.0, "lr": 1e-3, "batch_size": 4}, "epochs": 1}))
    cfg = StudyConfig(out=str(out), data=StudyData(shards=str(tiny_shards)), arms=["none"],
                      budgets=["all"], seeds=[0])
    [row] = collect(cfg, out)
    assert row["hd"] is None and row["hd_undefined"] == row["add_undefined"] == row["n_test"] == n
    line = next(x for x in table(cfg, [row]).splitlines() if x.startswith("| none |"))
    assert line.count(f"– ({n}/{n})") == 2  # no HD / ADD mean, and why


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("study") / "out"
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "study.py"), "--config",
                           str(TINY), f"out={out}", f"tracking.uri={uri}"],
                          cwd=out.parent, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, uri


# the fixture's study (2-3 min on 2 idle cores) runs in the first test's setup: the test's
# timeout must outlast the subprocess's own 1,200 s, which reports the study's output
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_study_writes_results(tiny_study):
    out, uri = tiny_study
    cfg = load_config(StudyConfig, TINY)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(cells(cfg)) == 8
    assert {(r["arm"], r["budget"]) for r in rows} == {(a, b) for a in cfg.arms
                                                       for b in cfg.budgets}
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0
        assert int(row["n_labels"]) == 4 if row["budget"] == "4" else int(row["n_labels"]) > 4
    # every cell fine-tuned on its budget only, never on a test key
    splits = load_splits(out / "data" / "shards" / "splits.json")
    for folder in (out / "cells").iterdir():
        train_keys = json.loads((folder / "model" / "result.json").read_text())["train_keys"]
        assert not set(train_keys) & set(splits["test"]["keys"])
    # per-seed pre-training (pretrain_once is false in the tiny config)
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["cmunet-s0", "cmunet-s1"]
    table = (out / "results.md").read_text()
    assert "| cmunet |" in table and "gain vs none" in table and "(n=2)" in table
    for row in rows:  # the tiny config's two learning rates: every winner sits on an edge
        edge = "top" if float(row["lr"]) == 3e-3 else "bottom"
        assert row["grid_edge"] == f"lr={float(row['lr']):g} ({edge} of [0.001, 0.003])"
    assert "on an edge of its grid in 8 of 8 cells; `lr=" in table
    assert (out / "dice_vs_budget.png").stat().st_size > 1000
    assert (out / "pretrain_losses.png").stat().st_size > 1000

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    names = {r.info.run_name for r in runs}
    assert {f"tune {c.name}" for c in cells(cfg)} <= names
    assert "pretrain cmunet seed 0" in names


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_study_resumes_and_reports(tiny_study):
    out, uri = tiny_study
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    again = subprocess.run([sys.executable, str(ROOT / "launch" / "study.py"), "--config",
                            str(TINY), f"out={out}", f"tracking.uri={uri}"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 8
    assert "pre-training:" not in again.stdout
    assert (out / "results.csv").read_text() == before
    report = subprocess.run([sys.executable, str(ROOT / "launch" / "study.py"), "--config",
                             str(TINY), f"out={out}", f"tracking.uri={uri}", "report_only=true"],
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "results.csv").read_text() == before


def test_dose_report_puts_the_gains_against_the_epochs(tmp_path):
    from cmunet.dose import dose_report, spearman_interval
    from cmunet.dose import dose_arms

    cfg = StudyConfig(arms=["none", "d2", "d8", "dfinal"], budgets=["4"], seeds=[0, 1, 2],
                      pretrain_once=True, variants={
                          "long": Arm(method="cmunet"), "d2": Arm(share="long", export="epoch_0002"),
                          "d8": Arm(share="long", export="epoch_0008"), "dfinal": Arm(share="long")})
    folder = tmp_path / "pretrain" / "long-s0"
    for part, epoch in (("exports/epoch_0002", 2), ("exports/epoch_0008", 8), ("export", 20)):
        (folder / part).mkdir(parents=True)
        (folder / part / "export.json").write_text(json.dumps(
            {"epoch": epoch, "step": epoch * 3, "global_batch": 16}))
    assert dose_arms(cfg, tmp_path) == {"d2": 2, "d8": 8, "dfinal": 20}
    gains = {"none": 0.0, "d2": 0.01, "d8": 0.03, "dfinal": 0.05}
    rows = [{"arm": arm, "budget": "4", "seed": seed, "dice": 0.6 + gain + 0.01 * seed}
            for arm, gain in gains.items() for seed in (0, 1, 2)]
    text = dose_report(cfg, tmp_path, rows).read_text()
    assert "| d8 | 8 | 384 | 0.640 ± 0.010 | +0.030 [+0.030, +0.030] (n=3) | – |" in text
    one_seed = [r for r in rows if r["seed"] == 0]  # one pair: a mean, no interval
    text = dose_report(cfg, tmp_path, one_seed).read_text()
    assert "| d8 | 8 | 384 | 0.630 ± 0.000 | +0.030 (n=1) | – |" in text
    assert (tmp_path / "gain_vs_dose.png").stat().st_size > 0
    rho, low, high = spearman_interval([1, 2, 3, 4, 5], [0.1, 0.2, 0.25, 0.4, 0.5])
    assert rho == pytest.approx(1.0) and -1 <= low <= high <= 1
    rho, _, _ = spearman_interval([1, 2, 3, 4], [4, 3, 2, 1])
    assert rho == pytest.approx(-1.0)


def test_dose_probe_has_a_random_init_reference_and_a_cache_per_setting(tmp_path, monkeypatch):
    """Every dose's export and a random initialisation are probed with each probe seed; the
    report gives the paired probe gain; the cache is reused for the same probe settings and not
    for other ones. (The probe itself is replaced by a function of its inputs here; it is run
    for real by the pre-training job's test.)"""
    import cmunet.training.probe as probe_module
    from cmunet.dose import RANDOM_INIT, dose_report, other_pretrained, probe_scores
    from cmunet.models.export import save_export
    from cmunet.models.unet import UNet
    from cmunet.dose import dose_arms
    from cmunet.training.probe import ProbeConfig

    cfg = StudyConfig(arms=["none", "d2", "dfinal"], budgets=["4"], seeds=[0, 1],
                      pretrain_once=True, probe_seeds=[0, 1], probe=ProbeConfig(epochs=3),
                      variants={"long": Arm(method="cmunet"),
                                "d2": Arm(share="long", export="epoch_0002"),
                                "dfinal": Arm(share="long"), "base": Arm(method="mae"),
                                "unexported": Arm(method="moco")})
    folder = tmp_path / "pretrain" / "long-s0"
    for part, epoch, bias in (("exports/epoch_0002", 2, 0.1), ("export", 20, 0.3),
                              ("../base-s0/export", 20, 0.2)):
        unet = UNet(4)
        state = {f"{p}.{k}": v for p in ("encoder", "decoder")
                 for k, v in getattr(unet, p).state_dict().items()}
        state["encoder.stem.1.bias"] = torch.full_like(state["encoder.stem.1.bias"], bias)
        save_export(folder / part, state, {"epoch": epoch, "step": epoch * 3, "width": 4,
                                           "global_batch": 16}, "", None)
    calls = []

    def fake_probe(state, width, shards, ratio, probe_cfg, seed):
        calls.append(seed)
        return 0.5 + float(state["encoder.stem.1.bias"].mean()) + 0.01 * seed
    monkeypatch.setattr(probe_module, "probe_dice", fake_probe)
    doses = list(dose_arms(cfg, tmp_path))
    scores = probe_scores(cfg, tmp_path, doses)
    assert scores == {"d2": pytest.approx([0.6, 0.61]), "dfinal": pytest.approx([0.8, 0.81]),
                      RANDOM_INIT: pytest.approx([0.5, 0.51])}
    assert len(calls) == 6
    probe_scores(cfg, tmp_path, doses)
    assert len(calls) == 6  # cached
    probe_scores(replace(cfg, probe=ProbeConfig(epochs=4)), tmp_path, doses)
    assert len(calls) == 12  # other settings, probed again
    rows = [{"arm": arm, "budget": "4", "seed": seed, "dice": 0.6 + gain}
            for arm, gain in {"none": 0.0, "d2": 0.01, "dfinal": 0.03}.items() for seed in (0, 1)]
    text = dose_report(cfg, tmp_path, rows).read_text()
    assert ("| dfinal | 20 | 960 | 0.630 ± 0.000 | +0.030 [+0.030, +0.030] (n=2) | 0.805 | "
            "+0.300 |") in text
    assert "Spearman" not in text  # two doses, nothing else pre-trained: no correlation
    # the other pre-trained arms (own pre-training, pretrain_once) are probed and correlated
    # with the doses; the reference and an arm without an export are not
    rows += [{"arm": arm, "budget": "4", "seed": seed, "dice": 0.6 + gain}
             for arm, gain in {"base": 0.02, "unexported": 0.05}.items() for seed in (0, 1)]
    assert other_pretrained(cfg, tmp_path, rows, dose_arms(cfg, tmp_path)) == ["base"]
    text = dose_report(cfg, tmp_path, rows).read_text()
    assert "| base | 20 | 960 | 0.620 ± 0.000 | +0.020 [+0.020, +0.020] (n=2) | 0.705 |" in text
    assert "unexported" not in text
    assert "over 3 pre-trained exports (every row above): +1.00" in text
    assert "over 2 doses" not in text
    assert len(calls) == 14  # base's two probes only; the rest came from the cache
    assert (tmp_path / "probe_vs_gain.png").stat().st_size > 0


@pytest.mark.slow
def test_sigterm_stops_the_study_after_its_pretraining_checkpoint(tmp_path):
    """SIGTERM to the study: the running pre-training writes its checkpoint and stops, the study
    exits 75 with one line, no traceback (SIGINT takes the same path)."""
    import signal
    import time

    out = tmp_path / "out"
    study = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "study.py"), "--config", str(TINY), f"out={out}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "arms=[cmunet]", "seeds=[0]",
         "pretrain_overrides=[view_size=64, model.width=8, train.epochs=50, "
         "train.checkpoint_every=1000, train.log_every=1]"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "pretrain" / "cmunet-s0" / "log.csv"
    deadline = time.monotonic() + 300
    while not log.exists() and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.exists(), study.communicate()
    study.send_signal(signal.SIGTERM)
    stdout, stderr = study.communicate(timeout=300)
    assert study.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "stopped: " in stderr
    assert list((out / "pretrain" / "cmunet-s0" / "checkpoints").glob("step_*/cmunet.json"))
