"""The optional parts of the package (setup.cfg's extras) and the one-line error when one is missing.

The base install segments angiograms, builds shards and draws synthetic ones. Pre-training,
fine-tuning and evaluation need the ``train`` extra; the search, the study and the demo the
``tune`` extra; ``models:/`` and ``runs:/`` references the ``mlflow`` extra. A command that needs
an extra checks for its modules before it imports anything heavy (:func:`require`), so that a
missing one is ``error: cmunet-tune needs the 'tune' extra: pip install 'cmunet[tune]'`` and exit
status 2 instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib.util

# the importable modules each extra provides (setup.cfg [options.extras_require])
TRAIN = ("deepspeed", "webdataset", "fsspec", "mlflow", "psutil")
EXTRAS: dict[str, tuple[str, ...]] = {
    "mlflow": ("mlflow", "psutil"),
    "dicom-seg": ("highdicom",),
    "train": TRAIN,
    "tune": (*TRAIN, "ray", "onnx", "onnxscript", "onnxruntime"),
    "cloud": ("s3fs", "gcsfs"),
}
EXIT_MISSING = 2


class MissingExtra(ValueError):
    """``what`` needs the extra ``extra``, which is not installed; the message says how to get it."""

    def __init__(self, what: str, extra: str):
        self.what, self.extra = what, extra
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'cmunet[{extra}]'")


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (not installed, or blocked)."""
    absent = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or sys.modules[name] = None
            found = False
        if not found:
            absent.append(name)
    return absent


def check(what: str, extra: str) -> None:
    """Raise :class:`MissingExtra` when a module of ``extra`` is missing."""
    if missing(extra):
        raise MissingExtra(what, extra)


def import_module(name: str, what: str, extra: str):
    """``import name``, or :class:`MissingExtra` naming ``what`` when ``name`` is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != name.split(".")[0]:
            raise
        raise MissingExtra(what, extra) from None
