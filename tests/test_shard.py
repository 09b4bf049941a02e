"""tools/shard.py: shards, manifest, splits, bad input, de-identified DICOM."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from cmunet.data.splits import load_splits
from cmunet.data.stream import load_manifest
from conftest import XCA, load_tool, write_tiny_images

shard = load_tool("shard")


def run(folder, out, *extra, masks=True, meta=True):
    args = ["--images", str(folder / "images"), "--out", str(out), "--size", "64",
            "--workers", "1", *extra]
    if masks:
        args += ["--masks", str(folder / "masks")]
    if meta:
        args += ["--meta", str(folder / "meta.csv")]
    return shard(args)


def test_manifest_and_patient_splits(tiny_shards):
    manifest = load_manifest(tiny_shards)
    assert manifest["count"] == 24 and manifest["labelled"] == 24 and manifest["patients"] == 8
    assert manifest["size"] == 64 and manifest["dtype"] == "uint8"
    assert 0 < manifest["std"] and 0 < manifest["mean"] < 255
    assert manifest["preprocess"]["unsharp_amount"] == 1.0
    tars = sorted(tiny_shards.glob("*.tar"))
    assert len(tars) == 12 and sum(s["count"] for s in manifest["shards"]) == 24
    with tarfile.open(tars[0]) as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{s['key']}.{ext}" for s in manifest["samples"][:2]
            for ext in ("image.png", "mask.png", "sample.json"))
    splits = load_splits(tiny_shards / "splits.json")
    patient = {s["key"]: s["patient"] for s in manifest["samples"]}
    test = set(splits["test"]["patients"])
    assert 0 < len(splits["test"]["keys"]) < 24
    assert {patient[k] for k in splits["test"]["keys"]} == test
    for ratio, pools in splits["ratios"].items():
        pt, ft = set(pools["pretrain"]["patients"]), set(pools["finetune"]["patients"])
        assert ft and not (pt & ft) and not (pt & test) and not (ft & test), ratio
        assert {patient[k] for k in pools["finetune"]["keys"]} == ft
    ft_sizes = [len(splits["ratios"][r]["finetune"]["keys"]) for r in ("50-30", "79-1")]
    assert ft_sizes[0] > ft_sizes[1]


def test_statistics_exclude_the_test_split(tiny_shards):
    manifest = load_manifest(tiny_shards)
    test = set(load_splits(tiny_shards / "splits.json")["test"]["keys"])
    train = [s for s in manifest["samples"] if s["key"] not in test]
    assert manifest["mean"] == pytest.approx(np.mean([s["mean"] for s in train]))


def test_same_input_gives_identical_shards(tiny_folder, tiny_shards, tmp_path):
    assert run(tiny_folder, tmp_path / "again", "--shard-size", "2") == 0
    for tar in tiny_shards.glob("*.tar"):
        assert (tmp_path / "again" / tar.name).read_bytes() == tar.read_bytes()


def test_official_test_list_is_kept(tiny_folder, tmp_path):
    (tmp_path / "test.txt").write_text("img000.png\nimg004.png\n")
    assert run(tiny_folder, tmp_path / "out", "--test-list", str(tmp_path / "test.txt")) == 0
    splits = load_splits(tmp_path / "out" / "splits.json")
    assert splits["test"]["keys"] == ["img000", "img004"]
    # the other frames of those patients (p00, p01) join no pool
    assert set(splits["excluded"]["keys"]) == {"img001", "img002", "img003", "img005"}
    for pools in splits["ratios"].values():
        used = set(pools["pretrain"]["keys"]) | set(pools["finetune"]["keys"])
        assert not used & set(splits["excluded"]["keys"] + splits["test"]["keys"])


def test_sixteen_bit_images_stay_sixteen_bit(tmp_path):
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(2000, 60000, (64, 64)).astype(np.uint16)
        Image.fromarray(pixels).save(folder / "images" / f"a{i}.png")
    assert run(folder, tmp_path / "out", masks=False, meta=False) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["dtype"] == "uint16" and manifest["mean"] > 255


# ---- bad input: every case names the file, exits non-zero and leaves no output ---------------

def _corrupt(folder, case):
    img = folder / "images" / "img005.png"
    mask = folder / "masks" / "img005.png"
    if case == "truncated image":
        img.write_bytes(img.read_bytes()[:200])
        return img, "cannot read image"
    if case == "unreadable image":
        img.write_bytes(b"this is not a png")
        return img, "cannot read image"
    if case == "mask of another size":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
        return mask, "mask is 32x32 but its image is 64x64"
    if case == "non-binary mask":
        Image.fromarray(np.arange(64 * 64).reshape(64, 64).astype(np.uint8)).save(mask)
        return mask, "mask is not binary"
    if case == "empty mask":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
        return mask, "mask is empty"
    if case == "NaN image":
        import tifffile

        img.unlink()
        img = img.with_suffix(".tif")
        values = np.full((64, 64), 0.5, np.float32)
        values[3, 3] = np.nan
        tifffile.imwrite(img, values)
        return img, "NaN"
    if case == "constant image":
        Image.fromarray(np.full((64, 64), 9, np.uint8)).save(img)
        return img, "image is constant"
    if case == "1-pixel image":
        Image.fromarray(np.full((1, 1), 9, np.uint8)).save(img)
        return img, "image is 1x1 pixels"
    if case == "unreadable DICOM":
        img.unlink()
        img = img.with_suffix(".dcm")
        img.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
        return img, "DICOM file"
    raise AssertionError(case)


BAD = ["truncated image", "unreadable image", "mask of another size", "non-binary mask",
       "empty mask", "NaN image", "constant image", "1-pixel image", "unreadable DICOM"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_stops_with_the_file_named(case, tmp_path, capsys):
    folder = write_tiny_images(tmp_path / "in", count=8)
    bad, problem = _corrupt(folder, case)
    out = tmp_path / "out"
    assert run(folder, out) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and problem in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in"]  # no temp left


@pytest.mark.parametrize("case", BAD)
def test_skip_bad_counts_and_lists(case, tmp_path, capsys):
    folder = write_tiny_images(tmp_path / "in", count=8)
    bad, problem = _corrupt(folder, case)
    assert run(folder, tmp_path / "out", "--skip-bad") == 0
    printed = capsys.readouterr().out
    manifest = load_manifest(tmp_path / "out")
    assert str(bad) in printed and problem in printed
    if "mask" in case:  # a bad mask leaves its image usable for pre-training
        assert manifest["count"] == 8 and manifest["labelled"] == 7
        assert [d["file"] for d in manifest["dropped_masks"]] == [str(bad)]
    else:
        assert manifest["count"] == 7 and [s["file"] for s in manifest["skipped"]] == [str(bad)]


def test_empty_input_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert shard(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(tiny_folder, out) == 2 and (out / "keep.txt").exists()
    assert "already exists" in capsys.readouterr().err
    assert run(tiny_folder, out, "--overwrite") == 2 and (out / "keep.txt").exists()
    assert "not written by this tool" in capsys.readouterr().err  # a foreign folder stays
    (out / "keep.txt").unlink()
    assert run(tiny_folder, out, "--overwrite") == 0 and (out / "manifest.json").exists()
    assert run(tiny_folder, out, "--overwrite") == 0  # an earlier output of this tool is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_an_input(tmp_path, capsys):
    data = write_tiny_images(tmp_path / "DATA", count=3)
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    assert run(data, data, "--overwrite") == 2  # --out DATA holds the images, masks and meta
    assert "holds the input images" in capsys.readouterr().err
    assert run(data, data / "images", "--overwrite") == 2
    assert "is the input images" in capsys.readouterr().err
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before
    (tmp_path / "file").write_text("x")
    assert run(data, tmp_path / "file") == 2 and "existing file" in capsys.readouterr().err


def test_mask_without_an_image_is_named_or_skipped(tmp_path, capsys):
    folder = write_tiny_images(tmp_path / "in", count=3, per_patient=1)
    shutil.copy(folder / "masks" / "img000.png", folder / "masks" / "orphan.png")
    assert run(folder, tmp_path / "out", meta=False) == 2
    err = capsys.readouterr().err
    assert "orphan.png: mask without an image" in err
    assert run(folder, tmp_path / "out", "--skip-bad", meta=False) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["orphan_masks"] == [str(folder / "masks" / "orphan.png")]
    assert "orphan.png" in capsys.readouterr().out


def test_one_sixteen_bit_file_is_named_and_skippable(tmp_path, capsys):
    folder = write_tiny_images(tmp_path / "in", count=4, per_patient=1)
    odd = folder / "images" / "img002.png"
    Image.fromarray(np.asarray(Image.open(odd)).astype(np.uint16) * 256).save(odd)
    assert run(folder, tmp_path / "out") == 2
    assert f"{odd}: is stored as uint16" in capsys.readouterr().err
    assert run(folder, tmp_path / "out", "--skip-bad") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["count"] == 3 and [s["file"] for s in manifest["skipped"]] == [str(odd)]


@pytest.mark.slow
def test_sigterm_and_sigkill_leave_no_temporary_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    folder = write_tiny_images(tmp_path / "in", count=60, size=256)
    cmd = [sys.executable, str(ROOT / "tools/shard.py"), "--images", str(folder / "images"),
           "--out", str(tmp_path / "out"), "--workers", "1", "--size", "256"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(60) == (143 if sig == signal.SIGTERM else -sig), proc.stderr.read()
        left = list(tmp_path.glob(".out.tmp-*"))
        assert left == [] if sig == signal.SIGTERM else len(left) == 1
    assert not (tmp_path / "out").exists()
    subprocess.run([*cmd, "--size", "32"], check=True, capture_output=True)  # removes the stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_images_without_patient_are_counted_or_refused(tmp_path, capsys):
    folder = write_tiny_images(tmp_path / "in", count=6)
    assert run(folder, tmp_path / "out", meta=False) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["patient_unknown"] == 6 and manifest["patients"] == 6  # one per image
    assert "warning: 6 of 6 images have no patient information" in capsys.readouterr().err
    assert run(folder, tmp_path / "strict", "--require-patient", meta=False) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "6 of 6 images have no patient" in err and "img000" in err
    assert not (tmp_path / "strict").exists()
    assert run(folder, tmp_path / "meta", "--require-patient") == 0  # the metadata names them
    manifest = load_manifest(tmp_path / "meta")
    assert manifest["patient_unknown"] == 0 and "warning" not in capsys.readouterr().err


def test_failure_in_a_late_file_removes_everything(tmp_path):
    folder = write_tiny_images(tmp_path / "in", count=30)
    (folder / "images" / "img029.png").write_bytes(b"broken")
    assert run(folder, tmp_path / "out", "--shard-size", "2", "--workers", "2") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
@pytest.mark.skipif(not XCA.exists(), reason="needs ../shared/data/xca-cadml")
def test_xca_cadml_with_its_patient_groups(tmp_path, capsys):
    out = tmp_path / "xca"
    code = shard(["--images", str(XCA / "images"), "--masks", str(XCA / "masks"),
                  "--meta", str(XCA / "metadata.json"), "--out", str(out), "--size", "128",
                  "--skip-bad"])
    assert code == 0
    manifest = load_manifest(out)
    assert manifest["count"] == 344 and manifest["patients"] == 26
    assert manifest["labelled"] == 341  # three masks are empty: kept for pre-training only
    groups = {m["case"]: m["patient_group"] for m in json.loads((XCA / "metadata.json").read_text())}
    assert all(s["patient"] == groups[s["key"]] for s in manifest["samples"])
    shutil.rmtree(out)


@pytest.mark.slow
def test_synth_then_shard_command_lines(tmp_path):
    """The documented commands: 60 synthetic 256² angiograms -> shards, manifest, splits."""
    import subprocess
    import sys

    from conftest import ROOT

    syn, out = tmp_path / "SYN", tmp_path / "SHARDS"
    subprocess.run([sys.executable, "tools/synth.py", "--out", str(syn), "--count", "60",
                    "--size", "256", "--seed", "1"], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "tools/shard.py", "--images", str(syn / "images"),
                    "--masks", str(syn / "masks"), "--meta", str(syn / "meta.csv"),
                    "--out", str(out)], cwd=ROOT, check=True)
    manifest = load_manifest(out)
    assert manifest["count"] == 60 and manifest["size"] == 256  # default: the native size
    assert {"mean", "std"} <= set(manifest) and list(out.glob("*.tar"))
    splits = load_splits(out / "splits.json")
    test = set(splits["test"]["patients"])
    for pools in splits["ratios"].values():
        assert not set(pools["pretrain"]["patients"]) & set(pools["finetune"]["patients"])
        assert not (set(pools["pretrain"]["patients"]) | set(pools["finetune"]["patients"])) & test
