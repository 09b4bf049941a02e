"""A fine-tuned UNet as an MLflow pyfunc model, logged from code and registered with a signature.

The model's artifacts are a fine-tuning output folder (``best.safetensors``, ``config.yaml``,
``result.json``, ``preprocessing.json``, ``history.csv``), copied by MLflow to
``artifacts/finetune/`` inside the model; :file:`segmenter_code.py` is its code. Loading needs
the ``cmunet`` package installed (``pip install -e .``).

``predict`` takes images already preprocessed as in training -- the shards' preprocessing at the
size of ``preprocessing.json``, z-scored with its ``mean``/``std`` -- as float32 ``(N, 1, H, W)``
with H and W multiples of 16, and returns float32 ``(N, H, W)``: the vessel probability (softmax of
the vessel class), or with ``params={"mask": True}`` the binary mask (1.0 where the probability
exceeds 0.5, the argmax used in evaluation). ``params={"batch_size": n}`` sets the inference batch.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/cmunet@champion")
    probability = model.predict(images)                       # (N, H, W) in [0, 1]
    mask = model.predict(images, params={"mask": True})       # (N, H, W) of 0/1

The search also logs the same network as an ONNX model (:func:`log_onnx`, named ``onnx`` in the
search's run, its URI in the registered version's tag ``onnx``): the same input, the probability
as output, for onnxruntime and other runtimes without PyTorch or cmunet.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from cmunet.tracking.registry import _process_uris

ARTIFACT = "finetune"  # key (and folder name) of the fine-tuning output folder in the model
CODE = Path(__file__).with_name("segmenter_code.py")
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
    params=ParamSchema([ParamSpec("mask", "boolean", False), ParamSpec("batch_size", "long", 16)]))


class Segmenter(mlflow.pyfunc.PythonModel):
    """Vessel probabilities or masks of z-scored images (see the module docstring)."""

    def load_context(self, context) -> None:
        from cmunet.evaluation.evaluate import load_finetuned
        from cmunet.training.precision import default_device

        self.device = default_device()
        self.model = load_finetuned(context.artifacts[ARTIFACT]).to(self.device).eval()

    def predict(self, context, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected preprocessed images of shape (N, 1, H, W), got "
                             f"{images.shape}")
        batch = int(params.get("batch_size", 16))
        outputs = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                logits = self.model(torch.from_numpy(images[i:i + batch]).to(self.device))
                outputs.append(logits.float().softmax(dim=1)[:, 1].cpu().numpy())
        probability = np.concatenate(outputs) if outputs else np.zeros((0, *images.shape[2:]),
                                                                       np.float32)
        if params.get("mask", False):
            return (probability > 0.5).astype(np.float32)
        return probability


def requirements() -> list[str]:
    """The model's pip requirements, pinned to this environment (cmunet itself is not on PyPI)."""
    import safetensors

    versions = {"torch": torch.__version__, "numpy": np.__version__,
                "safetensors": safetensors.__version__, "mlflow": mlflow.__version__}
    return [f"{name}=={version.split('+')[0]}" for name, version in versions.items()]


ONNX_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1), "image")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), "probability")]))


def log_onnx(tracking_uri: str, run_id: str, path: Path, tags: dict[str, Any]) -> str:
    """Log the ONNX file ``path`` (cmunet/models/onnx_export.py) as the ONNX model ``onnx`` of run
    ``run_id``, beside its pyfunc model ``model``, and return its URI (``models:/<model id>``).
    MLflow's ONNX flavour loads it with onnxruntime, without torch or cmunet."""
    import onnx

    # the process-wide URIs (and $MLFLOW_TRACKING_URI, which resolve_uri reads) are restored after
    with _process_uris(tracking_uri), mlflow.start_run(run_id=run_id), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="onnx",
                                     signature=ONNX_SIGNATURE, save_as_external_data=False,
                                     tags={k: str(v) for k, v in tags.items()})
    return info.model_uri


def log_segmenter(tracking_uri: str, run_id: str, folder: Path, name: str, alias: str,
                  tags: dict[str, Any]) -> str:
    """Log the fine-tuning output ``folder`` as the pyfunc model ``model`` of run ``run_id``,
    register it as a new version of ``name`` tagged with ``tags``, point ``alias`` at it (unless
    empty) and return the version."""
    from mlflow.tracking import MlflowClient

    with _process_uris(tracking_uri), mlflow.start_run(run_id=run_id), \
            warnings.catch_warnings():
        # the signature is explicit; an input example at the real size would be megabytes
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(name="model", python_model=str(CODE),
                                       artifacts={ARTIFACT: str(folder)}, signature=SIGNATURE,
                                       pip_requirements=requirements(),
                                       registered_model_name=name)
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version
