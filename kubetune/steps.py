"""The four pipeline steps as plain functions over paths and settings.

KFP components, the ``kubetune`` step commands (for plain Argo) and tests all call these, so there is one
implementation of each step. Cacheable steps (prepare, quantize) put what they learn in their outputs'
metadata; the tracked steps (train, evaluate) copy it into the pipeline run's one MLflow run.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from kubetune import __version__
from kubetune.config import DataConfig, EvalConfig, LoraSettings, QuantConfig, TrainConfig, to_dict
from kubetune.tracking import (
    DATASET_HASH_TAG,
    KFP_RUN_ID_TAG,
    KFP_RUN_NAME_TAG,
    NO_REGISTRATION,
    PIPELINE_VERSION_TAG,
    Tracker,
    default_model_name,
    file_sha256,
    resolve_tracking_uri,
    without_credentials,
)

log = logging.getLogger("kubetune")


def parse_columns(columns: str) -> dict[str, str]:
    """``"instruction=question,output=answer"`` → DataConfig column fields."""
    from kubetune.errors import KubetuneError

    mapping: dict[str, str] = {}
    valid = ("instruction", "input", "output", "messages", "prompt", "completion")
    for item in filter(None, (part.strip() for part in columns.split(","))):
        role, sep, column = item.partition("=")
        if not sep or role.strip() not in valid or not column.strip():
            raise KubetuneError(
                f"columns entry {item!r} is not ROLE=COLUMN with ROLE one of {', '.join(valid)}",
                "write e.g. columns=instruction=question,output=answer",
            )
        mapping[f"{role.strip()}_column"] = column.strip()
    return mapping


def numbers(values: dict[str, Any]) -> dict[str, float | int]:
    """The numeric entries of a step's result: what becomes KFP Metrics and metrics JSON (booleans excluded)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def checkpoint_location(checkpoint_dir: str, checkpoint_root: str, kfp_run_id: str, adapter_path: str) -> str:
    """Where the SFT step checkpoints: the explicit directory, else ``<checkpoint_root>/<run id>`` (a volume that
    outlives the pod), else beside the adapter output."""
    if checkpoint_dir:
        return checkpoint_dir
    if checkpoint_root and kfp_run_id:
        return f"{checkpoint_root.rstrip('/')}/{kfp_run_id}"
    return adapter_path.rstrip("/") + ".checkpoints"


def prepare(config: DataConfig, base_model: str, train_path: str, eval_path: str, *, revision: str = "",
            trust_remote_code: bool = False) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Dataset prep. Returns (stats, Markdown summary, metadata for the dataset artifacts)."""
    from kubetune.data import prepare_dataset
    from kubetune.modeling import load_tokenizer

    config.validate()
    tokenizer = load_tokenizer(base_model, revision=revision or None, trust_remote_code=trust_remote_code)
    result = prepare_dataset(config, tokenizer, train_path, eval_path)
    metadata = {
        "dataset": config.dataset,
        "prompt_style": config.prompt_style,
        "persona": config.persona,
        "max_length": config.max_length,
        "tokenizer": base_model,
        **{f"stat_{k}": v for k, v in result.stats.items()},
    }
    return result.stats, result.summary_markdown, metadata


def quantize(base_model: str, output_dir: str, quant: QuantConfig, *, revision: str = "",
             trust_remote_code: bool = False) -> dict[str, Any]:
    """4-bit model load and save. Returns the model artifact's metadata."""
    from kubetune.modeling import quantize_model

    return quantize_model(base_model, output_dir, quant, revision=revision or None, trust_remote_code=trust_remote_code)


@dataclass
class Tracking:
    """Where and under which names a step logs to MLflow."""

    tracking_uri: str = ""
    experiment: str = "kubetune"
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
        return Tracker(resolve_tracking_uri(self.tracking_uri), self.experiment or "kubetune", run_id=self.run_id)

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


