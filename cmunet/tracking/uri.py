"""Where MLflow records go: the tracking URI every job resolves the same way (imported by the run
writer and the model registry alike, before either imports MLflow)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from the toolkit


def resolve_uri(uri: str) -> str:
    """An absolute tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the default SQLite
    file in the working directory; relative sqlite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder or file path
        return f"sqlite:///{Path(uri).resolve()}"
    return uri
