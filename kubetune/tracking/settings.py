"""What a step passes to say where and under which names it logs to MLflow: :class:`Tracking`."""

from __future__ import annotations

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


@dataclass
class Tracking:
    """Where and under which names a step logs to MLflow."""

    tracking_uri: str = ""
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str = ""
    kfp_run_id: str = ""
    kfp_run_name: str = ""
    registered_model: str = ""  # empty: <experiment>-adapter; "none": do not register

    @classmethod
    def of_adapter(
        cls, adapter_metadata: dict[str, Any], tracking_uri: str, experiment: str, kfp_run_id: str, kfp_run_name: str
    ) -> Tracking:
        """Evaluation logs into the training's MLflow run, which the adapter's metadata names with its store;
        a given tracking URI takes precedence over that store."""
        return cls(tracking_uri or adapter_metadata.get("tracking_uri", ""), experiment,
                   adapter_metadata.get("mlflow_run_id", ""), kfp_run_id, kfp_run_name)

    def tracker(self) -> Tracker:
        return Tracker(resolve_tracking_uri(self.tracking_uri), self.experiment or DEFAULT_EXPERIMENT,
                       run_id=self.run_id)

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
