"""Semi-supervised fine-tuning (cmunet/training/semi.py): the teacher gets no gradient and moves
only by the EMA rule, unconfident pixels add nothing, the ramp-up, weight 0 is plain fine-tuning
bit for bit, a weighted run trains on unlabelled frames that are never test or validation frames,
and the weight reaches the search's grid and a study's arms (on the tiny shards)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cmunet.data.stream as stream
import cmunet.training.tune as tune_module
from cmunet.config import ConfigError, load_config
from cmunet.data.splits import load_splits, pool_keys
from cmunet.models.unet import UNet
from cmunet.study import finetune as study_finetune
from cmunet.study_config import Arm, Cell, StudyConfig, StudyData
from cmunet.training.finetune import (FinetuneConfig, carve_validation, fit, patients_of,
                                      segmentation_loss, train_epoch, write_history)
from cmunet.training.semi import (Consistency, UnlabelledConfig, consistency_loss, momentum,
                                  keys_without_copies, ramp, refuse_leaks,
                                  unlabelled_keys)
from cmunet.training.tune_config import SearchConfig, TuneConfig, finetune_settings, trial_settings
from conftest import ROOT

CPU_YAML = str(ROOT / "configs" / "finetune" / "cpu.yaml")
TINY = ["model_width=8", "train.epochs=2", "train.batch_size=4", "data.ratio=50-30",
        "tracking.enabled=false"]


def tiny_cfg(shards, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CPU_YAML, [f"data.shards={shards}", *TINY, *overrides])


def initial() -> dict[str, torch.Tensor]:
    """The same initial weights for every fit of this file."""
    torch.manual_seed(0)
    return UNet(8).state_dict()


def split_of(shards) -> tuple[dict, dict[str, str], list[str], list[str]]:
    """(splits, patient of each key, train keys, validation keys) of the 50-30 pool."""
    splits, patient_of = load_splits(shards / "splits.json"), patients_of(shards)
    train, val = carve_validation(pool_keys(splits, "finetune", "50-30"), patient_of, 0.3, 0)
    return splits, patient_of, train, val


# ---- the pieces ----------------------------------------------------------------------------------

def consistency(student: UNet, steps: int) -> Consistency:
    """A :class:`Consistency` of ``steps`` hand-made unlabelled batches of two 32-px views."""
    image = torch.randn(2, 1, 32, 32)
    views = torch.stack([image, image + 0.1 * torch.randn_like(image)], dim=2)  # (B, 1, 2, H, W)
    return Consistency(UnlabelledConfig(weight=1.0, threshold=0.5, rampup_epochs=0, ema=0.99),
                       student, iter([{"image": views}] * steps), torch.device("cpu"), bf16=False)


def test_the_teacher_gets_no_gradient_and_moves_only_by_the_ema_rule():
    torch.manual_seed(0)
    student = UNet(8).train()
    image = torch.randn(2, 1, 32, 32)
    semi = consistency(student, 1)
    before = {k: v.clone() for k, v in semi.teacher.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    target = (torch.rand(2, 32, 32) > 0.8).long()
    loss = segmentation_loss(student(image), target) + semi.loss(student)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in semi.teacher.parameters())
    assert not semi.teacher.training
    assert all(torch.equal(before[k], v) for k, v in semi.teacher.state_dict().items())  # yet
    semi.update(student)
    rate = momentum(0.99, 1)
    assert rate == 0.5
    teacher = dict(semi.teacher.named_parameters())
    moved = 0
    for name, value in student.named_parameters():  # teacher = 0.5 teacher + 0.5 student
        torch.testing.assert_close(teacher[name], rate * before[name] + (1 - rate) * value)
        assert torch.equal(teacher[name], torch.lerp(before[name], value, 1 - rate)), name
        moved += not torch.equal(teacher[name], before[name])
    assert moved == len(teacher)
    buffers = dict(semi.teacher.named_buffers())
    for name, value in student.named_buffers():  # BatchNorm statistics: the student's
        assert torch.equal(buffers[name], value), name
    assert momentum(0.99, 2) == pytest.approx(2 / 3) and momentum(0.99, 1000) == 0.99


def test_the_unlabelled_loss_reads_nothing_from_the_device_per_step():
    from test_gpu_path import host_syncs

    torch.manual_seed(0)
    model = UNet(4)
    semi = consistency(model, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as on a GPU
    batch = {"image": torch.randn(2, 1, 32, 32), "mask": torch.rand(2, 1, 32, 32) > 0.5}
    syncs = host_syncs(lambda: train_epoch(model, [batch] * 3, optimizer, torch.device("cpu"),
                                           False, semi))
    assert syncs == ["aten::_local_scalar_dense"]  # the epoch's mean supervised loss
    assert semi.steps == 3 and semi.summary()["unlabelled_loss"] > 0


def test_pixels_below_the_threshold_add_exactly_nothing():
    prob = torch.tensor([[0.99, 0.01], [0.6, 0.3]])  # teacher foreground probabilities
    teacher = torch.stack([torch.zeros(2, 2), torch.logit(prob)])[None]  # softmax[:, 1] = prob
    torch.manual_seed(0)
    student = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss, confident = consistency_loss(student, teacher, threshold=0.95)
    assert confident.item() == 0.5  # 0.99 and 0.01 (max(p, 1 - p) = 0.99); not 0.6, 0.3
    expected = (F.cross_entropy(student[:, :, 0, 0], torch.tensor([1]))
                + F.cross_entropy(student[:, :, 0, 1], torch.tensor([0]))) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(student.grad[0, :, 1] == 0)  # the unconfident row: no gradient at all
    assert torch.all(student.grad[0, :, 0] != 0)
    changed = student.detach().clone()
    changed[0, :, 1] += 50.0  # whatever the student says there
    assert consistency_loss(changed, teacher, 0.95)[0].item() == loss.item()
    assert consistency_loss(student, teacher, 0.65)[1].item() == 0.75  # 0.3 counts now (0.7)


def test_the_ramp_up():
    assert ramp(1, 5) == pytest.approx(math.exp(-5))
    assert ramp(3, 5) == pytest.approx(math.exp(-5 * 0.6 ** 2))
    assert ramp(6, 5) == ramp(30, 5) == 1.0
    assert ramp(1, 0) == 1.0
    values = [ramp(e, 5) for e in range(1, 8)]
    assert values == sorted(values) and values[0] < 0.01


def test_the_config_refuses_a_strong_view_that_moves_pixels():
    with pytest.raises(ConfigError, match="strong.p_rotate"):
        load_config(FinetuneConfig, None, ["unlabelled.strong.p_rotate=0.3"])
    with pytest.raises(ConfigError, match="threshold"):
        load_config(FinetuneConfig, None, ["unlabelled.threshold=0.3"])


# ---- which frames --------------------------------------------------------------------------------

def test_the_unlabelled_pool_holds_no_test_no_validation_and_no_label(tiny_shards):
    splits, patient_of, train, val = split_of(tiny_shards)
    folder, keys = unlabelled_keys("pool", str(tiny_shards), train, val, patient_of)
    val_patients = {patient_of[k] for k in val}
    assert folder == str(tiny_shards) and keys
    assert not set(keys) & (set(pool_keys(splits, "test")) | set(train) | set(val))
    assert not {patient_of[k] for k in keys} & val_patients
    assert set(keys) == {k for k in pool_keys(splits, "train")
                         if k not in train and patient_of[k] not in val_patients}
    test = pool_keys(splits, "test")
    with pytest.raises(RuntimeError, match="1 test frame"):
        refuse_leaks([*keys, test[0]], test, "test", "pool")


def test_another_shard_set_holding_a_test_image_is_refused(tiny_shards):
    _, patient_of, train, val = split_of(tiny_shards)
    with pytest.raises(ValueError, match="test image"):
        unlabelled_keys(str(tiny_shards), str(tiny_shards), train, val, patient_of)


def test_copies_of_validation_images_in_another_set_are_left_out(tiny_shards):
    _, patient_of, _, val = split_of(tiny_shards)
    every = set(patient_of)
    # the set itself as the other set: each validation frame is its own copy, nothing else is
    assert set(keys_without_copies(str(tiny_shards), str(tiny_shards), val)) == every - set(val)
    assert set(keys_without_copies(str(tiny_shards), str(tiny_shards), [])) == every


# ---- in fit --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(tiny_shards):
    """Plain fine-tuning (the defaults: no unlabelled frames) and its keys."""
    _, _, train, val = split_of(tiny_shards)
    return fit(tiny_cfg(tiny_shards), train, val, initial()), train, val


def test_weight_zero_is_plain_finetuning_bit_for_bit(plain, tiny_shards):
    result, train, val = plain
    # every other knob changed, the source a folder that does not exist: none of it is used
    off = tiny_cfg(tiny_shards, "unlabelled.weight=0", "unlabelled.source=/nonexistent/shards",
                   "unlabelled.ratio=5", "unlabelled.threshold=0.5", "unlabelled.ema=0.5",
                   "unlabelled.rampup_epochs=0", "unlabelled.strong.p_noise=1")
    again = fit(off, train, val, initial())
    assert again.n_unlabelled == result.n_unlabelled == 0
    assert set(again.best_state) == set(result.best_state)
    assert all(torch.equal(again.best_state[k], v) for k, v in result.best_state.items())
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in again.history]
    assert set(result.history[0]) == {"epoch", "train_loss", "val_dice", "seconds"}


def test_a_weighted_run_trains_on_unlabelled_frames_and_logs_them(plain, tiny_shards, tmp_path,
                                                                  monkeypatch):
    result, train, val = plain
    splits, patient_of, _, _ = split_of(tiny_shards)
    decoded: list[str] = []
    real_call = stream._Decoder.__call__

    def decode(self, raw):
        decoded.append(raw["__key__"])
        return real_call(self, raw)

    monkeypatch.setattr(stream._Decoder, "__call__", decode)
    cfg = tiny_cfg(tiny_shards, "unlabelled.weight=0.5", "unlabelled.rampup_epochs=1",
                   "unlabelled.threshold=0.6")
    semi = fit(cfg, train, val, initial())
    _, expected = unlabelled_keys("pool", str(tiny_shards), train, val, patient_of)
    assert semi.n_unlabelled == len(expected) > 0
    unlabelled = set(decoded) - set(train) - set(val)
    assert unlabelled and unlabelled <= set(expected)  # read from the unlabelled pool only
    assert not set(decoded) & set(pool_keys(splits, "test"))
    first, second = semi.history
    assert first["unlabelled_weight"] == pytest.approx(0.5 * math.exp(-5))
    assert second["unlabelled_weight"] == 0.5
    for row in semi.history:
        assert math.isfinite(row["unlabelled_loss"]) and row["unlabelled_loss"] > 0
        assert 0 < row["confident"] <= 1
    assert not all(torch.equal(semi.best_state[k], v) for k, v in result.best_state.items())
    write_history(semi.history, tmp_path / "history.csv")
    header = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,val_dice,unlabelled_loss,confident,unlabelled_weight,seconds"
    # a search's retrained winner records them too (the study's cells read its result.json)
    from cmunet.training.winner import save_model

    folder = save_model(dataclasses.replace(cfg, out=str(tmp_path / "model")), semi,
                        {"cv_dice": 0.5}, [*train, *val])
    assert json.loads((folder / "result.json").read_text())["n_unlabelled"] == semi.n_unlabelled


# ---- the search and the study --------------------------------------------------------------------

def test_the_search_grid_takes_the_unlabelled_weight_as_a_dimension():
    from cmunet.training.search import param_space
    from cmunet.training.tune_results import edge_of_grid

    assert set(param_space(SearchConfig(lr=[1e-3], batch_size=[4]))) == {"lr", "batch_size"}
    search = SearchConfig(lr=[1e-3], batch_size=[4], unlabelled_weight=[0.0, 0.5])
    space = param_space(search)
    assert space["unlabelled_weight"] == {"grid_search": [0.0, 0.5]}
    assert "unlabelled_weight" in param_space(dataclasses.replace(search, mode="random"))
    best = {"lr": 1e-3, "batch_size": 4, "unlabelled_weight": 0.5}
    assert [m.split(" ")[0] for m in edge_of_grid(best, search)] == ["unlabelled_weight=0.5"]
    assert edge_of_grid({**best, "unlabelled_weight": 0.0}, search) == []  # 0 = off: no edge
    settings = trial_settings(FinetuneConfig(), best)
    assert (settings.unlabelled.weight, settings.train.lr, settings.train.batch_size) == \
        (0.5, 1e-3, 4)
    assert trial_settings(FinetuneConfig(), {"lr": 1e-3, "batch_size": 4}).unlabelled.weight == 0
    with pytest.raises(ConfigError, match="unlabelled_weight"):
        load_config(TuneConfig, None, ["search.unlabelled_weight=[-1]"])


def test_a_study_arm_passes_the_unlabelled_weight_to_its_trials(tiny_shards, tmp_path,
                                                                monkeypatch):
    seen: list[TuneConfig] = []
    monkeypatch.setattr(tune_module, "run_tune", lambda cfg, log, keys: seen.append(cfg))
    cfg = StudyConfig(out=str(tmp_path), data=StudyData(shards=str(tiny_shards)),
                      arms=["none", "semi"],
                      variants={"semi": Arm(method="none", tune=["unlabelled.weight=0.5"])})
    for arm in cfg.arms:
        study_finetune(cfg, Cell(arm, "4", 0), "none", tmp_path, lambda m: None)
    weights = [trial_settings(finetune_settings(t), {"lr": 1e-3, "batch_size": 4})
               .unlabelled.weight for t in seen]
    assert weights == [0.0, 0.5]
