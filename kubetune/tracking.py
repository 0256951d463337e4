"""MLflow tracking: one run per pipeline run, shared by the steps, that survives a tracking-server outage.

Steps find the run by its MLflow run id (passed along in artifact metadata) or by the KFP run id tag, so a
retried step logs into the same run. Every call goes through :meth:`Tracker._send`: when the server is down, the
call is queued in memory and replayed by :meth:`Tracker.flush`; training never fails because MLflow did.
Secrets are redacted by name and by value before anything leaves the process: params, tags, metric names, texts,
tables, artifact files, registry tags and error messages.

The adapter is registered in the MLflow Model Registry; load it back with::

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from kubetune.tracking import download_adapter

    base = AutoModelForCausalLM.from_pretrained(BASE_MODEL)   # the version's kubetune.base_model tag
    model = PeftModel.from_pretrained(base, download_adapter(TRACKING_URI, "kubetune-adapter", alias="champion"))
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.secrets import (  # noqa: F401
    REDACTED,
    TOKEN_SHAPES,
    URL_PASSWORD,
    is_secret_name,
    redact,
    secret_values,
    without_credentials,
)
from kubetune.storage import file_sha256  # noqa: F401 - part of this module's API (dataset hashes)

log = logging.getLogger("kubetune.tracking")

DEFAULT_EXPERIMENT = "kubetune"
KFP_RUN_ID_TAG = "kubetune.kfp_run_id"
KFP_RUN_NAME_TAG = "kubetune.kfp_run_name"
PIPELINE_VERSION_TAG = "kubetune.pipeline_version"
REGISTERED_MODEL_TAG = "kubetune.registered_model"
REGISTERED_VERSION_TAG = "kubetune.registered_model_version"
DATASET_HASH_TAG = "kubetune.dataset_sha256"
MAX_PARAM_LENGTH = 500  # MLflow takes 6000; longer values are unreadable in its UI, and the marker keeps a hash
MAX_TAG_LENGTH = 5000
RETRY_INTERVAL_S = 20.0  # while the server is down, try again at most this often
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
SYSTEM_METRICS_PREFIX = "system/"
NO_REGISTRATION = "none"
_TEXT_SUFFIXES = {".json", ".jsonl", ".html", ".htm", ".md", ".txt", ".yaml", ".yml", ".csv", ".jinja", ".py", ".cfg"}
_MAX_TEXT_BYTES = 64 << 20


def truncate(text: str, limit: int = MAX_PARAM_LENGTH) -> str:
    """Cut ``text`` to ``limit`` characters, ending with a marker that keeps the full value's length and hash, so
    two long values that differ only past the cut still compare as different."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    marker = f"...[truncated: {len(text)} chars, sha256 {digest}]"
    return text[: max(0, limit - len(marker))] + marker


def _clean_key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space, up to 250 characters.
    return re.sub(r"[^\w\-./ ]", "_", name)[:250]


def flatten_params(groups: Mapping[str, Any], secrets: Iterable[str] = (),
                   max_length: int = MAX_PARAM_LENGTH) -> dict[str, str]:
    """``{"lora": {"lora_r": 16}}`` → ``{"lora.lora_r": "16"}``, nested mappings flattened the same way.

    Values of secret-named keys become ``***``, secret values inside other values are redacted, and long values
    are truncated (after redaction, so a cut never leaves half a secret behind).
    """
    secrets = list(secrets)
    flat: dict[str, str] = {}

    def visit(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(name, value)
            elif is_secret_name(str(key)) and value not in ("", None):
                flat[_clean_key(name)] = REDACTED
            else:
                flat[_clean_key(name)] = truncate(redact(value, secrets), max_length)

    visit("", groups)
    return flat


# -- local and hashing helpers --------------------------------------------------------------------------------
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


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database, not in the working directory of whichever step ran."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).resolve().as_uri()
    return None


def default_model_name(experiment: str) -> str:
    """The registered model the adapters of an experiment go to: ``<experiment>-adapter``."""
    return registered_model_name(f"{experiment or DEFAULT_EXPERIMENT}-adapter")


def registered_model_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "-", name.strip()).strip("-.")
    if not cleaned:
        raise KubetuneError(f"registered model name {name!r} is empty after cleaning",
                            "use letters, digits, '-', '_' and '.', e.g. tcm-assistant-adapter")
    return cleaned


