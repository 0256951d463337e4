"""What the tracked steps record in MLflow beyond their metrics: the adapter's lineage tags, prep's statistics,
the per-step training series, the plots, the run a checkpoint folder belongs to, the base model a logged model
refers to, and the note a step's ``mlflow_store`` output holds when a server had the records."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetune import __version__
from kubetune.config import LoraSettings
from kubetune.plots import plot_base_vs_tuned, plot_loss_curves
from kubetune.secrets import without_credentials
from kubetune.sft import last_complete_checkpoint
from kubetune.storage import atomic_file
from kubetune.tracking import (
    DATASET_HASH_TAG,
    KFP_RUN_ID_TAG,
    KFP_RUN_NAME_TAG,
    PIPELINE_VERSION_TAG,
    Tracker,
    Tracking,
    write_note,
)

log = logging.getLogger("kubetune")


def adapter_tags(model_metadata: dict[str, Any], data_metadata: dict[str, Any], dataset_sha256: str,
                 lora: LoraSettings, tracking: Tracking) -> dict[str, Any]:
    """What a registered adapter needs to be found and loaded again: its base model, quantization, data."""
    return {
        "kubetune.base_model": model_metadata.get("source", ""),
        "kubetune.base_model_revision": model_metadata.get("resolved_commit") or model_metadata.get("revision", ""),
        "kubetune.base_model_is_local": model_metadata.get("source_is_local", ""),
        "kubetune.base_model_sha256": model_metadata.get("source_sha256", ""),
        "kubetune.quantization": model_metadata.get("quant_quantization", ""),
        "kubetune.double_quant": model_metadata.get("quant_double_quant", ""),
        "kubetune.compute_dtype": model_metadata.get("compute_dtype_resolved", ""),
        "kubetune.dataset": data_metadata.get("dataset", ""),
        DATASET_HASH_TAG: dataset_sha256,
        "kubetune.lora_r": lora.lora_r,
        "kubetune.lora_alpha": lora.lora_alpha,
        "kubetune.target_modules": lora.target_modules,
        KFP_RUN_ID_TAG: tracking.kfp_run_id,
        KFP_RUN_NAME_TAG: tracking.kfp_run_name,
        PIPELINE_VERSION_TAG: __version__,
    }


CHECKPOINT_RUN_FILE = "kubetune_mlflow_run.json"


def checkpoint_run(checkpoint_dir: str, tracking_uri: str) -> str:
    """The MLflow run an earlier attempt logged these checkpoints to (in the same store), or ""."""
    try:
        recorded = json.loads((Path(checkpoint_dir) / CHECKPOINT_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if recorded.get("tracking_uri") != without_credentials(tracking_uri) or not last_complete_checkpoint(
            checkpoint_dir):
        return ""
    return str(recorded.get("run_id", ""))


def record_checkpoint_run(checkpoint_dir: str, tracker: Tracker) -> None:
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(checkpoint_dir) / CHECKPOINT_RUN_FILE) as staging:
        Path(staging).write_text(json.dumps({"run_id": tracker.run_id,
                                             "tracking_uri": without_credentials(tracker.tracking_uri)}),
                                 encoding="utf-8")


def data_stats(data_metadata: dict[str, Any]) -> dict[str, Any]:
    """Prep's statistics, which travel in the dataset's metadata as ``stat_*``."""
    return {k.removeprefix("stat_"): v for k, v in data_metadata.items() if k.startswith("stat_")}


def is_timing(name: str) -> bool:
    """Prep's speed (seconds, rows per second) varies between identical runs: a measurement, not a setting."""
    return name.endswith(("_seconds", "_per_s"))


def step_sink(tracker: Tracker):
    """Per-step training metrics as ``train.*`` series, one point per logging step. The trainer's closing summary
    (train_loss, train_runtime, ...) is skipped: its totals are logged once as ``sft.*``."""

    def sink(metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics and "loss" not in metrics:
            return
        tracker.log_metrics(metrics, step, prefix="train.")

    return sink




def base_reference(model_metadata: dict[str, Any]) -> tuple[str, str]:
    """(the base model as the user named it, a local directory holding it or "") for the logged MLflow model:
    a directory the user gave (a volume path), else the hub id and its copy in the local hub cache, if any."""
    source = str(model_metadata.get("source", ""))
    if source and (Path(source) / "config.json").is_file():
        return source, str(Path(source).resolve())
    try:
        from huggingface_hub import snapshot_download

        revision = model_metadata.get("resolved_commit") or model_metadata.get("revision") or None
        return source, snapshot_download(source, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached here: MLflow records the hub reference instead
        return source, ""


def note_store(tracking: Tracking, tracker: Tracker) -> None:
    """A step that logged to a server says so in its ``mlflow_store`` output (which holds the store otherwise)."""
    if tracking.store_dir and not tracking.uses_output_store(tracker.tracking_uri):
        write_note(tracking.store_dir, tracker.tracking_uri, tracker.run_id)


def log_plots(tracker: Tracker, eval_metrics: dict[str, Any]) -> None:
    """The run's loss curve (from its train.loss history) and base vs tuned eval metrics, as PNG images."""
    tracker.flush(quiet=True)  # the loss history is read from the server
    history = tracker.metric_history("train.loss")
    try:
        loss_curve = plot_loss_curves({"train.loss": history}, title="Training loss") if history else None
        base_vs_tuned = plot_base_vs_tuned(eval_metrics)
    except ImportError as exc:  # matplotlib missing: the numbers are logged, the pictures are not
        log.warning("plots not logged: %s", exc)
        return
    if loss_curve is not None:
        tracker.log_figure(loss_curve, "plots/loss_curve.png")
    if base_vs_tuned is not None:
        tracker.log_figure(base_vs_tuned, "plots/eval_base_vs_tuned.png")
