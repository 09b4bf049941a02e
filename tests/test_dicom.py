"""DICOM input: pixels, MONOCHROME1, spacing; nothing identifying reaches shards, manifest or logs."""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cmunet.data.io import read_frames
from cmunet.data.stream import decode_png, load_manifest
from conftest import load_tool

SECRETS = {"PatientName": "Zebedee^Quarrington", "PatientID": "MRN-88412-QX",
           "PatientBirthDate": "19380412", "AccessionNumber": "ACC7731904"}


def write_dicom(path, pixels, monochrome1=False, frames=1, sop_class=SecondaryCaptureImageStorage,
                **header):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in header.items():
        setattr(ds, key, value)
    ds.Modality = "XA"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.25]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def ramp(seed=0):
    rng = np.random.default_rng(seed)
    return (np.linspace(100, 4000, 64 * 64).reshape(64, 64) + rng.integers(0, 50, (64, 64))).astype(np.uint16)


def test_monochrome1_is_inverted_and_spacing_read(tmp_path):
    pixels = ramp()
    write_dicom(tmp_path / "a.dcm", pixels, monochrome1=True)
    frame, = read_frames(tmp_path / "a.dcm")
    assert frame.pixels.dtype == np.uint16 and frame.spacing == (0.2, 0.25)
    np.testing.assert_array_equal(frame.pixels, 4095 - pixels)


def test_multiframe_dicom_gives_one_sample_per_frame(tmp_path):
    stack = np.stack([ramp(i) for i in range(3)])
    write_dicom(tmp_path / "run.dcm", stack, frames=3)
    frames = read_frames(tmp_path / "run.dcm")
    assert len(frames) == 3
    np.testing.assert_array_equal(frames[2].pixels, stack[2])


def test_nothing_identifying_reaches_shards_manifest_or_logs(tmp_path):
    images = tmp_path / "dicom"
    images.mkdir()
    for i in range(4):
        write_dicom(images / f"im{i}.dcm", ramp(i), **SECRETS, StudyDate="20210305",
                    InstitutionName="St Elsewhere Cardiology")
    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        code = load_tool("shard")(["--images", str(images), "--out", str(tmp_path / "out"),
                                   "--size", "64", "--workers", "1"])
    assert code == 0
    out = tmp_path / "out"
    blobs = [log.getvalue().encode()] + [p.read_bytes() for p in out.iterdir()]
    for tar in out.glob("*.tar"):  # the members of each shard, decompressed
        with tarfile.open(tar) as t:
            blobs += [t.extractfile(m).read() for m in t.getmembers()]
            blobs += [decode_png(t.extractfile(m).read()).tobytes() for m in t.getmembers()
                      if m.name.endswith(".png")]
    secrets = list(SECRETS.values()) + ["Zebedee", "Quarrington", "88412", "20210305",
                                        "St Elsewhere"]
    for secret in secrets:
        assert not any(secret.encode() in blob for blob in blobs), secret
    manifest = load_manifest(out)
    groups = {s["patient"] for s in manifest["samples"]}
    assert len(groups) == 1 and len(next(iter(groups))) == 12  # one salted pseudonym
    assert manifest["samples"][0]["spacing"] == [0.2, 0.25]
