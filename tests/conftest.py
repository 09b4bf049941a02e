"""Shared fixtures: a tiny labelled image folder and shards built from it (no private data)."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# a pre-training small enough for 2 CPU ranks in seconds: launch/pretrain.py's first arguments
TINY_PRETRAIN = ["--config", str(ROOT / "configs/pretrain/cmunet-cpu.yaml"), "view_size=64",
                 "model.width=8", "cmunet.mlp_hidden=64", "cmunet.mlp_out=32",
                 "data.num_workers=1", "train.micro_batch=4"]
XCA = ROOT.parent / "shared" / "data" / "xca-cadml"


def load_tool(name: str):
    """The ``main`` function of ``tools/<name>.py`` or ``launch/<name>.py``, called in-process."""
    for folder in ("tools", "launch"):
        path = ROOT / folder / f"{name}.py"
        if path.exists():
            return runpy.run_path(str(path), run_name=f"cmunet_{name}")["main"]
    raise FileNotFoundError(name)


def write_tiny_images(folder: Path, count: int = 24, size: int = 64, per_patient: int = 3,
                      seed: int = 0) -> Path:
    """``folder/images``, ``folder/masks`` and ``folder/meta.csv``: bright noisy images with one
    dark diagonal 'vessel' each, and its mask."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        offset = rng.integers(-size // 4, size // 4)
        mask = np.abs(yy - xx - offset) <= 2
        image = 150 + 20 * rng.standard_normal((size, size)) - 80 * mask
        name = f"img{i:03d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / name)
        rows.append({"image": name, "patient": f"p{i // per_patient:02d}", "spacing_mm": 0.3})
    with (folder / "meta.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "patient", "spacing_mm"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_images(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_shards(tiny_folder, tmp_path_factory) -> Path:
    """Shards of the tiny folder at 64 px: 24 samples, 8 patients, 12 shards of 2."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    shard = load_tool("shard")
    code = shard(["--images", str(tiny_folder / "images"), "--masks", str(tiny_folder / "masks"),
                  "--meta", str(tiny_folder / "meta.csv"), "--out", str(out), "--size", "64",
                  "--workers", "1", "--shard-size", "2"])
    assert code == 0
    return out