def _adapter_tags(model_metadata: dict[str, Any], data_metadata: dict[str, Any], dataset_sha256: str,
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


def train(model_dir: str, train_path: str, adapter_dir: str, *, lora: LoraSettings, train_config: TrainConfig,
          max_length: int, checkpoint_dir: str, tracking: Tracking, model_metadata: dict[str, Any] | None = None,
          data_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """LoRA SFT, logged to MLflow: params, per-step metrics, system metrics (CPU, memory, GPU with nvidia-ml-py)
    during training, the adapter, and the adapter registered as a new model version.

    Returns metrics plus ``mlflow_run_id``/``mlflow_run_url``/``tracking_uri``/``tracking_report`` and
    ``registered_model``/``registered_model_version`` ("" when not registered).
    """
    import os

    import torch

    from kubetune.sft import train_lora

    is_rank_zero = int(os.environ.get("RANK", "0")) == 0
    # Only rank 0 talks to MLflow: several ranks opening one sqlite store at once race on its schema.
    tracker = tracking.tracker() if is_rank_zero else None
    model_metadata = model_metadata or {}
    data_metadata = data_metadata or {}
    dataset_sha256 = file_sha256(train_path) if is_rank_zero else ""
    if is_rank_zero:
        tracker.try_open(**tracking.open_kwargs())
        tracker.log_params(
            {
                "data": {
                    **{k: v for k, v in data_metadata.items() if not k.startswith("stat_")},
                    "train_sha256": dataset_sha256,
                },
                "model": {k: v for k, v in model_metadata.items() if k not in {"load_seconds", "output_sha256"}},
                "lora": to_dict(lora),
                "train": {**to_dict(train_config), "max_length": max_length},
            }
        )
        tracker.log_metrics({k[5:]: v for k, v in data_metadata.items() if k.startswith("stat_")}, prefix="data.")
        tracker.set_tags(
            {
                "kubetune.base_model": model_metadata.get("source", ""),
                "kubetune.base_model_revision": model_metadata.get("revision", ""),
                "kubetune.quantization": model_metadata.get("quant_quantization", ""),
                "kubetune.dataset": data_metadata.get("dataset", ""),
                DATASET_HASH_TAG: dataset_sha256,
                "kubetune.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            }
        )
    try:
        with tracker.system_metrics() if is_rank_zero else nullcontext():
            result = train_lora(
                model_dir,
                train_path,
                adapter_dir,
                lora=lora,
                train=train_config,
                max_length=max_length,
                checkpoint_dir=checkpoint_dir,
                metrics_sink=_step_sink(tracker) if is_rank_zero else None,
            )
    except BaseException:
        if is_rank_zero:  # a retry reopens the run (found by the KFP run id) and marks it running again
            tracker.finish(status="FAILED", timeout_s=30, **tracking.open_kwargs())
        raise
    if not is_rank_zero:
        return {**result.metrics, **dict.fromkeys(
            ("mlflow_run_id", "mlflow_run_url", "tracking_uri", "tracking_report", "registered_model",
             "registered_model_version"), "")}
    tracker.log_params({"speed": {k: v for k, v in to_dict(result.plan).items()}})
    tracker.log_metrics(result.metrics, prefix="sft.")
    tracker.log_artifact(adapter_dir, "adapter")
    model_name = tracking.model_name()
    if model_name:
        tracker.register_model(
            model_name, "adapter", tags=_adapter_tags(model_metadata, data_metadata, dataset_sha256, lora, tracking),
            description=_LOAD_HINT.format(uri=tracker.tracking_uri, name=model_name,
                                          base=model_metadata.get("source", "<base model>")),
        )
    report = tracker.finish(timeout_s=120, **tracking.open_kwargs())
    if report:
        log.error(report)
    return {
        **result.metrics,
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.run_url,
        # Travels in artifact metadata (Kubeflow UI, logs): never with credentials embedded in the URI.
        "tracking_uri": without_credentials(tracker.tracking_uri),
        "tracking_report": report,
        "registered_model": tracker.registered.get("name", ""),
        "registered_model_version": tracker.registered.get("version", ""),
    }


def _step_sink(tracker: Tracker):
    """Per-step training metrics as ``train.*`` series, one point per logging step. The trainer's closing summary
    (train_loss, train_runtime, ...) is skipped: its totals are logged once as ``sft.*``."""

    def sink(metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics and "loss" not in metrics:
            return
        tracker.log_metrics(metrics, step, prefix="train.")

    return sink


_LOAD_HINT = (
    "LoRA adapter trained by kubetune on {base}. Load it with:\n"
    "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
    "kubetune.tracking.download_adapter('{uri}', '{name}', version=VERSION))"
)


def evaluate(model_dir: str, adapter_dir: str, eval_path: str, report_path: str, config: EvalConfig, *,
             tracking: Tracking, prompt_style: str = "expert", persona: str = "",
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Base vs tuned evaluation with the HTML report, logged to the same MLflow run as training: eval metrics,
    the answers table, the report, and plots (loss curve, base vs tuned metrics) under ``plots/``."""
    from kubetune.data import build_prompt
    from kubetune.evaluate import evaluate_adapter
    from kubetune.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    probes = [
        (question, build_prompt(question, "", prompt_style=prompt_style, persona=persona, tokenizer=tokenizer))
        for question in config.probe_questions
        if question.strip()
    ]
    tracker = tracking.tracker()
    try:
        result = evaluate_adapter(
            model_dir, adapter_dir, eval_path, report_path, config, probe_prompts=probes,
            trust_remote_code=trust_remote_code,
        )
    except BaseException:  # the run ends FAILED rather than staying "running" for ever
        if tracker.try_open(attempts=1, **tracking.open_kwargs()):
            tracker.finish(status="FAILED", timeout_s=30, **tracking.open_kwargs())
        raise
    tracker.try_open(**tracking.open_kwargs())
    tracker.log_params({"eval": {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
                                 for k, v in to_dict(config).items()}})
    tracker.log_metrics(result.metrics, prefix="eval.")
    tracker.log_table(result.rows, "eval/answers.json")
    tracker.log_artifact(report_path, "eval", name="report.html")  # KFP names the file "report"; MLflow shows .html
    _log_plots(tracker, result.metrics)
    report = tracker.finish(status="FINISHED", timeout_s=120, **tracking.open_kwargs())
    if report:
        log.error(report)
    return {
        **result.metrics,
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.run_url,
        "tracking_report": report,
    }


def _log_plots(tracker: Tracker, eval_metrics: dict[str, Any]) -> None:
    """The run's loss curve (from its train.loss history) and base vs tuned eval metrics, as PNG images."""
    try:
        from kubetune.compare import plot_base_vs_tuned, plot_loss_curves
    except ImportError as exc:  # matplotlib missing: the numbers are logged, the pictures are not
        log.warning("plots not logged: %s", exc)
        return
    tracker.flush(quiet=True)  # the loss history is read from the server
    history = tracker.metric_history("train.loss")
    if history:
        tracker.log_figure(plot_loss_curves({"train.loss": history}, title="Training loss"), "plots/loss_curve.png")
    figure = plot_base_vs_tuned(eval_metrics)
    if figure is not None:
        tracker.log_figure(figure, "plots/eval_base_vs_tuned.png")
