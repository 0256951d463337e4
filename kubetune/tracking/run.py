"""The pipeline run's one MLflow run, shared by the steps: :class:`Tracker`.

Steps find the run by its MLflow run id (passed along in artifact metadata) or by the KFP run id tag, so a
retried step logs into the same run. Everything logged is redacted on the way out; delivery goes through the
outage-tolerant queue of :mod:`kubetune.tracking.queue`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.secrets import redact, secret_values, without_credentials
from kubetune.tracking.artifacts import redacted_copy
from kubetune.tracking.names import (
    DEFAULT_EXPERIMENT,
    KFP_RUN_ID_TAG,
    MAX_TAG_LENGTH,
    clean_key,
    flatten_params,
    truncate,
)
from kubetune.tracking.queue import DeliveryQueue
from kubetune.tracking.registry import Registry
from kubetune.tracking.store import artifact_location
from kubetune.tracking.system_metrics import SystemMetrics

log = logging.getLogger("kubetune.tracking")

PARENT_RUN_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def dataset_source(reference: str) -> tuple[str, str]:
    """MLflow's source type for a dataset reference, and the key under which its UI shows the location."""
    scheme = reference.split("://", 1)[0].lower() if "://" in reference else ""
    if scheme in ("s3", "s3a", "gs", "gcs"):
        return ("s3" if scheme.startswith("s3") else "gcs"), "uri"
    if scheme:
        return "external", "url"
    if reference.startswith(("/", "./", "../")) or Path(reference).exists():
        return "local", "uri"
    return "hugging_face", "path"


