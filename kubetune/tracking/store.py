"""Where the MLflow store is: the tracking URI a step uses, and where a local store keeps its artifacts.

On a laptop, in CI or under kfp.local a step without a tracking server logs into a local sqlite store. In a
cluster pod that store would vanish with the pod, so there a step without a server either stops at start with
the fix (the default), or, with ``mlflow_required=false``, logs into a store inside its ``mlflow_store`` output,
which ``kubetune mlflow-import`` later copies into a server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from kubetune.config import tracking_uri_problems
from kubetune.errors import KubetuneError
from kubetune.secrets import redact

STORE_FILE = "mlflow.db"


def default_local_uri(root: str | os.PathLike | None = None) -> str:
    """The local sqlite store: ``<root>/mlflow.db`` (root defaults to ./kubetune-local)."""
    root = Path(root or "kubetune-local").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / STORE_FILE}"


NO_SERVER_FIX = (
    "set the mlflow_tracking_uri pipeline parameter, put MLFLOW_TRACKING_URI into the kubetune-mlflow Secret, or "
    "compile with --mlflow-uri http://mlflow.mlflow:5000; or set mlflow_required=false to keep the records in the "
    "step's mlflow_store output and load them into a server later with `kubetune mlflow-import`"
)


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """Inside a Kubernetes pod (Kubernetes sets KUBERNETES_SERVICE_HOST in every container)."""
    return bool((os.environ if environ is None else environ).get("KUBERNETES_SERVICE_HOST", "").strip())


def resolve_tracking_uri(explicit: str = "", *, required: bool = True, store_dir: str = "",
                         environ: Mapping[str, str] | None = None) -> str:
    """A pipeline parameter wins, then ``MLFLOW_TRACKING_URI``; without either, the local sqlite store outside a
    cluster (./kubetune-local/mlflow.db), and in a cluster pod an error (``required``) or the store in
    ``store_dir`` (the step's ``mlflow_store`` output)."""
    environ = os.environ if environ is None else environ
    uri = explicit.strip() or environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        if not in_cluster(environ):
            return default_local_uri()
        if required or not store_dir:
            raise KubetuneError(
                "this step runs in a cluster pod and has no MLflow tracking server: mlflow_tracking_uri is empty "
                "and the pod has no MLFLOW_TRACKING_URI, so its records would be lost with the pod",
                NO_SERVER_FIX,
            )
        return default_local_uri(store_dir)
    problems = tracking_uri_problems(uri)
    if problems:
        problem, fix = problems[0]
        raise KubetuneError(f"{problem}: {redact(uri)!r}", fix)
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database, not in the working directory of whichever step ran."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).resolve().as_uri()
    return None
