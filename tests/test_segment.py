"""Inference on new images (launch/segment.py): geometry, preprocessing parity, TTA, windows,
post-processing, outputs, bad inputs, exit codes and model references (paths and MLflow)."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cmunet.config import to_dict
from cmunet.data.preprocess import PreprocessConfig, preprocess_image
from cmunet.evaluation.metrics import dice
from cmunet.inference.model import load_model, read_preprocessing
from cmunet.inference.predict import (SegmentOptions, bits_used, forward, gaussian_weights,
                                      model_scale_shape, predict_probabilities,
                                      remove_small_components, segment, to_model_scale,
                                      to_storage_type, window_starts)
from cmunet.models.unet import UNet
from cmunet.training.finetune import PREPROCESSING, WEIGHTS, cpu_state, segmentation_loss
from conftest import load_tool
from test_dicom import write_dicom

SIZE = 32  # training side of the tiny model


def line_image(shape: tuple[int, int], col: int, half_width: int, rng: np.random.Generator,
               top: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """A bright noisy image (in 0..top) with a dark vertical 'vessel' centred on ``col``."""
    mask = np.zeros(shape, bool)
    mask[:, col - half_width:col + half_width + 1] = True
    image = (150 + 15 * rng.standard_normal(shape) - 70 * mask) * (top / 255)
    dtype = np.uint8 if top == 255 else np.uint16
    return np.clip(np.rint(image), 0, top).astype(dtype), mask


def random_line(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training sample: a dark line of random angle, offset and width."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    angle, (y0, x0), radius = rng.uniform(0, np.pi), rng.uniform(8, 24, 2), rng.uniform(1.0, 2.5)
    mask = np.abs((xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)) <= radius
    image = 150 + 15 * rng.standard_normal((SIZE, SIZE)) - 70 * mask
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A fine-tuning output folder: a UNet(8) trained for 40 steps to find dark lines in 32 px
    images preprocessed with the default PreprocessConfig, and its preprocessing.json."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(size=SIZE)
    images, masks = zip(*(random_line(rng) for _ in range(64)))
    stored = np.stack([preprocess_image(image, cfg) for image in images]).astype(np.float32)
    mean, std = float(stored.mean()), float(stored.std())
    x = torch.from_numpy((stored - mean) / std)[:, None]
    y = torch.from_numpy(np.stack(masks)).long()
    net = UNet(8)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4x faster than 2 threads for this tiny net on busy shared cores
    try:
        for _ in range(40):
            index = torch.from_numpy(rng.choice(len(x), 8, replace=False))
            loss = segmentation_loss(net(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("finetune")
    save_file(cpu_state(net), folder / WEIGHTS)
    (folder / PREPROCESSING).write_text(json.dumps(
        {"size": SIZE, "dtype": "uint8", "mean": mean, "std": std, "preprocess": to_dict(cfg)}))
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(str(model_dir), precision="fp32")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ---- preprocessing -------------------------------------------------------------------------------

def test_model_input_is_the_training_preprocessing(model_dir):
    prep = read_preprocessing(model_dir / PREPROCESSING)
    rng = np.random.default_rng(1)
    for side in (SIZE, 2 * SIZE):  # as trained, and a larger square image shrunk like fit=resize
        image, _ = line_image((side, side), side // 2, 2, rng)
        stored = preprocess_image(image, prep.preprocess).astype(np.float32)
        expected = (stored - prep.mean) / prep.std
        np.testing.assert_array_equal(to_model_scale(image, prep), expected)
    assert model_scale_shape((80, 96), prep) == (32, 38)  # shorter side to 32, not cropped
    assert model_scale_shape((96, 80), prep) == (38, 32)
    crop = replace(prep, preprocess=replace(prep.preprocess, fit="crop"))
    assert model_scale_shape((80, 96), crop) == (80, 96)  # fit=crop: native scale


def test_other_bit_depths_are_rescaled_to_the_model_range():
    twelve_bit = np.array([[0, 4095], [2048, 100]], np.uint16)
    assert bits_used(twelve_bit) == 12 and bits_used(np.uint16([[255]])) == 8
    np.testing.assert_array_equal(to_storage_type(twelve_bit, "uint8"),
                                  np.uint8([[0, 255], [128, 6]]))
    np.testing.assert_array_equal(to_storage_type(np.uint8([[0, 1, 255]]), "uint16"),
                                  np.uint16([[0, 257, 65535]]))
    assert to_storage_type(twelve_bit, "uint16") is twelve_bit


# ---- prediction ----------------------------------------------------------------------------------

def test_tta_is_the_mean_of_the_flipped_predictions(model):
    rng = np.random.default_rng(2)
    image, _ = line_image((SIZE, SIZE), 15, 1, rng)  # columns 14..16
    noise = rng.standard_normal((SIZE, SIZE))
    image = np.clip(image + 10 * (noise + noise[:, ::-1]), 0, 255).astype(np.uint8)
    image = np.maximum(image, image[:, ::-1])  # left-right symmetric
    z = to_model_scale(image, model.preprocessing)
    plain, = predict_probabilities(model, [z], SegmentOptions())
    tta, = predict_probabilities(model, [z], SegmentOptions(tta=True))
    flips = [((), lambda a: a), ((-1,), np.fliplr), ((-2,), np.flipud),
             ((-2, -1), lambda a: a[::-1, ::-1])]
    by_hand = np.mean([f(forward(model, f(z)[None].copy(), tta=False)[0]) for _, f in flips],
                      axis=0)
    np.testing.assert_allclose(tta, by_hand, atol=1e-6)
    np.testing.assert_allclose(tta, tta[:, ::-1], atol=1e-5)  # symmetric input, symmetric output
    assert np.abs(plain - plain[:, ::-1]).max() > 1e-4  # which the network alone is not


def test_window_mode_blends_overlapping_windows(model):
    assert window_starts(SIZE, SIZE, 0.5) == [0]
    assert window_starts(38, SIZE, 0.5) == [0, 6]
    starts = window_starts(100, SIZE, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - SIZE and max(np.diff(starts)) <= SIZE // 2
    weights = gaussian_weights(SIZE)
    assert weights.max() == 1.0 and weights.min() >= 1e-3
    np.testing.assert_array_equal(weights, weights[::-1, ::-1])

    rng = np.random.default_rng(3)
    square, _ = line_image((SIZE, SIZE), 10, 1, rng)  # one window: the same as resize mode
    z = to_model_scale(square, model.preprocessing)
    np.testing.assert_allclose(predict_probabilities(model, [z], SegmentOptions())[0],
                               predict_probabilities(model, [z], SegmentOptions(
                                   mode="window"))[0], atol=1e-6)
    wide, truth = line_image((64, 320), 200, 3, rng)  # 32 x 160 at the model's scale: 9 windows
    by_window, = segment(model, [wide], SegmentOptions(mode="window", batch_size=4))
    whole, = segment(model, [wide], SegmentOptions())
    assert by_window.shape == wide.shape
    assert dice(by_window, truth) > 0.7 and dice(by_window, whole) > 0.8


def test_small_components_are_removed():
    mask = np.zeros((20, 20), bool)
    mask[2:7, 2:7] = True  # 25 px
    mask[[10, 11, 12], [10, 11, 12]] = True  # a diagonal of 3 px: one 8-connected component
    mask[18, 1] = mask[1, 18] = True  # specks
    kept = remove_small_components(mask, 3)
    assert kept[2:7, 2:7].all() and kept[12, 12] and not kept[18, 1] and not kept[1, 18]
    kept = remove_small_components(mask, 4)
    assert kept.sum() == 25
    assert remove_small_components(mask, 0) is mask


# ---- the command ---------------------------------------------------------------------------------

def test_folder_with_a_corrupt_file_dicom_and_several_sizes(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(4)
    images = tmp_path / "images"
    images.mkdir()
    truth = {}
    for name, shape, col, half_width in (("a", (64, 64), 20, 3), ("b", (80, 96), 60, 3)):
        image, truth[name] = line_image(shape, col, half_width, rng)
        Image.fromarray(image).save(images / f"{name}.png")
    frames = [line_image((64, 64), col, 3, rng, top=4095) for col in (24, 40)]  # 12-bit
    write_dicom(images / "scan.dcm", np.stack([f for f, _ in frames]), frames=2)  # 0.2 x 0.25 mm
    truth |= {"scan_f0000": frames[0][1], "scan_f0001": frames[1][1]}
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "seg"

    code = load_tool("segment")(["--model", str(model_dir), "--input", str(images), "--out",
                                 str(out), "--spacing", "0.3", "--batch-size", "3", "--tta"])
    assert code == 3  # some inputs failed, the others were written
    assert "bad.png" in capsys.readouterr().err
    assert read_csv(out / "errors.csv")[0]["file"].endswith("bad.png")
    for name, vessel in truth.items():
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == vessel.shape and set(np.unique(mask)) <= {0, 255}
        assert dice(mask > 0, vessel) > 0.6, name  # found where it is, at the original size
        overlay = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay.shape == vessel.shape + (3,)
        assert (overlay[mask > 0, 0] > overlay[mask > 0, 2]).all()  # vessels in red
    rows = {row["image"]: row for row in read_csv(out / "diameters.csv")}
    assert list(rows) == ["a", "b", "scan_f0000", "scan_f0001"]
    assert {r["unit"] for r in rows.values()} == {"mm"}
    assert (rows["a"]["spacing_row_mm"], rows["a"]["spacing_col_mm"]) == ("0.3", "0.3")  # --spacing
    assert (rows["scan_f0000"]["spacing_row_mm"],
            rows["scan_f0000"]["spacing_col_mm"]) == ("0.2", "0.25")  # DICOM header
    assert 7 * 0.3 * 0.6 < float(rows["a"]["mean_diameter"]) < 7 * 0.3 * 1.4  # 7 px wide
    assert "12-bit" in rows["scan_f0000"]["note"] and rows["a"]["note"] == ""
    assert not list(out.rglob(".*.tmp"))


def test_exit_codes_and_empty_masks(model_dir, tmp_path, capsys):
    segment_cli = load_tool("segment")
    image, _ = line_image((48, 64), 30, 3, np.random.default_rng(5))
    Image.fromarray(image).save(tmp_path / "one.png")
    out = tmp_path / "seg"
    code = segment_cli(["--model", str(model_dir), "--input", str(tmp_path / "one.png"),
                        "--out", str(out), "--min-component", "100000", "--mode", "window"])
    assert code == 0
    assert not np.asarray(Image.open(out / "masks" / "one.png")).any()
    row, = read_csv(out / "diameters.csv")
    assert row["unit"] == "px" and row["mean_diameter"] == row["max_diameter"] == ""
    assert "empty mask" in row["note"]
    assert read_csv(out / "errors.csv") == []

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    assert segment_cli(["--model", str(model_dir), "--input", str(bad), "--out", str(out)]) == 2
    assert segment_cli(["--model", str(tmp_path), "--input", str(bad), "--out", str(out)]) == 2
    assert "no best.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        segment_cli(["--model", str(model_dir), "--input", str(bad), "--out", str(out),
                     "--threshold", "1.5"])
    assert exit_info.value.code == 2


def test_probability_maps_and_dicom_segmentation_objects(model_dir, tmp_path, capsys):
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(7)
    images = tmp_path / "images"
    images.mkdir()
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
             "PatientID": "P1"}
    single, _ = line_image((48, 64), 30, 3, rng, top=4095)
    write_dicom(images / "one.dcm", single, **study)
    run = np.stack([line_image((64, 48), col, 3, rng, top=4095)[0] for col in (15, 30, 40)])
    write_dicom(images / "run.dcm", run, frames=3, **study)
    write_dicom(images / "bare.dcm", single)  # no study or series: no SEG, masks all the same
    Image.fromarray(line_image((64, 64), 30, 3, rng)[0]).save(images / "plain.png")
    out = tmp_path / "seg"
    segment_cli = load_tool("segment")

    code = segment_cli(["--model", str(model_dir), "--input", str(images), "--out", str(out),
                        "--probabilities", "npy", "--dicom-seg", "binary", "--no-progress",
                        "--batch-size", "2"])  # the frames of run.dcm span batches
    err = capsys.readouterr().err
    assert code == 3 and "bare.dcm: no DICOM SEG: the source lacks StudyInstanceUID" in err
    assert (out / "masks" / "bare.png").is_file() and (out / "masks" / "run_f0002.png").is_file()
    assert sorted(p.name for p in (out / "dicom_seg").iterdir()) == ["one.dcm", "run.dcm"]
    for name in ("one", "run_f0000", "run_f0002", "plain", "bare"):
        probability = np.load(out / "probabilities" / f"{name}.npy")
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png")) > 0
        assert probability.dtype == np.float32 and probability.shape == mask.shape
        np.testing.assert_array_equal(probability > 0.5, mask)  # no --min-component here
    source = pydicom.dcmread(images / "one.dcm")
    seg = pydicom.dcmread(out / "dicom_seg" / "one.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (source.Rows, source.Columns, 1)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "P1"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == \
        "41801008"  # coronary artery
    np.testing.assert_array_equal(seg.pixel_array,
                                  np.asarray(Image.open(out / "masks" / "one.png")) > 0)

    code = segment_cli(["--model", str(model_dir), "--input", str(images / "one.dcm"), "--out",
                        str(tmp_path / "fractional"), "--probabilities", "png16", "--dicom-seg",
                        "fractional", "--no-progress"])
    assert code == 0
    stored = np.asarray(Image.open(tmp_path / "fractional" / "probabilities" / "one.png"))
    probability = np.load(out / "probabilities" / "one.npy")
    assert stored.dtype == np.uint16
    np.testing.assert_allclose(stored / 65535, probability, atol=1 / 65535)
    seg = pydicom.dcmread(tmp_path / "fractional" / "dicom_seg" / "one.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert (seg.Rows, seg.Columns) == single.shape
    np.testing.assert_allclose(seg.pixel_array / seg.MaximumFractionalValue, probability,
                               atol=0.5 / 255 + 1e-6)


def test_dicom_seg_of_xa_sources_single_and_multi_frame(model_dir, tmp_path, capsys):
    """X-Ray Angiographic Image Storage sources (no frame of reference, as XA is): a one-frame
    image and a 3-frame run each get a SEG, frame i referencing source frame i; highdicom reads
    them back. A source that cannot get one says why in one line."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import (CTImageStorage, SegmentationStorage, XRayAngiographicImageStorage,
                             generate_uid)

    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    images.mkdir()
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
             "PatientID": "P2", "PatientName": "Test^XA"}
    xa = {"sop_class": XRayAngiographicImageStorage}
    write_dicom(images / "xa.dcm", line_image((48, 64), 30, 3, rng, top=4095)[0], **xa, **study)
    run = np.stack([line_image((64, 48), col, 3, rng, top=4095)[0] for col in (15, 30, 40)])
    write_dicom(images / "xarun.dcm", run, frames=3, **xa, **study)
    # a frame of reference without positions (kept in the SEG); a source without its series,
    # and a CT slice with a position but no orientation: no SEG
    write_dicom(images / "xafor.dcm", run, frames=3, FrameOfReferenceUID=generate_uid(), **xa,
                **study)
    write_dicom(images / "noseries.dcm", run[0], **xa, StudyInstanceUID=generate_uid())
    write_dicom(images / "ct.dcm", run[0], sop_class=CTImageStorage, **study,
                FrameOfReferenceUID=generate_uid(), ImagePositionPatient=[0, 0, 0])
    out = tmp_path / "seg"
    for kind in ("binary", "fractional"):
        code = load_tool("segment")(["--model", str(model_dir), "--input", str(images), "--out",
                                     str(out / kind), "--dicom-seg", kind, "--no-progress",
                                     "--batch-size", "2"])
        lines = capsys.readouterr().err.strip().splitlines()
        refused = [line for line in lines if line.startswith("warning:")]  # one per file
        assert code == 3 and len(refused) == 2, "\n".join(lines)
        assert any("noseries.dcm: no DICOM SEG: the source lacks SeriesInstanceUID" in line
                   for line in refused)
        assert any("ct.dcm: no DICOM SEG: the source's frames have positions in its frame of "
                   "reference, but highdicom cannot place the segmentation there (the source "
                   "lacks PixelSpacing)" in line for line in refused)
        assert sorted(p.name for p in (out / kind / "dicom_seg").iterdir()) == \
            ["xa.dcm", "xafor.dcm", "xarun.dcm"]
        for name, frames in (("xa", 1), ("xarun", 3), ("xafor", 3)):
            source = pydicom.dcmread(images / f"{name}.dcm")
            seg = pydicom.dcmread(out / kind / "dicom_seg" / f"{name}.dcm")
            assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
            assert seg.SegmentationType == kind.upper() and int(seg.NumberOfFrames) == frames
            assert (seg.StudyInstanceUID, seg.PatientID, seg.PatientName) == \
                (source.StudyInstanceUID, "P2", "Test^XA")
            assert seg.get("FrameOfReferenceUID") == source.get("FrameOfReferenceUID")
            series = seg.ReferencedSeriesSequence[0]
            assert series.SeriesInstanceUID == source.SeriesInstanceUID
            assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
                source.SOPInstanceUID
            assert series.ReferencedInstanceSequence[0].ReferencedSOPClassUID == \
                XRayAngiographicImageStorage
            for number, groups in enumerate(seg.PerFrameFunctionalGroupsSequence, 1):
                item = groups.DerivationImageSequence[0].SourceImageSequence[0]
                assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
                assert item.get("ReferencedFrameNumber") == (number if frames > 1 else None)
            pixels = seg.pixel_array.reshape(frames, source.Rows, source.Columns)
            names = [name] if frames == 1 else [f"{name}_f{i:04d}" for i in range(frames)]
            masks = np.stack([np.asarray(Image.open(out / kind / "masks" / f"{n}.png")) > 0
                              for n in names])
            if kind == "binary":
                np.testing.assert_array_equal(pixels, masks)
            else:
                assert seg.SegmentationFractionalType == "PROBABILITY"
                assert np.mean((pixels > 127) == masks) > 0.99  # the probability, thresholded
            read = hd.seg.segread(out / kind / "dicom_seg" / f"{name}.dcm")
            assert read.number_of_frames == frames
            if frames > 1:  # frame 2 of the run, looked up through the source reference
                frame = read.get_pixels_by_source_frame(source.SOPInstanceUID, [2])
                assert frame.shape == (1, source.Rows, source.Columns, 1)
                assert (frame[0, ..., 0] > 0).sum() == (pixels[1] > 0).sum()


