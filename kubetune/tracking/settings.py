"""What a step passes to say where and under which names it logs to MLflow: :class:`Tracking`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune import __version__
from kubetune.tracking.names import (
    DEFAULT_EXPERIMENT,
    KFP_RUN_NAME_TAG,
    NO_REGISTRATION,
    PIPELINE_VERSION_TAG,
    default_model_name,
)
from kubetune.tracking.run import Tracker
from kubetune.tracking.store import resolve_tracking_uri
from kubetune.tracking.transfer import continue_store, has_records, open_store, store_uri


def platform_run_id(tracking_uri: str, environ: Mapping[str, str] | None = None) -> str:
    """The MLflow run Kubeflow Pipelines made for this task (its MLflow integration sets MLFLOW_RUN_ID and
    MLFLOW_TRACKING_URI in the pod), when this step logs to that same server; else ""."""
    environ = os.environ if environ is None else environ
    run_id = environ.get("MLFLOW_RUN_ID", "").strip()
    same_server = environ.get("MLFLOW_TRACKING_URI", "").strip() == tracking_uri
    return run_id if run_id and same_server else ""


@dataclass
class Tracking:
    """Where and under which names a step logs to MLflow."""

    tracking_uri: str = ""
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str = ""
    kfp_run_id: str = ""
    kfp_run_name: str = ""
    registered_model: str = ""  # empty: <experiment>-adapter; "none": do not register
    required: bool = True
    """In a cluster pod without a tracking server: stop at start (True) or log into ``store_dir`` (False)."""
    store_dir: str = ""
    """The step's ``mlflow_store`` output: the store when there is no server, else a note naming the server."""

    def for_evaluation(self, adapter_metadata: dict[str, Any], training_store: str = "") -> Tracking:
        """Evaluation logs into the training's MLflow run, which the adapter's metadata names with its store (a
        given tracking URI takes precedence). When training had no server and kept its records in its
        ``mlflow_store`` output, evaluation carries on in a copy of that store, in its own output."""
        uri = self.tracking_uri or adapter_metadata.get("tracking_uri", "")
        if not self.tracking_uri and training_store and has_records(training_store) and self.store_dir:
            uri = continue_store(training_store, self.store_dir)
        return dataclasses.replace(self, tracking_uri=uri, run_id=adapter_metadata.get("mlflow_run_id", ""))

    def resolve(self) -> str:
        """The tracking URI this step uses (see :func:`kubetune.tracking.store.resolve_tracking_uri`); a store in
        ``store_dir`` is prepared for import elsewhere."""
        uri = resolve_tracking_uri(self.tracking_uri, required=self.required, store_dir=self.store_dir)
        if self.store_dir and uri == store_uri(self.store_dir):
            open_store(self.store_dir)
        return uri

    def uses_output_store(self, uri: str) -> bool:
        """Does ``uri`` point at the store in this step's output (which no other pod can open)?"""
        return bool(self.store_dir) and uri == store_uri(self.store_dir)

    def tracker(self) -> Tracker:
        uri = self.resolve()
        return Tracker(uri, self.experiment or DEFAULT_EXPERIMENT, run_id=self.run_id,
                       platform_run_id=platform_run_id(uri))

    def open_kwargs(self) -> dict[str, Any]:
        return {
            "run_name": self.kfp_run_name,
            "kfp_run_id": self.kfp_run_id,
            "tags": {KFP_RUN_NAME_TAG: self.kfp_run_name, PIPELINE_VERSION_TAG: __version__},
        }

    def model_name(self) -> str:
        if self.registered_model.strip().lower() == NO_REGISTRATION:
            return ""
        return self.registered_model.strip() or default_model_name(self.experiment)
