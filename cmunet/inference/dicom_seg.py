"""DICOM Segmentation objects of the vessel masks or probabilities of a DICOM input.

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

Two kinds of source:

* frames without a position in space (X-Ray Angiographic and Radiofluoroscopic runs, secondary
  captures, DX, ...: no frame of reference, or one without plane positions): the SEG is written
  here with pydicom (highdicom takes a single frame only there, and no XA image at all), its
  frames indexed by segment and, for a multi-frame source, by temporal position;
* frames placed in a frame of reference (CT, MR, enhanced multi-frame images): highdicom writes
  it, with the planes of the source.

A source that cannot get a SEG (a missing UID, positions highdicom cannot use) raises a one-line
ValueError saying what it lacks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SEG_TYPES = ("binary", "fractional")
#: Type 2 attributes (present, possibly empty) of the source's patient and study that the SEG
#: copies; a source lacking one gets it empty, as the standard allows for Type 2.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
         "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
MANUFACTURER, MODEL_NAME = "cmunet", "cmunet UNet"
SERIES_DESCRIPTION = "cmunet vessel segmentation"


def write_dicom_seg(source: Path, frames: Sequence[np.ndarray], kind: str, path: Path) -> None:
    """Write the SEG of DICOM file ``source`` to ``path`` (atomically): ``frames`` are its frames'
    masks (``binary``, bool) or probabilities (``fractional``, float in [0, 1]) at the source's
    size. Raises ValueError saying in one line what the source lacks."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from cmunet import __version__

    if kind not in SEG_TYPES:
        raise ValueError(f"DICOM SEG type {kind!r} must be one of {', '.join(SEG_TYPES)}")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                               "SOPClassUID", "Rows", "Columns") if not header.get(key)]
    if missing:
        raise ValueError(f"no DICOM SEG: the source lacks {', '.join(missing)}")
    pixels = np.stack(frames)
    if pixels.shape[1:] != (header.Rows, header.Columns):
        raise ValueError(f"no DICOM SEG: the masks are {pixels.shape[2]}x{pixels.shape[1]} but "
                         f"the source says {header.Columns}x{header.Rows}")
    pixels = pixels.astype(bool) if kind == "binary" else \
        np.clip(pixels, 0.0, 1.0).astype(np.float32)
    for key in TYPE2:
        if key not in header:
            setattr(header, key, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MODEL_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="coronary artery",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.CoronaryArtery,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    if _placed(header):  # frames placed in space: highdicom finds their planes
        seg = _placed_seg(header, pixels, kind, segment)
    else:  # a projection (XA, XRF, DX, secondary capture, ...): frame i is source frame i
        seg = _pixel_aligned_seg(header, pixels, kind, segment)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        seg.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _placed(header) -> bool:
    """Whether the source's frames have positions in its frame of reference (as highdicom's
    get_image_coordinate_system decides): an image position, or plane positions in its
    functional groups."""
    if "FrameOfReferenceUID" not in header:
        return False
    if any(key in header for key in ("ImagePositionPatient", "ImageOrientationSlide",
                                     "ImageCenterPointCoordinatesSequence")):
        return True
    return any(key in groups[0] for name in ("SharedFunctionalGroupsSequence",
                                             "PerFrameFunctionalGroupsSequence")
               if (groups := header.get(name))
               for key in ("PlanePositionSequence", "PlanePositionSlideSequence"))


def _placed_seg(header, pixels: np.ndarray, kind: str, segment):
    """The SEG of a source whose frames are placed in its frame of reference, by highdicom
    (plane positions and orientation from the source's headers or functional groups)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from cmunet import __version__

    try:
        seg = hd.seg.Segmentation(
            source_images=[header], pixel_array=pixels if len(pixels) > 1 else pixels[0],
            segmentation_type=kind.upper(), segment_descriptions=[segment],
            series_instance_uid=generate_uid(), series_number=1,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MODEL_NAME, software_versions=__version__,
            device_serial_number="none", series_description=SERIES_DESCRIPTION,
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as err:  # highdicom's checks
        reason = " ".join(str(err).split()) or type(err).__name__
        lacking = re.search(r"has no attribute '(\w+)'", reason)  # a header highdicom reads
        reason = f"the source lacks {lacking.group(1)}" if lacking else reason
        raise ValueError(f"no DICOM SEG: the source's frames have positions in its frame of "
                         f"reference, but highdicom cannot place the segmentation there "
                         f"({reason})") from None
    if int(getattr(seg, "NumberOfFrames", 1)) != len(pixels):
        raise ValueError(f"no DICOM SEG: highdicom made {seg.NumberOfFrames} frame(s) for "
                         f"{len(pixels)} source frames")
    return seg


def _pixel_aligned_seg(header, pixels: np.ndarray, kind: str, segment):
    """The SEG of a source whose frames have no position in space, written with pydicom
    (highdicom takes one frame only there, and no XA or XRF image): SEG frame i is source frame
    i pixel for pixel, referenced by its frame number; the frames are indexed by segment and, for
    a multi-frame source, by temporal position (an XA run is a sequence in time). A frame of
    reference of the source is kept, without positions, as highdicom does for one frame."""
    from datetime import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

    from cmunet import __version__

    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.MediaStorageSOPClassUID = seg.SOPClassUID = SegmentationStorage
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID = generate_uid()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key in ("SpecificCharacterSet", "StudyInstanceUID", *TYPE2,  # patient and study
                "FrameOfReferenceUID", "PositionReferenceIndicator"):
        if key in header:
            seg[key] = header[key]
    if "FrameOfReferenceUID" in header and "PositionReferenceIndicator" not in header:
        seg.PositionReferenceIndicator = ""  # Type 2
    now = datetime.now()
    seg.update({"Modality": "SEG", "SeriesInstanceUID": generate_uid(), "SeriesNumber": 1,
                "SeriesDescription": SERIES_DESCRIPTION, "InstanceNumber": 1,
                "Manufacturer": MANUFACTURER, "ManufacturerModelName": MODEL_NAME,
                "DeviceSerialNumber": "none", "SoftwareVersions": __version__,
                "ContentDate": now.strftime("%Y%m%d"), "ContentTime": now.strftime("%H%M%S"),
                "ImageType": ["DERIVED", "PRIMARY"], "ContentLabel": "SEGMENTATION",
                "ContentDescription": "", "ContentCreatorName": "",
                "LossyImageCompression": "00", "SamplesPerPixel": 1,
                "PhotometricInterpretation": "MONOCHROME2", "PixelRepresentation": 0,
                "Rows": header.Rows, "Columns": header.Columns, "NumberOfFrames": len(pixels),
                "SegmentationType": kind.upper(), "SegmentSequence": [segment]})
    if kind == "binary":
        seg.BitsAllocated, seg.BitsStored, seg.HighBit = 1, 1, 0
        seg.PixelData = pack_bits(pixels.astype(np.uint8))
    else:
        seg.BitsAllocated, seg.BitsStored, seg.HighBit = 8, 8, 7
        seg.SegmentationFractionalType, seg.MaximumFractionalValue = "PROBABILITY", 255
        data = np.rint(pixels * 255).astype(np.uint8).tobytes()
        seg.PixelData = data + b"\0" * (len(data) % 2)
    multiframe = "NumberOfFrames" in header
    dimensions = generate_uid()
    seg.DimensionOrganizationSequence = [Dataset()]
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimensions
    pointers = [(0x0062000B, 0x0062000A, "Segment Number")]  # in SegmentIdentificationSequence
    if multiframe:  # TemporalPositionIndex, in FrameContentSequence
        pointers.append((0x00209128, 0x00209111, "Temporal Position Index"))
    seg.DimensionIndexSequence = [Dataset() for _ in pointers]
    for item, (index, group, label) in zip(seg.DimensionIndexSequence, pointers):
        item.DimensionOrganizationUID, item.DimensionDescriptionLabel = dimensions, label
        item.DimensionIndexPointer, item.FunctionalGroupPointer = index, group
    seg.SharedFunctionalGroupsSequence = [Dataset()]
    seg.PerFrameFunctionalGroupsSequence = [
        _frame_groups(header, number, multiframe) for number in range(1, len(pixels) + 1)]
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedInstanceSequence = header.SeriesInstanceUID, \
        [reference]
    seg.ReferencedSeriesSequence = [series]
    return seg


def _frame_groups(header, number: int, multiframe: bool):
    """The Per-Frame Functional Groups item of SEG frame ``number`` (1-based), derived from the
    source frame of that number."""
    from pydicom.dataset import Dataset

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    content = Dataset()
    content.DimensionIndexValues = [1, number] if multiframe else [1]
    if multiframe:
        content.TemporalPositionIndex = number
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if multiframe:
        source.ReferencedFrameNumber = number
    source.PurposeOfReferenceCodeSequence = [
        code("121322", "DCM", "Source image for image processing operation")]
    source.SpatialLocationsPreserved = "YES"
    derivation = Dataset()
    derivation.DerivationCodeSequence = [code("113076", "DCM", "Segmentation")]
    derivation.SourceImageSequence = [source]
    segment = Dataset()
    segment.ReferencedSegmentNumber = 1
    groups = Dataset()
    groups.FrameContentSequence, groups.DerivationImageSequence = [content], [derivation]
    groups.SegmentIdentificationSequence = [segment]
    return groups
