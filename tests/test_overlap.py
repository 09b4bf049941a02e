"""Pre-training data from other folders: test images refused by content hash, ``data.pool=none``
(pre-training on extra folders only), and the start-up warnings of the pre-training config."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from cmunet.config import load_config
from cmunet.data.overlap import find_test_images, refuse_test_overlap
from cmunet.data.splits import load_splits, pool_keys
from cmunet.training.distributed import DistInfo
from cmunet.training.pretrain import _Run
from cmunet.training.pretrain_config import PretrainConfig
from conftest import ROOT, load_tool


def archive(tiny_folder, out, names: list[str]):
    """Shards of some of the tiny images, renamed and without masks or metadata: an 'archive'."""
    images = out.parent / f"{out.name}-images"
    images.mkdir()
    for name in names:
        shutil.copy(tiny_folder / "images" / f"{name}.png", images / f"arch_{name}.png")
    assert load_tool("shard")(["--images", str(images), "--out", str(out), "--size", "64",
                               "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def archives(tiny_folder, tiny_shards, tmp_path_factory):
    splits = load_splits(tiny_shards / "splits.json")
    test, pool = pool_keys(splits, "test"), pool_keys(splits, "pretrain", "50-30")
    root = tmp_path_factory.mktemp("archives")
    return (archive(tiny_folder, root / "leaky", pool[:3] + test[:2]),
            archive(tiny_folder, root / "clean", pool[:4]), test)


def test_test_images_in_an_extra_folder_are_found_by_hash(tiny_shards, archives):
    leaky, clean, test = archives
    assert sorted(find_test_images(tiny_shards, leaky)) == [(f"arch_{k}", k) for k in test[:2]]
    assert find_test_images(tiny_shards, clean) == []
    refuse_test_overlap(tiny_shards, [clean])
    with pytest.raises(ValueError, match=rf"{leaky} holds 2 test image\(s\).*arch_{test[0]}"):
        refuse_test_overlap(tiny_shards, [clean, leaky])
    with pytest.raises(ValueError, match="holds"):  # the labelled folder itself as an extra
        refuse_test_overlap(tiny_shards, [tiny_shards])


def test_pretraining_refuses_a_folder_with_test_images(tiny_shards, archives, tmp_path):
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/mae-cpu.yaml", [
        f"data.shards={tiny_shards}", f"data.extra_shards=[{archives[0]}]", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="test image"):  # before any engine is built
        _Run(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def test_pool_none_needs_extra_folders():
    with pytest.raises(ValueError, match="extra_shards"):
        load_config(PretrainConfig, None, ["data.pool=none"])


def test_contrastive_with_grad_accum_warns():
    def warnings(*keys):
        return load_config(PretrainConfig, None, list(keys)).warnings()

    assert "InfoNCE" in " ".join(warnings("method=cmunet", "train.grad_accum=2"))
    assert "InfoNCE" in " ".join(warnings("method=cmunet-con", "train.grad_accum=2"))
    assert warnings("method=cmunet", "train.grad_accum=1") == []
    assert warnings("method=cmunet-rec", "train.grad_accum=2") == []  # no contrastive branch
    assert warnings("method=mae", "train.grad_accum=2") == []


@pytest.mark.slow
def test_pretraining_on_extra_folders_only(tiny_shards, archives, tmp_path):
    clean = archives[1]
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
         str(ROOT / "configs/pretrain/cmunet-cpu.yaml"), f"data.shards={tiny_shards}",
         "data.pool=none", f"data.extra_shards=[{clean}]", "out=OUT", "view_size=64",
         "model.width=4", "cmunet.mlp_hidden=16", "cmunet.mlp_out=8", "data.num_workers=0",
         "train.micro_batch=2", "train.grad_accum=2", "train.epochs=1", "tracking.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pool none/79-1: 4 images" in done.stdout and "warning: train.grad_accum=2" in done.stdout
    assert (tmp_path / "OUT" / "export" / "model.safetensors").exists()
