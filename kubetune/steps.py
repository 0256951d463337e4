"""The four pipeline steps as plain functions over paths and settings.

KFP components, the ``kubetune`` step commands (for plain Argo) and tests all call these, so there is one
implementation of each step, and one definition of the metadata each writes beside its outputs. Cacheable steps
(prepare, quantize) put what they learn in their outputs' metadata; the tracked steps (train, evaluate) copy it
into the pipeline run's one MLflow run.

SFT takes a :class:`TrainJob`; on several GPUs it serialises itself for the torchrun ranks, each of which runs
``python -m kubetune.steps WORK_DIR`` (see :mod:`kubetune.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import distributed, records, versions
from kubetune.config import DataConfig, EvalConfig, LoraSettings, QuantConfig, TrainConfig, from_dict, to_dict
from kubetune.data import prepare_dataset
from kubetune.errors import KubetuneError
from kubetune.evaluate import evaluate_adapter, generation_settings
from kubetune.modeling import load_tokenizer, quantize_model, read_model_metadata
from kubetune.prompts import build_prompt
from kubetune.secrets import without_credentials
from kubetune.sft import train_lora
from kubetune.storage import atomic_file, check_outputs, file_sha256
from kubetune.tracking import Tracking
from kubetune.tracking.finish import NO_STEP, RUNNING_STEP_TAG, Closing, close_pipeline_run
from kubetune.training_page import render_training_page

log = logging.getLogger("kubetune")


def parse_columns(columns: str) -> dict[str, str]:
    """``"instruction=question,output=answer"`` → DataConfig column fields."""
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


def prepared_max_length(data_metadata: dict[str, Any], override: int = 0) -> int:
    """The sample length training uses: the one prep cut the data to (its metadata), unless overridden."""
    return override or int(float(data_metadata.get("max_length", DataConfig().max_length)))


def adapter_metadata(result: dict[str, Any], model_metadata: dict[str, Any], experiment: str) -> dict[str, Any]:
    """What the adapter output carries for evaluation and the UI: its MLflow run and store, its base model."""
    return {**{k: result[k] for k in ("mlflow_run_id", "mlflow_run_url", "tracking_uri")},
            "base_model": model_metadata.get("source", ""), "mlflow_experiment": experiment}


def write_training_page(result: dict[str, Any], path: str) -> None:
    """The SFT step's page for the Kubeflow run view (curves, totals, speed plan, MLflow link)."""
    page = render_training_page(result.get("history", []), metrics=numbers(result), plan=result.get("plan", []),
                                mlflow_run_url=result.get("mlflow_run_url", ""))
    with atomic_file(path) as staging:
        Path(staging).write_text(page, encoding="utf-8")


def report_metadata(result: dict[str, Any]) -> dict[str, Any]:
    """What the report output carries: the MLflow run it was logged to."""
    return {k: result[k] for k in ("mlflow_run_id", "mlflow_run_url")}


def resolve(dataset: str, base_model: str, model_revision: str = "") -> dict[str, str]:
    """The current versions of the dataset and the base model (the cached steps' cache keys), and the hub commit
    the model revision points to now (what the later steps read). See :mod:`kubetune.versions`."""
    data, model = versions.dataset_version(dataset), versions.model_version(base_model, model_revision)
    for name, value, version in (("dataset", dataset, data), ("base_model", base_model, model)):
        if version.resolved:
            log.info("%s %s: version %s (%s)", name, value, version.version[:80], version.how)
        else:
            log.warning("%s %s: %s", name, value, version.how)
    return {"dataset_version": data.version, "model_version": model.version,
            "pinned_revision": model.revision or model_revision}


def finish(tracking: Tracking, pipeline_state: str, *, failed_step: str = "", error: str = "") -> Closing:
    """The final-status step: close the pipeline run's MLflow run with the pipeline's final state."""
    closing = close_pipeline_run(tracking, pipeline_state, failed_step=failed_step, error=error)
    log.info("pipeline %s: %s", pipeline_state or "state unknown", closing.message)
    return closing


def prepare(config: DataConfig, base_model: str, train_path: str, eval_path: str, *, revision: str = "",
            trust_remote_code: bool = False) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Dataset prep. Returns (stats, Markdown summary, metadata for the dataset artifacts)."""
    config.validate()
    check_outputs({"dataset": config.dataset, "base_model": base_model},
                  {"train_data": train_path, "eval_data": eval_path})
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
             trust_remote_code: bool = False, cache_root: str = "") -> dict[str, Any]:
    """4-bit model load and save. Returns the model artifact's metadata. A ``cache_root`` (a volume) holds the hub
    download, which can be larger than a pod's ephemeral storage."""
    check_outputs({"base_model": base_model}, {"model": output_dir})
    if cache_root:
        os.environ["HF_HOME"] = f"{cache_root.rstrip('/')}/huggingface"
    return quantize_model(base_model, output_dir, quant, revision=revision or None, trust_remote_code=trust_remote_code)


