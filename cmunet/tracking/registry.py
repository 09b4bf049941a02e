"""Model references across jobs: local paths, MLflow run artifacts and registered model versions.

``init=`` (fine-tuning, tuning) and ``--model`` (segmentation) accept

* a local path (an export folder, a fine-tuning output folder, a ``.safetensors`` file),
* ``runs:/<run id>/<artifact path>`` (e.g. ``runs:/3f2c.../export``),
* ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (e.g. ``models:/cmunet-pretrain/3``,
  ``models:/cmunet@champion``),

resolved by :func:`resolve` to a local path (MLflow artifacts are downloaded to a cache folder).
Pre-training exports are registered as versions of a model (default ``cmunet-pretrain``) by
:func:`register_folder`, tagged with their epoch and losses, so the MLflow UI lists them side by
side and a user can pick one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from cmunet.extras import import_module
from cmunet.tracking.uri import resolve_uri

MLFLOW_SCHEMES = ("runs:/", "models:/")


def is_mlflow_uri(reference: str) -> bool:
    return reference.startswith(MLFLOW_SCHEMES)


@contextlib.contextmanager
def _process_uris(uri: str):
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for the duration:
    MLflow 3 resolves ``models:/`` and logged-model ``runs:/`` references through them, whatever
    tracking URI ``download_artifacts`` is given. Both are restored (or unset) afterwards."""
    import mlflow

    before = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None unsets it
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        if before["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def resolve(reference: str, tracking_uri: str = "", cache: str | Path | None = None) -> Path:
    """A local path for ``reference`` (see the module docstring); raises FileNotFoundError with
    what to do when it cannot be found."""
    if not is_mlflow_uri(reference):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"{reference} does not exist (expected a folder, a "
                                    ".safetensors file, runs:/RUN_ID/PATH or models:/NAME/VERSION)")
        return path
    # without MLflow: "models:/... needs the 'mlflow' extra: pip install 'cmunet[mlflow]'"
    mlflow = import_module("mlflow", reference, "mlflow")

    uri = resolve_uri(tracking_uri)
    base = Path(cache or Path(tempfile.gettempdir()) / "cmunet-artifacts")
    base.mkdir(parents=True, exist_ok=True)
    # A fresh folder per call: an alias (models:/cmunet@champion) may point elsewhere tomorrow.
    digest = hashlib.sha256(f"{uri}|{reference}".encode()).hexdigest()[:12]
    target = tempfile.mkdtemp(prefix=f"{digest}-", dir=base)
    try:
        with _process_uris(uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=reference, tracking_uri=uri,
                                                        dst_path=target)
    except Exception as err:  # MlflowException, missing run/model/alias
        raise FileNotFoundError(f"cannot fetch {reference} from {uri}: {err}") from None
    return Path(local)


def register_folder(client, run_id: str, artifact_path: str, name: str,
                    tags: dict[str, str], description: str = "") -> str:
    """Register ``runs:/run_id/artifact_path`` (already logged) as a new version of model
    ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description or None)
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}",
                                          run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    return version.version