# ---- model references ----------------------------------------------------------------------------

def test_weights_files_and_what_they_need(model_dir, tmp_path):
    assert load_model(str(model_dir / WEIGHTS)).weights == model_dir / WEIGHTS
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(model_dir / WEIGHTS, alone / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no preprocessing.json beside it"):
        load_model(str(alone / "model.safetensors"))
    (alone / PREPROCESSING).write_text(json.dumps({"size": SIZE, "dtype": "uint8"}))
    with pytest.raises(ValueError, match=r"preprocessing.json: missing mean, std, preprocess"):
        load_model(str(alone / "model.safetensors"))
    for trial in ("trial_0", "trial_1"):
        shutil.copytree(model_dir, tmp_path / "tune" / trial)
    with pytest.raises(ValueError, match="2 best.safetensors files .*trial_0, trial_1"):
        load_model(str(tmp_path / "tune"))
    assert load_model(str(tmp_path / "tune" / "trial_1")).net.width == 8


def log_models(model_dir: Path, uri: str) -> tuple[str, str]:
    """Two MLflow runs: one with the model folder among its artifacts (``finetune/``), one that
    logged it as a model named ``model`` (files below ``artifacts/finetune/``, as the pyfunc
    champion), registered as version 1 of ``cmunet-seg`` with alias ``champion``. Their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    root = Path(uri.removeprefix("sqlite:///")).parent
    experiment = client.create_experiment("seg", artifact_location=(root / "art").as_uri())
    plain = client.create_run(experiment).info.run_id
    client.log_artifacts(plain, str(model_dir), "finetune")
    champion = client.create_run(experiment).info.run_id
    model = client.create_logged_model(experiment, name="model", source_run_id=champion)
    client.log_model_artifacts(model.model_id, str(model_dir), "artifacts/finetune")
    client.create_registered_model("cmunet-seg")
    client.create_model_version("cmunet-seg", f"models:/{model.model_id}", run_id=champion,
                                model_id=model.model_id)
    client.set_registered_model_alias("cmunet-seg", "champion", "1")
    return plain, champion


@pytest.fixture
def download_cache(tmp_path, monkeypatch):
    """MLflow downloads (cmunet.tracking.registry.resolve caches them in the temp folder) kept in
    the test's folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


def test_mlflow_run_and_registered_model_references(model_dir, tmp_path, monkeypatch,
                                                    download_cache):
    monkeypatch.chdir(tmp_path)  # the default store, sqlite:///$PWD/mlflow.db
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain, champion = log_models(model_dir, uri)
    weights = (model_dir / WEIGHTS).read_bytes()
    for reference in (plain, f"runs:/{plain}/finetune", champion, f"runs:/{champion}/model",
                      "models:/cmunet-seg/1"):
        assert load_model(reference).weights.read_bytes() == weights, reference
    assert load_model(f"runs:/{plain}/finetune", uri).weights.read_bytes() == weights

    image, _ = line_image((64, 64), 30, 3, np.random.default_rng(6))
    Image.fromarray(image).save(tmp_path / "one.png")
    code = load_tool("segment")(["--model", "models:/cmunet-seg@champion", "--input",
                                 str(tmp_path / "one.png"), "--out", str(tmp_path / "seg")])
    assert code == 0 and (tmp_path / "seg" / "masks" / "one.png").is_file()


def test_models_in_another_store(model_dir, tmp_path, monkeypatch, download_cache):
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path / "store")  # registering a logged model needs the default store
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    _, champion = log_models(model_dir, uri)
    monkeypatch.chdir(tmp_path)  # elsewhere: the default store is not the models'
    for reference in ("models:/cmunet-seg@champion", f"runs:/{champion}/model", champion):
        assert load_model(reference, uri).net.width == 8, reference
    assert not (tmp_path / "mlflow.db").exists()
