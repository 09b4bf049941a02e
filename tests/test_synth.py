"""Tests of the synthetic angiogram generator (cmunet.data.synth and tools/synth.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmunet.data import synth

REPO = Path(__file__).resolve().parents[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_same_seed_same_image_other_seed_other_image():
    image, mask = synth.synth_angiogram(np.random.default_rng(7), size=96)
    again, mask_again = synth.synth_angiogram(np.random.default_rng(7), size=96)
    other, mask_other = synth.synth_angiogram(np.random.default_rng(8), size=96)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert not np.array_equal(image, other)
    assert not np.array_equal(mask, mask_other)


@pytest.mark.parametrize("bits, dtype", [(8, np.uint8), (16, np.uint16)])
def test_shapes_and_dtypes(bits, dtype):
    image, mask = synth.synth_angiogram(np.random.default_rng(1), size=80, bits=bits)
    assert image.shape == mask.shape == (80, 80)
    assert image.dtype == dtype and mask.dtype == bool
    if bits == 16:
        assert image.max() > 255 * 16  # 12-bit-like values over the 16-bit range
        # more grey levels than an 8-bit image could have: not 8-bit values scaled up
        assert np.unique(image).size > 256


def test_16_bit_is_the_8_bit_image_at_higher_precision():
    image8, _ = synth.synth_angiogram(np.random.default_rng(3), size=64, bits=8)
    image16, _ = synth.synth_angiogram(np.random.default_rng(3), size=64, bits=16)
    assert np.abs(image16 / 65535.0 - image8 / 255.0).max() < 1.0 / 255


def test_bits_must_be_8_or_16():
    with pytest.raises(ValueError, match="bits"):
        synth.synth_angiogram(np.random.default_rng(0), size=32, bits=12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mask_fraction_and_dark_vessels(seed):
    image, mask = synth.synth_angiogram(np.random.default_rng(seed), size=128)
    assert 0.02 < mask.mean() < 0.12
    inside, outside = image[mask].mean(), image[~mask].mean()
    assert inside < outside - 15, (inside, outside)
    assert 90 < image.mean() < 180  # realistic 8-bit brightness (real data: about 130)


def test_tube_path_length_lumen_and_anti_aliasing():
    """A horizontal tube of radius 4 centred on y = 20.4: Beer-Lambert chord 2 sqrt(r^2 - d^2),
    lumen where d <= r, and a thin anti-aliased rim just outside the lumen."""
    points = np.array([[5.0, 20.4], [35.0, 20.4]])
    radii = np.array([4.0, 4.0])
    path_box, lumen_box, box = synth._render_tube(points, radii, np.ones(2), (40, 40))
    path, lumen = np.zeros((40, 40), np.float32), np.zeros((40, 40), bool)
    path[box], lumen[box] = path_box, lumen_box
    column = path[:, 20]
    assert column[20] == pytest.approx(2 * np.sqrt(16 - 0.4**2), abs=1e-4)
    assert column[22] == pytest.approx(2 * np.sqrt(16 - 1.6**2), abs=1e-4)
    assert np.flatnonzero(lumen[:, 20]).tolist() == list(range(17, 25))  # |y - 20.4| <= 4
    assert 0 < column[16] < column[17] and not lumen[16, 20]  # d = 4.4: rim, not lumen
    assert column[15] == 0 and column[26] == 0


def test_frames_of_a_patient_share_the_tree():
    same, other = [], []
    for p in range(4):
        patient = synth.make_patient(synth.patient_rng(11, p))
        stranger = synth.make_patient(synth.patient_rng(11, p + 50))
        _, a = synth.render_frame(patient, synth.image_rng(11, 2 * p), 64)
        _, b = synth.render_frame(patient, synth.image_rng(11, 2 * p + 1), 64)
        _, c = synth.render_frame(stranger, synth.image_rng(11, 2 * p + 1), 64)
        assert not np.array_equal(a, b)  # frames differ (motion, contrast filling)
        same.append(_iou(a, b))
        other.append(_iou(a, c))
    assert np.mean(same) > 2 * np.mean(other) + 0.1, (same, other)


def test_generate_writes_images_masks_and_meta(tmp_path):
    out = tmp_path / "ds"
    rows = synth.generate(out, count=7, size=48, seed=5, bits=16, frames_per_patient=3)
    names = [f"syn{i:04d}.png" for i in range(7)]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    assert sorted(p.name for p in (out / "masks").iterdir()) == names
    image, mask = _read(out / "images" / names[0]), _read(out / "masks" / names[0])
    assert image.shape == (48, 48) and image.dtype == np.uint16 and image.max() > 255
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    with open(out / "meta.csv", newline="") as f:
        meta = list(csv.reader(f))
    assert meta[0] == ["image", "patient", "spacing_mm"]
    assert [r[0] for r in meta[1:]] == names
    assert [r[1] for r in meta[1:]] == ["synp000"] * 3 + ["synp001"] * 3 + ["synp002"]
    assert all(float(r[2]) == pytest.approx(0.3 * 512 / 48) for r in meta[1:])
    assert len(rows) == 7
    assert not list(tmp_path.glob(".ds.tmp-*"))  # the temporary folder is gone


def test_generate_is_byte_identical_whatever_the_workers(tmp_path):
    synth.generate(tmp_path / "a", count=4, size=40, seed=3, frames_per_patient=2)
    synth.generate(tmp_path / "b", count=4, size=40, seed=3, frames_per_patient=2, workers=2)
    synth.generate(tmp_path / "c", count=4, size=40, seed=4, frames_per_patient=2)
    for sub in ("images", "masks"):
        for f in sorted((tmp_path / "a" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes()
    first = (tmp_path / "a" / "images" / "syn0000.png").read_bytes()
    assert first != (tmp_path / "c" / "images" / "syn0000.png").read_bytes()


def test_generate_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate(tmp_path, count=2, size=32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    synth.generate(tmp_path, count=2, size=32, seed=0, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert len(list((tmp_path / "images").iterdir())) == 2


def test_overwrite_keeps_a_file_of_the_users_inside_images_or_masks(tmp_path):
    synth.generate(tmp_path, count=2, size=32, seed=0)
    for sub in ("images", "masks"):
        own = tmp_path / sub / "my-angiogram.png"
        own.write_bytes(b"precious")
        before = sorted(p.name for p in (tmp_path / sub).iterdir())
        with pytest.raises(ValueError, match="my-angiogram.png was not written by this tool"):
            synth.generate(tmp_path, count=3, size=32, seed=1, overwrite=True)
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == before  # nothing deleted
        assert own.read_bytes() == b"precious"
        own.unlink()
    synth.generate(tmp_path, count=3, size=32, seed=1, overwrite=True)  # its own files only
    assert len(list((tmp_path / "images").iterdir())) == 3
    (tmp_path / "meta.csv").unlink()  # a folder of images that no meta.csv lists: refused
    with pytest.raises(ValueError, match="syn0000.png was not written by this tool"):
        synth.generate(tmp_path, count=2, size=32, seed=0, overwrite=True)
    refused = _cli("--out", str(tmp_path), "--count", "2", "--size", "32", "--overwrite")
    last = refused.stderr.strip().splitlines()[-1]  # argparse's usage, then one error line
    assert refused.returncode == 2 and "syn0000.png was not written" in last, refused.stderr
    assert len(list((tmp_path / "images").iterdir())) == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/synth.py", *args], cwd=REPO, capture_output=True, text=True
    )


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--count", "6", "--size", "64", "--seed", "2"]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()
    assert len(summary) == 1 and "6 images" in summary[0] and "2 patients" in summary[0]
    assert len(list((out / "images").glob("syn*.png"))) == 6
    assert len(list((out / "masks").glob("syn*.png"))) == 6
    assert _read(out / "images" / "syn0005.png").dtype == np.uint8
    refused = _cli(*args)
    assert refused.returncode != 0 and "not empty" in refused.stderr
    again = _cli(*args, "--overwrite", "--frames-per-patient", "2")
    assert again.returncode == 0, again.stderr
    assert "3 patients" in again.stdout