@dataclass
class TrainJob:
    """Everything the SFT step needs: the inputs, the settings and where to track. Serialises itself, so the
    torchrun ranks of a multi-GPU run rebuild exactly the same job."""

    model_dir: str
    train_path: str
    adapter_dir: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_length: int = DataConfig().max_length
    checkpoint_dir: str = ""
    tracking: Tracking = field(default_factory=Tracking)
    model_metadata: dict[str, Any] = field(default_factory=dict)
    data_metadata: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1
    """Data-parallel processes, one per GPU (0 = every visible GPU); ignored under torchrun."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        values = json.loads(text)
        nested = {"lora": LoraSettings, "train": TrainConfig, "tracking": Tracking}
        return cls(**{**values, **{name: from_dict(kind, values[name]) for name, kind in nested.items()}})


def train(job: TrainJob) -> dict[str, Any]:
    """LoRA SFT on ``job.nproc`` GPUs: in this process for one, else through torchrun (only rank 0's result is
    returned); already under torchrun, as this process's rank."""
    if distributed.under_torchrun():
        result = train_here(job)
        distributed.destroy_process_group()
        return result
    nproc = distributed.resolve_nproc(job.nproc)
    if distributed.runs_in_process(nproc):
        return train_here(job)
    # Every rank builds an MLflow client; a local sqlite store would be created (schema migrations) by all of them
    # at once and fail. Create it here, once, before the ranks start.
    job.tracking.tracker()
    return distributed.launch(job.to_json(), nproc, __name__)


def main(argv: list[str] | None = None) -> int:
    """A torchrun rank of :func:`train`: ``python -m kubetune.steps WORK_DIR``."""
    return distributed.worker_main(sys.argv[1:] if argv is None else argv,
                                   lambda text: train_here(TrainJob.from_json(text)), __name__)


