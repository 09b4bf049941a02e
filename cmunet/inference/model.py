"""A fine-tuned UNet and the preprocessing it was trained with, ready for inference.

:func:`load_model` accepts

* a fine-tuning output folder (``launch/finetune.py``'s ``out``: ``best.safetensors`` and
  ``preprocessing.json``), or any folder with exactly one such pair somewhere below it;
* a ``.safetensors`` file with a ``preprocessing.json`` beside it;
* an MLflow run id (32 hex digits: the run's artifacts are searched, else the one model the run
  logged), ``runs:/<run id>/<path>``,
  ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -- downloaded by
  :func:`cmunet.tracking.registry.resolve`. A registered champion is an MLflow pyfunc model whose
  tree holds the fine-tuning files somewhere below its root; they are found by searching it for
  ``best.safetensors``.

``preprocessing.json`` (written by :func:`cmunet.training.finetune.write_preprocessing`) holds the
training side ``size``, the storage type ``dtype``, the z-score ``mean`` and ``std`` in stored gray
levels, and the :class:`~cmunet.data.preprocess.PreprocessConfig` of the training shards.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cmunet.config import ConfigError, from_dict
from cmunet.data.preprocess import PreprocessConfig
from cmunet.models.export import read_weights
from cmunet.models.unet import UNet
from cmunet.tracking.uri import resolve_uri
from cmunet.tracking.registry import resolve
from cmunet.training.finetune import PREPROCESSING, WEIGHTS, width_of
from cmunet.training.precision import Precision, default_device, use_bf16

RUN_ID = re.compile(r"[0-9a-f]{32}")
STORAGE_TYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class Preprocessing:
    """What inference repeats of the training data's preprocessing (``preprocessing.json``)."""

    size: int  # side of the (square) training images in pixels
    dtype: str  # storage type of the training images: "uint8" or "uint16"
    mean: float  # z-score statistics, in stored gray levels
    std: float
    preprocess: PreprocessConfig


@dataclass
class InferenceModel:
    """A fine-tuned UNet in eval mode on ``device``, with its preprocessing."""

    net: UNet
    preprocessing: Preprocessing
    weights: Path  # the file it was loaded from
    device: torch.device
    bf16: bool  # run under bf16 autocast

    def describe(self) -> str:
        prep = self.preprocessing
        return (f"{self.weights} (UNet width {self.net.width}, trained on {prep.size} px "
                f"{prep.dtype} images, fit={prep.preprocess.fit}); {self.device}, "
                f"{'bf16' if self.bf16 else 'fp32'}")


def load_model(reference: str, tracking_uri: str = "", precision: Precision = "auto",
               device: torch.device | None = None) -> InferenceModel:
    """The model named by ``reference`` (see the module docstring), on ``device`` (default: the
    GPU if there is one). Raises FileNotFoundError or ValueError saying what is missing."""
    if RUN_ID.fullmatch(reference) and not Path(reference).exists():
        weights = weights_of_run(reference, tracking_uri)
    else:
        weights = find_weights(resolve(reference, tracking_uri), reference)
    preprocessing_file = weights.parent / PREPROCESSING
    if not preprocessing_file.is_file():
        raise FileNotFoundError(
            f"{weights} has no {PREPROCESSING} beside it: inference must repeat the training "
            f"data's preprocessing and z-score. Copy {PREPROCESSING} from the fine-tuning output "
            "folder (launch/finetune.py writes it) next to the weights, or give that folder")
    preprocessing = read_preprocessing(preprocessing_file)
    net = load_unet(weights)
    device = device or default_device()
    net.to(device, memory_format=torch.channels_last).eval()
    return InferenceModel(net, preprocessing, weights, device, use_bf16(device, precision))


