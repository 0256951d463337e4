"""Where the MLflow store is: the tracking URI a step uses, and where a local store keeps its artifacts."""

from __future__ import annotations

import os
import re
from pathlib import Path

from kubetune.errors import KubetuneError
from kubetune.secrets import redact


def default_local_uri(root: str | os.PathLike | None = None) -> str:
    """The local sqlite store: ``<root>/mlflow.db`` (root defaults to ./kubetune-local)."""
    root = Path(root or "kubetune-local").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str = "") -> str:
    """A pipeline parameter wins, then ``MLFLOW_TRACKING_URI``, then the local sqlite store."""
    uri = explicit.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return default_local_uri()
    if "://" not in uri and not uri.startswith("databricks"):
        raise KubetuneError(
            f"mlflow_tracking_uri {redact(uri)!r} is not a URI",
            "use http(s)://host:port for a tracking server or sqlite:////abs/path/mlflow.db for a local store",
        )
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database, not in the working directory of whichever step ran."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).resolve().as_uri()
    return None