def train_here(job: TrainJob) -> dict[str, Any]:
    """LoRA SFT in this process, logged to MLflow: params, tags naming the base model and data, per-step
    metrics, system metrics (CPU, memory, GPU with nvidia-ml-py) during training, and the adapter files.

    Returns metrics plus ``mlflow_run_id``/``mlflow_run_url``/``tracking_uri``/``tracking_report``. Evaluation
    logs the adapter as an MLflow model and registers it.
    """
    import torch

    lora, train_config, tracking, max_length = job.lora, job.train, job.tracking, job.max_length
    check_outputs({"model": job.model_dir, "train_data": job.train_path},
                  {"adapter": job.adapter_dir, "checkpoint_dir": job.checkpoint_dir})
    is_rank_zero = distributed.is_rank_zero()
    # Only rank 0 talks to MLflow: several ranks opening one sqlite store at once race on its schema.
    tracker = tracking.tracker() if is_rank_zero else None
    model_metadata, data_metadata = job.model_metadata, job.data_metadata
    dataset_sha256 = file_sha256(job.train_path) if is_rank_zero else ""
    stats = records.data_stats(data_metadata)
    if is_rank_zero:
        # A run resumed from checkpoints continues the MLflow run those checkpoints were logged to.
        tracker.run_id = tracker.run_id or records.checkpoint_run(job.checkpoint_dir, tracker.tracking_uri)
        if tracker.try_open(**tracking.open_kwargs()):
            records.record_checkpoint_run(job.checkpoint_dir, tracker)
        tracker.log_params(
            {
                "data": {
                    **{k: v for k, v in data_metadata.items() if not k.startswith("stat_")},
                    "train_sha256": dataset_sha256,
                },
                "model": {k: v for k, v in model_metadata.items() if k not in {"load_seconds", "output_sha256"}},
                "lora": to_dict(lora),
                "train": {**to_dict(train_config), "max_length": max_length},
                # Counts and lengths as parameters, not one-point metrics: the metrics page starts with the curves.
                "data_stats": {k: v for k, v in stats.items() if not records.is_timing(k)},
            }
        )
        tracker.log_metrics({k: v for k, v in stats.items() if records.is_timing(k)}, prefix="data.")
        tracker.log_dataset(data_metadata.get("dataset", ""), digest=dataset_sha256, context="train",
                            rows=int(data_metadata.get("stat_train_rows", 0)))
        tracker.set_tags({**records.adapter_tags(model_metadata, data_metadata, dataset_sha256, lora, tracking),
                          "kubetune.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                          RUNNING_STEP_TAG: "train_lora"})
    try:
        with tracker.system_metrics() if is_rank_zero else nullcontext():
            result = train_lora(
                job.model_dir,
                job.train_path,
                job.adapter_dir,
                lora=lora,
                train=train_config,
                max_length=max_length,
                checkpoint_dir=job.checkpoint_dir,
                metrics_sink=records.step_sink(tracker) if is_rank_zero else None,
            )
    except BaseException:
        if is_rank_zero:  # a retry reopens the run (found by the KFP run id) and marks it running again
            tracker.finish(status="FAILED", timeout_s=30, **tracking.open_kwargs())
        raise
    if not is_rank_zero:
        return {**result.metrics, **dict.fromkeys(
            ("mlflow_run_id", "mlflow_run_url", "tracking_uri", "tracking_report"), "")}
    tracker.log_params({"speed": {k: v for k, v in to_dict(result.plan).items()}})
    tracker.log_metrics(result.metrics, prefix="sft.")
    tracker.log_artifact(job.adapter_dir, "adapter")
    tracker.set_tags({RUNNING_STEP_TAG: NO_STEP})
    report = tracker.finish(timeout_s=120, **tracking.open_kwargs())
    records.note_store(tracking, tracker)
    if report:
        log.error(report)
    return {
        **result.metrics,
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.run_url,
        # Travels in artifact metadata (Kubeflow UI, logs): never with credentials embedded in the URI, and not
        # the path of a store in this pod's output, which evaluation receives as an artifact instead.
        "tracking_uri": "" if tracking.uses_output_store(tracker.tracking_uri) else
        without_credentials(tracker.tracking_uri),
        "tracking_report": report,
        "history": result.history,  # per-step log rows: the training page draws them
        "plan": result.plan.reasons,
    }


def evaluate(model_dir: str, adapter_dir: str, eval_path: str, report_path: str, config: EvalConfig, *,
             tracking: Tracking, data_metadata: dict[str, Any] | None = None, train_path: str = "",
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Base vs tuned evaluation with the HTML report, logged to the same MLflow run as training: eval metrics,
    the answers table, the report, plots (loss curve, base vs tuned metrics) under ``plots/``, and the adapter as
    an MLflow model with the eval metrics, registered as a new version of ``<experiment>-adapter``. Probe
    questions are asked in the prompt style and persona prep recorded in ``data_metadata``."""

    check_outputs({"model": model_dir, "adapter": adapter_dir, "eval_data": eval_path}, {"report": report_path})
    data_metadata = data_metadata or {}
    prompt_style, persona = data_metadata.get("prompt_style", "expert"), data_metadata.get("persona", "")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    probes = [
        (question, build_prompt(question, "", prompt_style=prompt_style, persona=persona, tokenizer=tokenizer))
        for question in config.probe_questions
        if question.strip()
    ]
    tracker = tracking.tracker()
    if tracker.try_open(attempts=1, **tracking.open_kwargs()):  # names this step if its pod is killed
        tracker.set_tags({RUNNING_STEP_TAG: "evaluate_model"})
    try:
        result = evaluate_adapter(
            model_dir, adapter_dir, eval_path, report_path, config, probe_prompts=probes, train_path=train_path,
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
    tracker.log_dataset(data_metadata.get("dataset", ""), digest=file_sha256(eval_path), context="eval",
                        rows=int(result.metrics.get("eval_rows", 0)))
    tracker.log_table(result.rows, "eval/answers.json")
    tracker.log_artifact(report_path, "eval", name="report.html")  # KFP names the file "report"; MLflow shows .html
    records.log_plots(tracker, result.metrics)
    tracker.set_tags({RUNNING_STEP_TAG: NO_STEP})
    if tracking.model_name():
        base_model, base_path = records.base_reference(read_model_metadata(model_dir))
        tracker.log_adapter_model(
            result.model, result.tokenizer, base_model=base_model, base_path=base_path, metrics=result.metrics,
            name=tracking.model_name(), generation=generation_settings(config, reasoning=bool(result.metrics["reasoning"])),
        )
    report = tracker.finish(status="FINISHED", timeout_s=300, **tracking.open_kwargs())
    records.note_store(tracking, tracker)
    if report:
        log.error(report)
    return {
        **result.metrics,
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.run_url,
        "tracking_report": report,
        "registered_model": tracker.registered.get("name", ""),
        "registered_model_version": tracker.registered.get("version", ""),
    }




if __name__ == "__main__":
    sys.exit(main())
