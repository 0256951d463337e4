"""MLflow tracking: one run per pipeline run, shared by the steps, that survives a tracking-server outage.

Steps find the run by its MLflow run id (passed along in artifact metadata) or by the KFP run id tag, so a
retried step logs into the same run. Every call goes through :meth:`Tracker._send`: when the server is down, the
call is queued in memory and replayed by :meth:`Tracker.flush`; training never fails because MLflow did.
Secrets are redacted by name and by value before anything leaves the process.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError

log = logging.getLogger("kubetune.tracking")

DEFAULT_EXPERIMENT = "kubetune"
KFP_RUN_ID_TAG = "kubetune.kfp_run_id"
KFP_RUN_NAME_TAG = "kubetune.kfp_run_name"
PIPELINE_VERSION_TAG = "kubetune.pipeline_version"
MAX_PARAM_LENGTH = 500
REDACTED = "***"
RETRY_INTERVAL_S = 20.0  # while the server is down, try again at most this often
# Whole name parts only: HF_TOKEN, aws_secret_access_key, api-key match; tokenizer, max_new_tokens don't.
SECRET_NAME = re.compile(
    r"(^|[_.\-])(token|secret|password|passwd|credentials?|api[_\-]?key|access[_\-]?key|auth|authorization)($|[_.\-])",
    re.I,
)


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
            f"mlflow_tracking_uri {uri!r} is not a URI",
            "use http(s)://host:port for a tracking server or sqlite:////abs/path/mlflow.db for a local store",
        )
    return uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database, not in the working directory of whichever step ran."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).resolve().as_uri()
    return None


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like secrets (long enough to be worth matching)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(value: Any, secrets: Iterable[str]) -> str:
    text = str(value)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def flatten_params(groups: Mapping[str, Mapping[str, Any]], secrets: Iterable[str] = ()) -> dict[str, str]:
    """``{"lora": {"lora_r": 16}}`` → ``{"lora.lora_r": "16"}``; secret-named keys and secret values redacted,
    long values truncated with a marker."""
    secrets = list(secrets)
    flat: dict[str, str] = {}
    for prefix, values in groups.items():
        for key, value in values.items():
            name = f"{prefix}.{key}" if prefix else key
            text = REDACTED if SECRET_NAME.search(key) and value not in ("", None) else redact(value, secrets)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 15] + "...[truncated]"
            flat[name] = text
    return flat


@dataclass
class Tracker:
    """One MLflow run; calls that fail are queued and replayed, never raised into the training step."""

    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str = ""
    pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retry_after: float = 0.0

    def __post_init__(self) -> None:
        # Fail over fast: our own queue retries, MLflow's client must not block a step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.secrets = secret_values()

    # -- run lifecycle -------------------------------------------------------------------------------------
    def open(self, *, run_name: str = "", kfp_run_id: str = "", tags: Mapping[str, str] | None = None) -> str:
        """Reuse ``run_id``, or the run tagged with this KFP run id, or create a run. Raises on no connection:
        callers decide (see :meth:`try_open`)."""
        if self.run_id:
            self.client.get_run(self.run_id)
            return self.run_id
        experiment_id = self._experiment_id()
        if kfp_run_id:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                return self.run_id
        all_tags = {KFP_RUN_ID_TAG: kfp_run_id, **(tags or {})}
        run = self.client.create_run(
            experiment_id, run_name=run_name or None, tags={k: redact(v, self.secrets) for k, v in all_tags.items() if v}
        )
        self.run_id = run.info.run_id
        return self.run_id

    def try_open(self, *, attempts: int = 3, wait_s: float = 2.0, **kwargs) -> bool:
        """Open the run, retrying briefly; on failure record why and carry on without tracking for now."""
        for attempt in range(attempts):
            try:
                self.open(**kwargs)
                return True
            except Exception as exc:  # noqa: BLE001 - any transport/server error means "not now"
                message = f"MLflow at {self.tracking_uri} unreachable: {type(exc).__name__}: {str(exc)[:200]}"
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
            return self.client.create_experiment(
                self.experiment, artifact_location=_artifact_location(self.tracking_uri, self.experiment)
            )
        except Exception:  # another step created it first
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    @property
    def run_url(self) -> str:
        if not self.run_id or not self.tracking_uri.startswith("http"):
            return ""
        try:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
        except Exception:  # noqa: BLE001
            return ""
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"

    # -- logging ---------------------------------------------------------------------------------------------
    def _send(self, what: str, call: Callable[[], Any]) -> None:
        if not self.run_id or self.pending:
            self.pending.append((what, call))
            if self.run_id and time.time() >= self.retry_after:
                self.flush(quiet=True)
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow %s failed (%s); queued for retry", what, type(exc).__name__)
            self.pending.append((what, call))
            self.retry_after = time.time() + RETRY_INTERVAL_S

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
            if isinstance(v, (int, float)) and v == v  # drop NaN
        ]
        if entries:
            self._send("log metrics", lambda: self.client.log_batch(self.run_id, metrics=entries))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(k, redact(v, self.secrets)[:5000]) for k, v in tags.items() if v not in ("", None)]
        if entries:
            self._send("set tags", lambda: self.client.log_batch(self.run_id, tags=entries))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self._send("log artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._send("log artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        clean = redact(text, self.secrets)
        self._send("log text", lambda: self.client.log_text(self.run_id, clean, artifact_file))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import pandas as pd

        frame = pd.DataFrame([{k: redact(v, self.secrets) for k, v in row.items()} for row in rows])
        self._send("log table", lambda: self.client.log_table(self.run_id, frame, artifact_file))

    def _metric_name(self, name: str) -> str:
        # MLflow metric names allow letters, digits, _ - . / and space.
        return re.sub(r"[^\w\-./ ]", "_", name)

    # -- delivery ------------------------------------------------------------------------------------------
    def flush(self, *, timeout_s: float = 0.0, quiet: bool = False, **open_kwargs) -> bool:
        """Replay queued calls, retrying until ``timeout_s``; True when nothing is left queued."""
        deadline = time.time() + timeout_s
        while True:
            try:
                if not self.run_id:
                    self.open(**open_kwargs)
                while self.pending:
                    what, call = self.pending[0]
                    call()
                    self.pending.pop(0)
                return True
            except Exception as exc:  # noqa: BLE001
                self.retry_after = time.time() + RETRY_INTERVAL_S
                if time.time() >= deadline:
                    if not quiet:
                        self.errors.append(f"MLflow {what if self.run_id else 'open run'} failed: {exc!s:.200}")
                    return False
                time.sleep(min(5.0, max(0.5, deadline - time.time())))

    def finish(self, *, status: str = "", timeout_s: float = 60.0, **open_kwargs) -> str:
        """Deliver everything (waiting up to ``timeout_s`` for a server that is coming back) and optionally end
        the run. Returns "" on success, or a one-paragraph report of what could not be logged."""
        if status:
            self._send("end run", lambda: self.client.set_terminated(self.run_id, status))
        if self.flush(timeout_s=timeout_s, **open_kwargs):
            return ""
        lost = sorted({what for what, _ in self.pending})
        return (
            f"MLflow tracking incomplete: {len(self.pending)} call(s) not delivered ({', '.join(lost)}) to "
            f"{self.tracking_uri}. The step's outputs are complete in the pipeline's artifacts; "
            f"check the server and MLFLOW_TRACKING_* credentials. Last error: {self.errors[-1] if self.errors else '-'}"
        )