def _permanent(exc: Exception) -> bool:
    """A request the server rejected (bad value, changed param, missing run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


def _is_text(path: Path) -> bool:
    if path.suffix.lower() in _TEXT_SUFFIXES:
        return True
    if path.stat().st_size > _MAX_TEXT_BYTES:
        return False
    head = path.read_bytes()[:8192]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a character cut by the 8 KiB window
    return True


def _file_contains(path: Path, needles: list[bytes]) -> bool:
    if not needles:
        return False
    overlap = max(len(n) for n in needles)
    tail = b""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:]
    return False


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass
class Tracker:
    """One MLflow run; calls that fail are queued and replayed, never raised into the training step."""

    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str = ""
    pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retry_after: float = 0.0
    registered: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fail over fast: our own queue retries, MLflow's client must not block a step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.secrets = secret_values()
        self._staging: str | None = None
        # The system metrics thread logs through the same queue as the training loop.
        self._lock = threading.RLock()

    # -- run lifecycle -------------------------------------------------------------------------------------
    def open(self, *, run_name: str = "", kfp_run_id: str = "", tags: Mapping[str, str] | None = None) -> str:
        """Reuse ``run_id``, or the run tagged with this KFP run id, or create a run. Raises on no connection:
        callers decide (see :meth:`try_open`). A reused run that a failed attempt ended is marked running again."""
        if self.run_id:
            self._resume(self.client.get_run(self.run_id))
            return self.run_id
        experiment_id = self._experiment_id()
        if kfp_run_id:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                self._resume(found[0])
                return self.run_id
        all_tags = {KFP_RUN_ID_TAG: kfp_run_id, **(tags or {})}
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

    def _send(self, what: str, call: Callable[[], Any]) -> None:
        with self._lock:
            if not self.run_id or self.pending:
                self.pending.append((what, call))
                if self.run_id and time.time() >= self.retry_after:
                    self.flush(quiet=True)
                return
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                if _permanent(exc):
                    self._drop(what, exc)
                    return
                log.warning("MLflow %s failed (%s); queued for retry", what, type(exc).__name__)
                self.pending.append((what, call))
                self.retry_after = time.time() + RETRY_INTERVAL_S

    def _drop(self, what: str, exc: Exception) -> None:
        message = self._redact(f"MLflow rejected {what}: {str(exc)[:300]}")
        self.errors.append(message)
        log.warning("%s (not retried)", message)

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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(_clean_key(k), self._tag_value(v)) for k, v in tags.items() if v not in ("", None)]
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
        return _clean_key(self._redact(name))

    def _staging_dir(self) -> str:
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="kubetune-mlflow-")
        return self._staging

    def _redacted_copy(self, path: Path) -> Path:
        """``path`` itself when no file in it holds a secret, else a staged copy with those files redacted."""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        needles = [s.encode() for s in self.secrets]
        dirty = {f for f in files if _file_contains(f, needles) or (_is_text(f) and self._shaped_secret(f))}
        if not dirty:
            return path
        staged = Path(tempfile.mkdtemp(prefix="artifact-", dir=self._staging_dir())) / path.name
        for file in files:
            target = staged if path.is_file() else staged / file.relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if file not in dirty:
                shutil.copy2(file, target)
            elif _is_text(file):
                target.write_text(self._redact(file.read_text(encoding="utf-8", errors="surrogateescape")),
                                  encoding="utf-8", errors="surrogateescape")
            else:
                self.errors.append(f"left {file.name} out of the MLflow artifacts: it is binary and holds a secret")
                log.warning(self.errors[-1])
        return staged

    def _shaped_secret(self, path: Path) -> bool:
        if path.stat().st_size > _MAX_TEXT_BYTES:
            return False
        text = path.read_text(encoding="utf-8", errors="replace")
        return bool(TOKEN_SHAPES.search(text) or URL_PASSWORD.search(text))

    # -- system metrics --------------------------------------------------------------------------------------
    @contextmanager
    def system_metrics(self, sampling_interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[Any]:
        """Log CPU, memory, disk, network and (with nvidia-ml-py) GPU utilisation and memory as ``system/*``
        metrics of this run while the block runs, through the same outage-tolerant queue as everything else.
        Never raises: without psutil it logs nothing."""
        monitor = None
        try:
            monitor = _queued_system_monitor(self, sampling_interval_s)
            if not any(type(m).__name__ == "GPUMonitor" for m in monitor.monitors) and _has_cuda():
                log.warning("GPU system metrics off: install nvidia-ml-py to log GPU utilisation and memory")
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing: train without them
            log.warning("system metrics off: %s", self._redact(exc))
            monitor = None
        try:
            yield monitor
        finally:
            if monitor is not None:
                try:
                    monitor.finish()
                except Exception as exc:  # noqa: BLE001
                    log.warning("last system metrics not logged: %s", self._redact(exc))

    def _next_system_step(self) -> int:
        """A retried step continues the run's system metrics after the last step logged."""
        if not self.run_id:
            return 0
        try:
            metrics = self.client.get_run(self.run_id).data._metric_objs
        except Exception:  # noqa: BLE001
            return 0
        steps = [m.step for m in metrics if m.key.startswith(SYSTEM_METRICS_PREFIX)]
        return max(steps) + 1 if steps else 0

    # -- model registry ----------------------------------------------------------------------------------------
    def register_model(self, name: str, artifact_path: str, *, tags: Mapping[str, Any] | None = None,
                       description: str = "") -> None:
        """Register this run's ``artifact_path`` as a new version of registered model ``name`` (created when
        missing). A retried step reuses the version it registered before. The result lands in
        :attr:`registered` (``name``, ``version``) and in the run's tags once delivered."""
        name = registered_model_name(name)
        clean_tags = {_clean_key(k): self._tag_value(v) for k, v in (tags or {}).items() if v not in ("", None)}
        clean_description = self._redact(description)

        def register() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(
                    name, description=f"LoRA adapters trained by kubetune (experiment {self.experiment}).")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
            if existing:
                version = max(existing, key=lambda v: int(v.version))
            else:
                source = f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
                version = self.client.create_model_version(
                    name, source, self.run_id, tags=clean_tags, description=clean_description,
                    await_creation_for=0,
                )
            self.registered = {"name": name, "version": str(version.version)}
            self.client.set_tag(self.run_id, REGISTERED_MODEL_TAG, name)
            self.client.set_tag(self.run_id, REGISTERED_VERSION_TAG, str(version.version))

        self._send("register model", register)

    # -- delivery ------------------------------------------------------------------------------------------
    def flush(self, *, timeout_s: float = 0.0, quiet: bool = False, **open_kwargs) -> bool:
        """Replay queued calls, retrying until ``timeout_s``; True when nothing is left queued."""
        deadline = time.time() + timeout_s
        while True:
            with self._lock:
                what, exc = self._deliver(open_kwargs)
                if exc is None:
                    return True
                self.retry_after = time.time() + RETRY_INTERVAL_S
                if time.time() >= deadline:
                    if not quiet:
                        self.errors.append(self._redact(f"MLflow {what} failed: {exc!s:.200}"))
                    return False
            time.sleep(min(5.0, max(0.5, deadline - time.time())))  # without the lock: logging goes on meanwhile

    def _deliver(self, open_kwargs: Mapping[str, Any]) -> tuple[str, Exception | None]:
        """One pass over the queue, in order; rejected calls are dropped. Returns (last call, error or None)."""
        what = "open run"
        try:
            if not self.run_id:
                self.open(**open_kwargs)
            while self.pending:
                what, call = self.pending[0]
                try:
                    call()
                except Exception as exc:
                    if not _permanent(exc):
                        raise
                    self._drop(what, exc)
                self.pending.pop(0)
            return what, None
        except Exception as exc:  # noqa: BLE001
            return what, exc

    def finish(self, *, status: str = "", timeout_s: float = 60.0, **open_kwargs) -> str:
        """Deliver everything (waiting up to ``timeout_s`` for a server that is coming back) and optionally end
        the run. Returns "" on success, or a one-paragraph report of what could not be logged."""
        if status:
            self._send("end run", lambda: self.client.set_terminated(self.run_id, status))
        if self.flush(timeout_s=timeout_s, **open_kwargs):
            if self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            return ""
        lost = sorted({what for what, _ in self.pending})
        return self._redact(
            f"MLflow tracking incomplete: {len(self.pending)} call(s) not delivered ({', '.join(lost)}) to "
            f"{self.tracking_uri}. The step's outputs are complete in the pipeline's artifacts; "
            f"check the server and MLFLOW_TRACKING_* credentials. Last error: {self.errors[-1] if self.errors else '-'}"
        )


def _queued_system_monitor(tracker: Tracker, sampling_interval_s: float):
    """MLflow's ``SystemMetricsMonitor`` (its CPU, memory, disk, network and GPU probes, and their averaging over
    each interval), publishing through ``tracker``'s queue: an MLflow outage neither stops the sampling, as it
    stops MLflow's own loop, nor loses the samples; and the last, partial interval is logged too."""
    import threading

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class QueuedSystemMetrics(SystemMetricsMonitor):
        def start(self) -> None:
            self.step = tracker._next_system_step()
            self.stop_event = threading.Event()
            self.thread = threading.Thread(target=self.monitor, daemon=True, name="kubetune-system-metrics")
            self.thread.start()

        def monitor(self) -> None:
            while not self.stop_event.is_set():
                for _ in range(max(1, int(self.samples_before_logging))):
                    self.collect_metrics()
                    if self.stop_event.wait(float(self.sampling_interval)):
                        return
                self.publish_metrics(self.aggregate_metrics())

        def publish_metrics(self, metrics) -> None:
            if metrics:
                prefix = SYSTEM_METRICS_PREFIX + (f"{self.node_id}/" if self.node_id else "")
                tracker.log_metrics(metrics, step=self.step, prefix=prefix)
                self.step += 1
            for probe in self.monitors:
                probe.clear_metrics()

        def finish(self) -> None:
            self.stop_event.set()
            self.thread.join(timeout=30)
            self.collect_metrics()
            self.publish_metrics(self.aggregate_metrics())

    return QueuedSystemMetrics(tracker.run_id or None, sampling_interval=sampling_interval_s,
                               tracking_uri=tracker.tracking_uri)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# -- reading back ----------------------------------------------------------------------------------------------
def download_adapter(tracking_uri: str, name: str, version: str | int | None = None, alias: str | None = None,
                     dst_path: str | None = None) -> str:
    """Download a registered adapter version (by ``version``, by ``alias`` such as ``champion``, else the latest)
    and return its local directory, ready for ``PeftModel.from_pretrained(base_model, directory)``.

    The version's tags name the base model (``kubetune.base_model``, ``kubetune.base_model_revision``) and its
    quantization; load that base model (4-bit or not) before attaching the adapter.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if version not in (None, "") and alias:
        raise KubetuneError("download_adapter got both a version and an alias", "pass one of them")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias:
            model_version = client.get_model_version_by_alias(name, alias)
        elif version not in (None, ""):
            model_version = client.get_model_version(name, str(version))
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise KubetuneError(f"registered model {name!r} has no versions in {redact(tracking_uri)}",
                                    "run the pipeline (it registers the adapter) or check the model name")
            model_version = max(versions, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise KubetuneError(
            f"no adapter {name!r} {f'@{alias}' if alias else f'version {version}' if version else ''} in "
            f"{redact(tracking_uri)}: {str(exc)[:200]}",
            "list versions with MlflowClient().search_model_versions(\"name = '<name>'\") or check the alias",
        ) from exc
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_version.source, dst_path=dst_path,
                                                tracking_uri=tracking_uri)
    if not (Path(local) / "adapter_config.json").is_file():
        raise KubetuneError(f"{name} version {model_version.version} at {model_version.source} is not a PEFT "
                            "adapter (no adapter_config.json)", "register the adapter directory the SFT step wrote")
    return local
