"""DICOM Segmentation objects (highdicom) of the vessel masks or probabilities of a DICOM input.

:func:`write_dicom_seg` writes one SEG instance per source file, one segment ("Coronary artery",
SNOMED CT 41801008, found automatically by the cmunet UNet) and one frame per source frame, pixel
for pixel on the source's grid (empty frames are kept, so frame ``i`` is source frame ``i``). It
references the source image (its SOP Instance UID, and the frame numbers of a multi-frame source)
and belongs to the source's study and patient: as DICOM requires, the SEG copies the source's
patient and study attributes. Segmentation types:

* ``binary`` -- the mask, exactly as ``masks/<name>.png`` (after the threshold and
  ``--min-component``);
* ``fractional`` -- the vessel probability, as ``PROBABILITY`` in 8 bits (``max_fractional_value``
  255; the threshold and ``--min-component`` are not applied).

A multi-frame source needs a frame of reference (``FrameOfReferenceUID`` and per-frame plane
positions): without one, highdicom can place only one segmentation frame in the SEG, so such a
source (a typical multi-frame XA run) gets none, and the error says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SEG_TYPES = ("binary", "fractional")
#: Type 2 attributes (present, possibly empty) of the source's patient and study that the SEG
#: copies; a source lacking one gets it empty, as the standard allows for Type 2.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
         "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def write_dicom_seg(source: Path, frames: Sequence[np.ndarray], kind: str, path: Path) -> None:
    """Write the SEG of DICOM file ``source`` to ``path`` (atomically): ``frames`` are its frames'
    masks (``binary``, bool) or probabilities (``fractional``, float in [0, 1]) at the source's
    size. Raises ValueError saying what the source lacks."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from cmunet import __version__

    if kind not in SEG_TYPES:
        raise ValueError(f"DICOM SEG type {kind!r} must be one of {', '.join(SEG_TYPES)}")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                               "SOPClassUID") if not header.get(key)]
    if missing:
        raise ValueError(f"no DICOM SEG: the source lacks {', '.join(missing)}")
    if len(frames) > 1 and "FrameOfReferenceUID" not in header:
        raise ValueError(f"no DICOM SEG: the source has {len(frames)} frames and no frame of "
                         "reference, and highdicom can then segment one frame only")
    for key in TYPE2:
        if key not in header:
            setattr(header, key, "")
    pixels = np.stack(frames) if len(frames) > 1 else frames[0]
    if kind == "binary":
        pixels = pixels.astype(bool)
    else:
        pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="cmunet UNet", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="coronary artery",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.CoronaryArtery,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    try:
        seg = hd.seg.Segmentation(
            source_images=[header], pixel_array=pixels, segmentation_type=kind.upper(),
            segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=1,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cmunet",
            manufacturer_model_name="cmunet UNet", software_versions=__version__,
            device_serial_number="none", series_description="cmunet vessel segmentation",
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as err:  # highdicom's checks of the source
        raise ValueError(f"no DICOM SEG: {err}") from None
    if int(getattr(seg, "NumberOfFrames", 1)) != len(frames):
        raise ValueError(f"no DICOM SEG: highdicom made {seg.NumberOfFrames} frame(s) for "
                         f"{len(frames)} source frames")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        seg.save_as(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
