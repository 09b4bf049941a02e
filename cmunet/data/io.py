"""Reading angiograms and masks from disk: PNG/JPEG/TIFF (8- or 16-bit) and DICOM.

Every problem with an input raises :class:`BadInput`, whose message names the file and the problem.
DICOM headers are read for pixel data, photometric interpretation, bit depth, pixel spacing and the
patient id; the id is returned only so that the caller can hash it, and no other header field leaves
this module. Error messages about DICOM files never quote header values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
MIN_SIDE = 16


class BadInput(ValueError):
    """An input file cannot be used; ``str()`` is ``"<file>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # travels back from worker processes intact
        return BadInput, (self.path, self.problem)


@dataclass
class Frame:
    """One 2-D grayscale image, as stored on disk (uint8 or uint16), with what we may keep of it."""

    pixels: np.ndarray
    spacing: tuple[float, float] | None = None  # mm per pixel (row, column)
    patient_id: str | None = None  # raw DICOM PatientID: hash it before storing it anywhere


def find_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(folder, "is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(folder, f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def read_frames(path: str | Path) -> list[Frame]:
    """All frames of an image file (one, except for multi-frame DICOM), validated."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        frames = _read_dicom(path)
    else:
        frames = [Frame(_read_raster(path))]
    for frame in frames:
        _check_pixels(path, frame.pixels)
        frame.pixels = to_storage_dtype(frame.pixels)
    return frames


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A binary vessel mask of the given shape as a bool array (non-zero = vessel)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        raise BadInput(path, "masks must be PNG or TIFF files, not DICOM")
    pixels = _read_raster(path)
    if pixels.shape != tuple(shape):
        raise BadInput(path, f"mask is {_size(pixels.shape)} but its image is {_size(shape)}")
    values = np.unique(pixels)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise BadInput(path, f"mask is not binary: it holds {len(values)} values ({shown}); "
                             "expected 0 for background and one other value for vessel")
    mask = pixels > 0
    if not mask.any():
        raise BadInput(path, "mask is empty (no vessel pixel)")
    return mask


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape[::-1])  # width x height


def _read_raster(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            pixels = tifffile.imread(path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    pixels = _pil_to_array(img)
    except BadInput:
        raise
    except Exception as err:  # PIL and tifffile raise many types for corrupt files
        raise BadInput(path, f"cannot read image ({type(err).__name__}: {err})") from None
    return _to_gray(path, np.asarray(pixels))


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode in ("1", "L", "I", "F", "RGB", "RGBA", "LA"):
        return np.asarray(img)
    return np.asarray(img.convert("L"))


def _to_gray(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Reduce RGB(A)/LA rasters whose colour channels agree to one channel; refuse colour images."""
    if pixels.ndim == 3 and pixels.shape[-1] in (2, 3, 4):
        colour = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
        if not (colour == colour[..., :1]).all():
            raise BadInput(path, "is a colour image; angiograms must be grayscale")
        pixels = colour[..., 0]
    if pixels.ndim != 2:
        raise BadInput(path, f"expected a 2-D grayscale image, got an array of shape {pixels.shape}")
    return pixels


def _check_pixels(path: Path, pixels: np.ndarray) -> None:
    if min(pixels.shape) < MIN_SIDE:
        raise BadInput(path, f"image is {_size(pixels.shape)} pixels; at least "
                             f"{MIN_SIDE}x{MIN_SIDE} is needed")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise BadInput(path, f"image holds {int((~np.isfinite(pixels)).sum())} NaN or infinite pixels")
    if pixels.dtype.kind not in "uifb":
        raise BadInput(path, f"unsupported pixel type {pixels.dtype}")
    lo, hi = pixels.min(), pixels.max()
    if lo == hi:
        raise BadInput(path, f"image is constant (every pixel is {lo})")


def to_storage_dtype(pixels: np.ndarray) -> np.ndarray:
    """uint8 and uint16 stay as they are; other integer or float images are rescaled into uint16."""
    if pixels.dtype in (np.uint8, np.uint16):
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype.kind in "ui" and pixels.min() >= 0 and pixels.max() <= 65535:
        return pixels.astype(np.uint16)
    values = pixels.astype(np.float64)
    lo, hi = values.min(), values.max()
    return np.round((values - lo) / (hi - lo) * 65535).astype(np.uint16)


def frame_count(path: str | Path) -> int:
    """How many frames ``path`` holds, from a DICOM header alone (1 for other files and for a
    header that cannot be read: :func:`read_frames` reports those)."""
    if Path(path).suffix.lower() not in DICOM_SUFFIXES:
        return 1
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return max(1, int(getattr(header, "NumberOfFrames", 1) or 1))
    except Exception:  # an unreadable file counts once; reading it names the problem
        return 1


def _read_dicom(path: Path) -> list[Frame]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as err:
        raise BadInput(path, f"not a readable DICOM file ({type(err).__name__})") from None
    if "PixelData" not in ds:
        raise BadInput(path, "DICOM file holds no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # missing decoder, truncated data, inconsistent geometry
        raise BadInput(path, f"cannot decode the DICOM pixel data ({type(err).__name__}; "
                             "compressed files need pylibjpeg)") from None
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise BadInput(path, f"DICOM image has {samples} samples per pixel; expected grayscale")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    stack = pixels.reshape((frames,) + pixels.shape[-2:]) if frames > 1 else pixels[None]
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        stack = _invert(stack, int(getattr(ds, "BitsStored", 8 * stack.dtype.itemsize)))
    spacing = _dicom_spacing(ds)
    patient = str(getattr(ds, "PatientID", "") or "") or None
    return [Frame(f, spacing, patient) for f in stack]


def _invert(stack: np.ndarray, bits: int) -> np.ndarray:
    """MONOCHROME1 stores white as 0: flip so that, as in MONOCHROME2, larger means brighter."""
    if stack.dtype.kind == "i":  # signed storage: flip about the observed range
        return stack.max() + stack.min() - stack
    top = (1 << bits) - 1
    return (top - np.minimum(stack, top)).astype(stack.dtype)


def _dicom_spacing(ds) -> tuple[float, float] | None:
    """Pixel spacing in mm: PixelSpacing, else ImagerPixelSpacing over the magnification factor."""
    try:
        if "PixelSpacing" in ds:
            row, col = (float(v) for v in ds.PixelSpacing)
        elif "ImagerPixelSpacing" in ds:
            row, col = (float(v) for v in ds.ImagerPixelSpacing)
            magnification = float(getattr(ds, "EstimatedRadiographicMagnificationFactor", 1) or 1)
            row, col = row / magnification, col / magnification
        else:
            return None
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None