def weights_of_run(run_id: str, tracking_uri: str) -> Path:
    """The weights file among the artifacts of MLflow run ``run_id``, else in the one model the run
    logged (MLflow 3 keeps logged models, such as the pyfunc champion, outside the run's artifact
    tree; ``runs:/<run id>/<model name>`` reaches them)."""
    reference = f"runs:/{run_id}/"
    root = resolve(reference, tracking_uri)
    if not any(root.rglob(WEIGHTS)):
        models = logged_models(run_id, tracking_uri)
        if len(models) > 1:
            raise ValueError(f"run {run_id} has no {WEIGHTS} among its artifacts and logged "
                             f"{len(models)} models: give one of {', '.join(models)}")
        if models:
            reference = models[0]
            root = resolve(reference, tracking_uri)
    return find_weights(root, reference)


def logged_models(run_id: str, tracking_uri: str) -> list[str]:
    """``runs:/<run id>/<name>`` of every model logged in MLflow run ``run_id``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_run(run_id).info.experiment_id
        models = client.search_logged_models(experiment_ids=[experiment],
                                             filter_string=f"source_run_id = '{run_id}'")
    except MlflowException as err:
        raise FileNotFoundError(f"cannot list the models of run {run_id} in {uri}: {err}") from None
    return [f"runs:/{run_id}/{model.name}" for model in models]


def find_weights(root: Path, reference: str) -> Path:
    """``root`` itself if it is a ``.safetensors`` file, else the one ``best.safetensors`` in
    ``root`` or below it."""
    if root.is_file():
        if root.suffix != ".safetensors":
            raise ValueError(f"{reference}: {root} is not a .safetensors file; give the output "
                             "folder of launch/finetune.py or its best.safetensors")
        return root
    if (root / WEIGHTS).is_file():
        return root / WEIGHTS
    found = sorted(root.rglob(WEIGHTS))
    if not found:
        raise FileNotFoundError(f"{reference}: no {WEIGHTS} in {root} or below; give the output "
                                "folder of launch/finetune.py, a .safetensors file, or an MLflow "
                                "reference to a fine-tuned model")
    if len(found) > 1:
        listing = ", ".join(str(p.parent.relative_to(root)) for p in found[:5])
        raise ValueError(f"{reference}: {len(found)} {WEIGHTS} files below {root} ({listing}"
                         f"{', ...' if len(found) > 5 else ''}); name the folder of the one to use")
    return found[0]


def read_preprocessing(path: Path) -> Preprocessing:
    """Read and check a ``preprocessing.json``; a ValueError names the file and the problem."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it ({err})") from None
    keys = ("size", "dtype", "mean", "std", "preprocess")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; expected the {PREPROCESSING} "
                         "written by launch/finetune.py")
    try:
        preprocess = from_dict(PreprocessConfig, data["preprocess"], "preprocess.")
    except ConfigError as err:
        raise ValueError(f"{path}: {err}") from None
    size, dtype, mean, std = data["size"], data["dtype"], data["mean"], data["std"]
    problems = []
    if not isinstance(size, int) or size < 16 or size % 16:
        problems.append(f"size = {size!r} must be a multiple of 16 (the UNet's input sides)")
    elif preprocess.size != size:
        problems.append(f"size = {size} differs from preprocess.size = {preprocess.size}")
    if dtype not in STORAGE_TYPES:
        problems.append(f"dtype = {dtype!r} must be one of {', '.join(STORAGE_TYPES)}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
        problems.append(f"mean = {mean!r} and std = {std!r} must be finite numbers, std > 0")
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    return Preprocessing(size, dtype, float(mean), float(std), preprocess)


def load_unet(weights: Path) -> UNet:
    """The segmentation UNet whose full state dict (2-class head included) is ``weights``."""
    state = read_weights(weights)
    head = state.get("head.weight")
    if head is None or head.shape[0] != 2:
        raise ValueError(f"{weights}: not a fine-tuned segmentation UNet (no 2-class head.weight); "
                         "a pre-training export must be fine-tuned first (launch/finetune.py)")
    width = width_of(state, str(weights))
    net = UNet(width)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit a UNet of width {width}: "
                         f"{str(err).splitlines()[-1].strip()}") from None
    return net
