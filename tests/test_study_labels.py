"""Study arms whose labels a selection strategy picks (``variants.X.labels``,
cmunet/study_labels.py): the picks come from the fine-tuning pool only, spread over patients,
the same for a seed and different across seeds, and reach the cell's search."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmunet.config import load_config
from cmunet.data.splits import load_splits, pool_keys
from cmunet.models.unet import UNet
from cmunet.study import finetune
from cmunet.study_config import Cell, StudyConfig
from cmunet.study_labels import selected_keys
from cmunet.training.finetune import patients_of

RATIO = "50-30"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    save_file(UNet(8).state_dict(), str(path))
    return path


def pick(shards, out, export, budget="3", seed=0, strategy="typiclust", log=print):
    return selected_keys(str(shards), load_splits(shards / "splits.json"), RATIO, budget,
                         strategy, seed, str(export), patients_of(shards), out, log)


def test_picks_are_pool_frames_of_distinct_patients_seeded(tiny_shards, export, tmp_path):
    splits = load_splits(tiny_shards / "splits.json")
    pool = set(pool_keys(splits, "finetune", RATIO))
    test = set(pool_keys(splits, "test", RATIO))
    patient_of = patients_of(tiny_shards)
    patients = {patient_of[k] for k in pool}
    budget = min(3, len(patients))
    lines: list[str] = []
    first = pick(tiny_shards, tmp_path, export, str(budget), log=lines.append)
    assert len(first) == budget and set(first) <= pool and not set(first) & test
    assert len({patient_of[k] for k in first}) == budget  # one frame per patient first
    assert pick(tiny_shards, tmp_path, export, str(budget), log=lines.append) == first
    assert any("embedded by an earlier run" in line for line in lines)  # embedded once
    draws = {tuple(pick(tiny_shards, tmp_path, export, "2", seed=s, strategy="kcenter"))
             for s in range(6)}
    assert len(draws) > 1  # the seed changes the selection


def test_selection_needs_an_encoder_and_a_number(tiny_shards, export, tmp_path):
    with pytest.raises(ValueError, match="label_encoder"):
        pick(tiny_shards, tmp_path, "none")
    with pytest.raises(ValueError, match="numbers of images"):
        pick(tiny_shards, tmp_path, export, budget="all")
    with pytest.raises(ValueError, match="exceeds"):
        pick(tiny_shards, tmp_path, export, budget="999")


def test_a_selection_arm_searches_on_its_picks(tiny_shards, export, tmp_path, monkeypatch):
    """The cell's search gets the strategy's picks, with the encoder of label_encoder's export
    (here an existing export, so nothing pre-trains)."""
    import cmunet.study
    import cmunet.training.tune

    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [
        f"data.shards={tiny_shards}", f"out={tmp_path}", "arms=[typi]",
        "variants={typi: {method: none, labels: typiclust, label_encoder: enc}}"])
    seen = {}
    monkeypatch.setattr(cmunet.study, "pretrain",
                        lambda cfg, cell, out, log: str(export) if cell.arm == "enc" else "none")
    monkeypatch.setattr(cmunet.training.tune, "run_tune",
                        lambda tune_cfg, log, keys: seen.update(keys=keys))
    cell = Cell("typi", "3", 1)
    finetune(cfg, cell, "none", tmp_path, print)
    assert seen["keys"] == pick(tiny_shards, tmp_path, export, "3", seed=1)
    random_cfg = replace(cfg, variants={"typi": replace(cfg.variants["typi"], labels="random")})
    finetune(random_cfg, cell, "none", tmp_path, print)
    splits = load_splits(tiny_shards / "splits.json")
    assert seen["keys"] == cmunet.study.budget_keys(splits, RATIO, "3", patients_of(tiny_shards), 1)


def test_label_encoder_may_be_an_export_path(tiny_shards, export, tmp_path, monkeypatch):
    import cmunet.study

    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [
        f"data.shards={tiny_shards}", f"out={tmp_path}", "arms=[typi]",
        f"variants={{typi: {{method: none, labels: kcenter, label_encoder: {export}}}}}"])
    monkeypatch.setattr(cmunet.study, "pretrain", lambda *a: pytest.fail("nothing pre-trains"))
    assert cmunet.study.label_encoder(cfg, Cell("typi", "2", 0), "none", tmp_path, print) == \
        str(export)
