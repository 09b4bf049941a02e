"""Cine loops: synthetic multi-frame XA DICOM whose contrast comes and goes, frame selection by
contrast phase and stride (cmunet/data/cine.py), the loop and frame of each sample, and splits
that keep a loop's frames with its patient."""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from collections import defaultdict
from contextlib import redirect_stderr

import numpy as np
import pydicom
import pytest

from cmunet.data import synth
from cmunet.data.cine import choose_frames
from cmunet.data.index import SampleIndex, load_manifest
from cmunet.data.io import read_frames
from conftest import load_tool

LOOPS, FRAMES, SIZE = 6, 20, 64  # 3 patients of 2 loops


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    """6 synthetic loops of 20 frames at 64 px, and one single-frame DICOM of a 4th patient."""
    folder = tmp_path_factory.mktemp("cine") / "syn"
    synth.generate_cine(folder, LOOPS, FRAMES, SIZE, seed=0, loops_per_patient=2)
    still = read_frames(folder / "images" / synth.cine_name(0))[0].pixels
    synth.write_cine_dicom(folder / "images" / "still.dcm", still[None], "synp009",
                           synth.spacing_mm(SIZE), "still")
    return folder


def truth(folder) -> dict[str, np.ndarray]:
    """Loop key -> the concentration of each frame (cine.csv)."""
    rows = defaultdict(list)
    with open(folder / "cine.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows[row["image"].removesuffix(".dcm")].append(float(row["concentration"]))
    return {key: np.array(values) for key, values in rows.items()}


def stacks(folder) -> dict[str, list[np.ndarray]]:
    return {key: [f.pixels for f in read_frames(folder / "images" / f"{key}.dcm")]
            for key in truth(folder)}


def shard(folder, out, *flags) -> int:
    return load_tool("shard")(["--images", str(folder / "images"), "--out", str(out),
                               "--size", str(SIZE), "--workers", "1", "--salt", "s", *flags])


def samples_of(out) -> list[dict]:
    """The per-sample records of a shard set (its index: what the manifest listed before)."""
    return SampleIndex.open(out).records()


def test_synthetic_loops_are_multiframe_xa_whose_contrast_comes_and_goes(cine):
    ds = pydicom.dcmread(cine / "images" / "cine0003.dcm")
    assert ds.Modality == "XA" and int(ds.NumberOfFrames) == FRAMES and ds.BitsStored == 12
    assert ds.PatientID == "synp001"
    for concentration in truth(cine).values():
        peak = int(concentration.argmax())
        assert concentration[0] < 0.01 and concentration[-1] < 0.25 and 0 < peak < FRAMES - 4
        phase = np.flatnonzero(concentration >= synth.CONTRAST_PHASE)
        assert 3 <= len(phase) <= FRAMES // 2 and np.all(np.diff(phase) == 1)


def test_same_arguments_same_files(tmp_path):
    args = ["--cine", "2", "--frames", "5", "--size", "32", "--seed", "3"]
    assert load_tool("synth")(["--out", str(tmp_path / "a"), *args]) == 0
    synth.generate_cine(tmp_path / "b", 2, 5, 32, seed=3, workers=2)
    synth.generate_cine(tmp_path / "c", 2, 5, 32, seed=4)
    for name in ("images/cine0000.dcm", "images/cine0001.dcm", "meta.csv", "cine.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "cine.csv").read_bytes() != (tmp_path / "c" / "cine.csv").read_bytes()


def test_contrast_selection_finds_the_contrast_phase(cine):
    kept = total = hits = 0
    for key, frames in stacks(cine).items():
        concentration = truth(cine)[key]
        chosen = choose_frames(frames, "contrast")
        phase = set(np.flatnonzero(concentration >= synth.CONTRAST_PHASE).tolist())
        hits += len(phase & set(chosen))
        kept, total = kept + len(chosen), total + len(phase)
        assert int(concentration.argmax()) in chosen, key
        # no frame before the contrast arrives or after it has washed out
        assert all(concentration[i] >= 0.25 for i in chosen), (key, chosen)
    precision, recall = hits / kept, hits / total
    assert precision >= 0.9 and recall >= 0.85, (precision, recall)


def test_stride_and_limit():
    frames = [np.full((4, 4), i, np.uint8) for i in range(FRAMES)]
    assert choose_frames(frames, "all", stride=3) == list(range(0, FRAMES, 3))
    assert choose_frames(frames, "all", stride=7, limit=2) == [0, 14]
    assert choose_frames(frames, "all", limit=4) == [2, 7, 12, 17]
    assert choose_frames(frames, "middle", stride=5) == [FRAMES // 2]


def test_shards_keep_strided_contrast_frames_with_loop_and_frame(cine, tmp_path):
    out = tmp_path / "out"
    assert shard(cine, out, "--dicom-frames", "contrast", "--dicom-stride", "2") == 0
    records = samples_of(out)
    by_loop = defaultdict(list)
    for record in records:
        if record["key"] != "still":
            assert record["key"] == f"{record['loop']}_f{record['frame']:04d}"
            by_loop[record["loop"]].append(record["frame"])
    frames = stacks(cine)
    assert sorted(by_loop) == sorted(frames)
    for key, chosen in by_loop.items():
        assert chosen == choose_frames(frames[key], "contrast")[::2], key
    still, = (r for r in records if r["key"] == "still")  # a single frame: kept, no loop
    assert "loop" not in still and "frame" not in still
    with tarfile.open(out / "shard-000000.tar") as tar:
        name = next(n for n in tar.getnames() if n.endswith(".sample.json"))
        info = json.loads(tar.extractfile(name).read())
    first = next(r for r in records if f"{r['key']}.sample.json" == name)
    assert (info["loop"], info["frame"]) == (first["loop"], first["frame"])


def test_frames_of_a_loop_stay_with_their_patient_in_every_split(cine, tmp_path):
    out = tmp_path / "out"
    assert shard(cine, out, "--dicom-stride", "4") == 0
    records = [r for r in samples_of(out) if "loop" in r]
    patients_of_loop = defaultdict(set)
    for record in records:
        patients_of_loop[record["loop"]].add(record["patient"])
    assert all(len(p) == 1 for p in patients_of_loop.values())
    patient = {loop: p.pop() for loop, p in patients_of_loop.items()}
    assert patient["cine0000"] == patient["cine0001"] != patient["cine0002"]  # by PatientID
    splits = json.loads((out / "splits.json").read_text())
    test = set(splits["test"]["patients"])
    assert test and test | set(splits["train"]["patients"]) == set(patient.values()) | {
        r["patient"] for r in samples_of(out) if "loop" not in r}
    for ratio, pools in splits["ratios"].items():
        pretrain, finetune = set(pools["pretrain"]["patients"]), set(pools["finetune"]["patients"])
        for p in patient.values():  # each loop's patient on exactly one side
            assert (p in test) + (p in pretrain) + (p in finetune) == 1, (ratio, p)


@pytest.mark.parametrize("flags, named", [
    (["--dicom-stride", "0"], "dicom_stride"),
    (["--contrast-keep", "1.5"], "contrast_keep"),
    (["--contrast-keep", "-0.1"], "contrast_keep"),
    (["--dicom-max-frames", "-1"], "dicom_max_frames"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(tmp_path, flags, named):
    err = io.StringIO()
    with redirect_stderr(err):
        code = shard(tmp_path, tmp_path / "out", *flags)
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert "--" + named.replace("_", "-") in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_automatic_shard_size_counts_frames_not_files(cine, tmp_path):
    """6 loops of 20 frames and a still: about 16 shards of the 121 frames, not one shard per
    frame (16 shards of the 7 files would have held one sample each)."""
    out = tmp_path / "all"
    assert shard(cine, out) == 0
    manifest = load_manifest(out)
    assert manifest["count"] == LOOPS * FRAMES + 1
    assert len(manifest["shards"]) == 16  # ceil(121 / 16) = 8 samples per shard
    strided = tmp_path / "strided"  # every 5th frame of each loop: 4 per loop + the still
    assert shard(cine, strided, "--dicom-stride", "5") == 0
    assert len(load_manifest(strided)["shards"]) == math.ceil((LOOPS * 4 + 1) / 2)