@dataclass
class Tracker(DeliveryQueue, SystemMetrics, Registry):
    """One MLflow run; calls that fail are queued and replayed, never raised into the training step.

    Queueing and delivery (``flush``, ``finish``) come from :class:`~kubetune.tracking.queue.DeliveryQueue`,
    ``system_metrics`` from :class:`~kubetune.tracking.system_metrics.SystemMetrics` and ``register_model`` from
    :class:`~kubetune.tracking.registry.Registry`.
    """

    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str = ""
    platform_run_id: str = ""
    """The run Kubeflow Pipelines' MLflow integration made for this task (MLFLOW_RUN_ID): the run opened here is
    nested under that task's pipeline run, in its experiment, instead of standing alone."""
    pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retry_after: float = 0.0
    registered: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fail over fast: our own queue retries, MLflow's client must not block a step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self._client = None
        self.secrets = secret_values()
        self._staging: str | None = None
        # The system metrics thread logs through the same queue as the training loop.
        self._lock = threading.RLock()

    @property
    def client(self):
        """The MLflow client, made on first use: inside the outage-tolerant calls, so a store that cannot be
        opened (a read-only folder, a half-created database) is queued and reported like a server outage."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    # -- run lifecycle -------------------------------------------------------------------------------------
    def open(self, *, run_name: str = "", kfp_run_id: str = "", tags: Mapping[str, str] | None = None) -> str:
        """Reuse ``run_id``, or the run tagged with this KFP run id, or create a run. Raises on no connection:
        callers decide (see :meth:`try_open`). A reused run that a failed attempt ended is marked running again."""
        if self.run_id:
            self._resume(self.client.get_run(self.run_id))
            return self.run_id
        if self.platform_run_id:  # KFP chose the experiment; the run sits beside KFP's task runs
            task_run = self.client.get_run(self.platform_run_id)
            experiment_id = task_run.info.experiment_id
            parent = task_run.data.tags.get(PARENT_RUN_TAG) or self.platform_run_id
        else:
            experiment_id, parent = self._experiment_id(), ""
        if kfp_run_id:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                self._resume(found[0])
                return self.run_id
        all_tags = {KFP_RUN_ID_TAG: kfp_run_id, PARENT_RUN_TAG: parent, **(tags or {})}
        run = self.client.create_run(
            experiment_id,
            run_name=redact(run_name, self.secrets) or None,
            tags={k: self._tag_value(v) for k, v in all_tags.items() if v},
        )
        self.run_id = run.info.run_id
        return self.run_id

    def _resume(self, run) -> None:
        if run.info.status in ("FAILED", "KILLED"):
            self.client.update_run(run.info.run_id, status="RUNNING")

    def try_open(self, *, attempts: int = 3, wait_s: float = 2.0, **kwargs) -> bool:
        """Open the run, retrying briefly; on failure record why and carry on without tracking for now."""
        for attempt in range(attempts):
            try:
                self.open(**kwargs)
                return True
            except Exception as exc:  # noqa: BLE001 - any transport/server error means "not now"
                message = self._redact(
                    f"MLflow at {self.tracking_uri} unreachable: {type(exc).__name__}: {str(exc)[:200]}")
                if attempt == attempts - 1:
                    self.errors.append(message)
                    log.warning("%s; training continues and logging will be retried", message)
                else:
                    time.sleep(wait_s)
        return False

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            # The MLflow UI opens an experiment of this kind on its runs, not on the GenAI (traces) view.
            return self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.tracking_uri, self.experiment),
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
            )
        except Exception:  # another step created it first
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    @property
    def run_url(self) -> str:
        """The run's page in the MLflow UI (http(s) servers only), without any credentials of the URI."""
        if not self.run_id or not self.tracking_uri.startswith("http"):
            return ""
        try:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
        except Exception:  # noqa: BLE001
            return ""
        return f"{without_credentials(self.tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"

    # -- logging ---------------------------------------------------------------------------------------------
    def _redact(self, value: Any) -> str:
        return redact(value, self.secrets)

    def _tag_value(self, value: Any) -> str:
        return truncate(self._redact(value), MAX_TAG_LENGTH)

    def log_params(self, groups: Mapping[str, Mapping[str, Any]]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_params(groups, self.secrets).items()]
        for start in range(0, len(params), 90):
            chunk = params[start : start + 90]
            self._send("log params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(self._metric_name(prefix + k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drop NaN
        ]
        if entries:
            self._send("log metrics", lambda: self.client.log_batch(self.run_id, metrics=entries))

    def log_dataset(self, reference: str, *, digest: str, context: str, rows: int = 0) -> None:
        """Record a prepared dataset as an input of this run (the Datasets column of the MLflow UI): named after
        the user's ``reference`` (file, URI, hub id), with its content hash and whether it is the train or eval
        set. Only the reference is sent, never the data."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        clean = self._redact(reference)
        source_type, key = dataset_source(clean)
        dataset = Dataset(name=clean.rstrip("/").rsplit("/", 1)[-1][:500] or "dataset", digest=digest[:32],
                          source_type=source_type, source=json.dumps({key: clean}),
                          profile=json.dumps({"num_rows": rows, "sha256": digest}))
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self._send("log dataset", lambda: self.client.log_inputs(self.run_id, datasets=[entry]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(clean_key(k), self._tag_value(v)) for k, v in tags.items() if v not in ("", None)]
        if entries:
            self._send("set tags", lambda: self.client.log_batch(self.run_id, tags=entries))

    def log_artifact(self, local_path: str, artifact_path: str | None = None, *, name: str = "") -> None:
        """Log a file or directory (as ``name`` when given); text files holding a secret are logged redacted,
        binary ones left out."""
        path = self._redacted_copy(Path(local_path))
        if name and name != path.name:
            renamed = Path(tempfile.mkdtemp(prefix="artifact-", dir=self._staging_dir())) / name
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, renamed)
            path = renamed
        if path.is_dir():
            self._send("log artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        elif path.is_file():
            self._send("log artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        clean = self._redact(text)
        self._send("log text", lambda: self.client.log_text(self.run_id, clean, artifact_file))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import pandas as pd

        frame = pd.DataFrame([{k: self._redact(v) for k, v in row.items()} for row in rows])
        self._send("log table", lambda: self.client.log_table(self.run_id, frame, artifact_file))

    def log_figure(self, figure, artifact_file: str) -> None:
        """Save a matplotlib figure as PNG and log it (e.g. ``plots/loss_curve.png``)."""
        target = Path(self._staging_dir()) / "figures" / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format="png", dpi=110, bbox_inches="tight")
        directory = str(Path(artifact_file).parent) if "/" in artifact_file else None
        self._send("log figure", lambda: self.client.log_artifact(self.run_id, str(target), directory))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` of a metric of this run, sorted by step; empty when unreachable or not logged."""
        if not self.run_id:
            return []
        try:
            history = self.client.get_metric_history(self.run_id, key)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read %s history: %s", key, self._redact(exc))
            return []
        return sorted((m.step, m.value) for m in history)

    def _metric_name(self, name: str) -> str:
        return clean_key(self._redact(name))

    def _staging_dir(self) -> str:
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="kubetune-mlflow-")
        return self._staging

    def _redacted_copy(self, path: Path) -> Path:
        """``path`` itself when no file in it holds a secret, else a staged copy with those files redacted."""
        staged, left_out = redacted_copy(path, self.secrets, self._staging_dir)
        for message in left_out:
            self.errors.append(message)
            log.warning(message)
        return staged
