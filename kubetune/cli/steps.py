"""The pipeline steps as commands: ``kubetune resolve | prep | quantize | train | evaluate | finish``.

They run inside the kubetune images, as the containers of the plain Argo Workflow (``kubetune argo``), and call
the same :mod:`kubetune.steps` functions as the KFP components. Flags carry the names of the component inputs
(the pipeline parameters, e.g. ``--base_model``; ``--base-model`` works too) and of the artifacts, which here
are paths: ``--train_data``, ``--model``, ``--adapter``, ``--report`` ... What KFP keeps as an artifact's
metadata is written beside each output as ``<output>.metadata.json``, and the next step reads it from there.

Also runnable as ``python -m kubetune.cli prep ...`` (the Argo containers' command, and the torchrun entry
``torchrun ... -m kubetune.cli train ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kubetune import distributed, steps
from kubetune.cli.params import add_config_flags, add_flag, add_setting_flags, whole
from kubetune.config import DataConfig, EvalConfig, LoraSettings, QuantConfig, TrainConfig, from_dict
from kubetune.errors import collect
from kubetune.storage import atomic_file
from kubetune.tracking import Tracking

METADATA_SUFFIX = ".metadata.json"
MLFLOW_STORE_SUFFIX = ".mlflow"
# DataConfig's *_column fields are set through --columns, as in the pipeline.
_COLUMN_FIELDS = {f.name for f in dataclasses.fields(DataConfig) if f.name.endswith("_column")}


# -- files beside outputs --------------------------------------------------------------------------------------
def metadata_path(output: str | Path) -> Path:
    """Where an output's metadata lives: ``<output>.metadata.json`` (a file beside a file or a directory)."""
    return Path(str(output).rstrip("/") + METADATA_SUFFIX)


def beside(output: str | Path, suffix: str) -> str:
    return str(output).rstrip("/") + suffix


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written beside ``path`` by the step that produced it; empty when there is none."""
    file = metadata_path(path)
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def write_json(path: str | Path, values: dict[str, Any]) -> None:
    with atomic_file(path) as staging:
        Path(staging).write_text(json.dumps(values, ensure_ascii=False, indent=2, default=str), encoding="utf-8")


def _require_inputs(producer: dict[str, str], args: argparse.Namespace) -> None:
    """Every input path exists, checked before the heavy imports; one error lists all that are missing."""
    collect([
        (f"--{name} {getattr(args, name)} does not exist",
         f"run `kubetune {step}` first (it writes --{name}), or pass the path where that step wrote it")
        for name, step in producer.items() if not Path(getattr(args, name)).exists()
    ])


# -- flags ---------------------------------------------------------------------------------------------------
def _path(parser: argparse.ArgumentParser, name: str, help_text: str, *, required: bool = True) -> None:
    parser.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name,
                        required=required, default="", metavar="PATH", help=help_text)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as staging:
        Path(staging).write_text(text, encoding="utf-8")


# -- steps -----------------------------------------------------------------------------------------------------
def run_resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Source versions: the dataset's and the base model's current versions (the cache keys of prep and
    quantize) and the hub commit the model revision points to, each written to the file its flag names."""
    versions = steps.resolve(args.dataset, args.base_model, args.model_revision)
    for name, value in versions.items():
        if getattr(args, name):
            write_text(getattr(args, name), value)
    return versions


def run_finish(args: argparse.Namespace) -> dict[str, Any]:
    """Final status: close the pipeline run's MLflow run with the workflow's final state (Argo's onExit)."""
    closing = steps.finish(
        Tracking(args.mlflow_tracking_uri, args.mlflow_experiment, "", args.kfp_run_id, args.kfp_run_name),
        args.status, error=args.error)
    if args.result:
        write_text(args.result, closing.page(args.status, args.error))
    return {"mlflow_run_id": closing.run_id, "status": closing.status, "failed_step": closing.failed_step,
            "message": closing.message}


def run_prep(args: argparse.Namespace) -> dict[str, Any]:
    """Dataset prep: writes the train/eval datasets, their metadata, the statistics and the Markdown summary."""
    values = {k: v for k, v in vars(args).items() if k not in _COLUMN_FIELDS}
    if not values["persona"]:
        values.pop("persona")  # empty = the built-in expert persona, as in the component
    config = from_dict(DataConfig, {**values, **steps.parse_columns(args.columns)})
    stats, markdown, metadata = steps.prepare(config, args.base_model, args.train_data, args.eval_data,
                                              revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    metadata.update(dataset_version=args.dataset_version, model_version=args.model_version)
    for output in (args.train_data, args.eval_data):
        write_json(metadata_path(output), metadata)
    stats_path = args.stats or beside(args.train_data, ".stats.json")
    summary_path = args.summary or beside(args.train_data, ".summary.md")
    write_json(stats_path, steps.numbers(stats))
    write_text(summary_path, markdown)
    return {"train_data": args.train_data, "eval_data": args.eval_data, "stats": stats_path,
            "summary": summary_path, **steps.numbers(stats)}


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """4-bit model load: writes the quantized model directory and ``<model>.metadata.json``."""
    metadata = steps.quantize(args.base_model, args.model, from_dict(QuantConfig, vars(args)),
                              revision=args.model_revision, trust_remote_code=args.trust_remote_code,
                              cache_root=args.cache_root)
    metadata["model_version"] = args.model_version
    write_json(metadata_path(args.model), metadata)
    return {"model": args.model, **steps.numbers(metadata)}


def run_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """LoRA SFT: writes the adapter, ``<adapter>.metadata.json`` (the MLflow run) and the metrics JSON.

    Trains on ``--num_gpus`` GPUs (default: all visible) through torchrun; already under torchrun (e.g. in a
    TrainJob) it runs as its rank, and only rank 0 writes and prints.
    """
    _require_inputs({"model": "quantize", "train_data": "prep"}, args)
    model_metadata, data_metadata = read_metadata(args.model), read_metadata(args.train_data)
    metrics_path = args.metrics or beside(args.adapter, ".metrics.json")
    result = steps.train(steps.TrainJob(
        args.model, args.train_data, args.adapter,
        lora=from_dict(LoraSettings, vars(args)),
        train=from_dict(TrainConfig, vars(args)),
        max_length=steps.prepared_max_length(data_metadata, args.max_length),
        checkpoint_dir=steps.checkpoint_location(args.checkpoint_dir, args.checkpoint_root, args.kfp_run_id,
                                                 args.adapter),
        tracking=Tracking(args.mlflow_tracking_uri, args.mlflow_experiment, "", args.kfp_run_id, args.kfp_run_name,
                          required=args.mlflow_required,
                          store_dir=args.mlflow_store or beside(args.adapter, MLFLOW_STORE_SUFFIX)),
        model_metadata=model_metadata,
        data_metadata=data_metadata,
        nproc=args.num_gpus,
    ))
    if not distributed.is_rank_zero():
        return None
    write_json(metrics_path, steps.numbers(result))
    write_json(metadata_path(args.adapter), steps.adapter_metadata(result, model_metadata, args.mlflow_experiment))
    steps.write_training_page(result, args.training_report or beside(args.adapter, ".training.html"))
    _print_tracking_report(result)
    return {"adapter": args.adapter, "metrics": metrics_path, "mlflow_run_id": result["mlflow_run_id"],
            **steps.numbers(result)}


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Base-vs-tuned evaluation: writes the HTML report, its metadata and the metrics JSON."""
    _require_inputs({"model": "quantize", "adapter": "train", "eval_data": "prep"}, args)
    adapter_metadata, data_metadata = read_metadata(args.adapter), read_metadata(args.eval_data)
    metrics_path = args.metrics or beside(args.report, ".metrics.json")
    result = steps.evaluate(
        args.model, args.adapter, args.eval_data, args.report, from_dict(EvalConfig, vars(args)),
        tracking=Tracking(args.mlflow_tracking_uri, args.mlflow_experiment, "", args.kfp_run_id, args.kfp_run_name,
                          required=args.mlflow_required,
                          store_dir=args.mlflow_store or beside(args.report, MLFLOW_STORE_SUFFIX)).for_evaluation(
            adapter_metadata, args.training_mlflow_store or beside(args.adapter, MLFLOW_STORE_SUFFIX)),
        data_metadata=data_metadata,
        train_path=args.train_data or "",
        trust_remote_code=args.trust_remote_code,
    )
    write_json(metrics_path, steps.numbers(result))
    write_json(metadata_path(args.report), steps.report_metadata(result))
    _print_tracking_report(result)
    return {"report": args.report, "metrics": metrics_path, "mlflow_run_id": result["mlflow_run_id"],
            **steps.numbers(result)}


def _print_tracking_report(result: dict[str, Any]) -> None:
    if result.get("tracking_report"):
        print(result["tracking_report"], file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = args.step_func(args)
    if summary is not None:  # None: a rank other than 0 of a distributed step
        print(json.dumps(summary, ensure_ascii=False, default=str), flush=True)
    return 0


# -- parser ----------------------------------------------------------------------------------------------------
MODEL = ("base_model", "model_revision")
TRACKING = ("mlflow_tracking_uri", "mlflow_experiment", "mlflow_required")


def _tracked_outputs(parser: argparse.ArgumentParser, main_output: str) -> None:
    """The outputs a tracked step writes beside its main one: metrics JSON and the MLflow store (or note)."""
    _path(parser, "metrics", f"output: metrics JSON (default: <{main_output}>.metrics.json)", required=False)
    _path(parser, "mlflow_store", "output: the MLflow store without a server, else a note "
          f"(default: <{main_output}>.mlflow)", required=False)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, TRACKING, "MLflow")
    add_flag(parser, "kfp_run_id", "",
             "Id of the orchestrator's run (KFP run id, Argo workflow uid), tagged on the MLflow run")
    add_flag(parser, "kfp_run_name", "", "Name of the orchestrator's run, used as the MLflow run name")


def _version_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name in names:
        add_flag(parser, name, "", f"The {name.split('_')[0]}'s version from `kubetune resolve` (cache key, recorded)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the step commands on a subparsers object."""
    resolve = sub.add_parser("resolve", help="step 0: find the dataset's and model's current versions (CPU)",
                             description=run_resolve.__doc__)
    for name in ("dataset_version", "model_version", "pinned_revision"):
        _path(resolve, name, f"output: file to write {name} into", required=False)
    add_setting_flags(resolve, ("dataset", *MODEL))
    resolve.set_defaults(func=_run, step_func=run_resolve)

    finish = sub.add_parser("finish", help="last step: close the MLflow run with the pipeline's final state (CPU)",
                            description=run_finish.__doc__)
    finish.add_argument("--status", required=True, help="the workflow's final state ({{workflow.status}})")
    finish.add_argument("--error", default="", help="the orchestrator's error message, recorded on a failed run")
    _path(finish, "result", "output: the run's result as Markdown", required=False)
    add_setting_flags(finish, TRACKING[:2], "MLflow")
    add_flag(finish, "kfp_run_id", "", "Id of the orchestrator's run, as the tracked steps tagged it")
    add_flag(finish, "kfp_run_name", "", "Name of the orchestrator's run")
    finish.set_defaults(func=_run, step_func=run_finish)

    prep = sub.add_parser("prep", help="step 1: prepare the SFT dataset (CPU)",
                          description=run_prep.__doc__)
    _path(prep, "train_data", "output: the prepared training set (parquet)")
    _path(prep, "eval_data", "output: the held-out set (parquet)")
    _path(prep, "stats", "output: statistics JSON (default: <train_data>.stats.json)", required=False)
    _path(prep, "summary", "output: Markdown summary (default: <train_data>.summary.md)", required=False)
    add_setting_flags(prep, (*MODEL, "columns", "trust_remote_code"))
    _version_flags(prep, ("dataset_version", "model_version"))
    add_config_flags(prep, DataConfig, skip=_COLUMN_FIELDS)
    prep.set_defaults(func=_run, step_func=run_prep)

    quant = sub.add_parser("quantize", help="step 2: load the base model in 4-bit and save it (CPU)",
                           description=run_quantize.__doc__)
    _path(quant, "model", "output: the quantized model directory")
    add_setting_flags(quant, (*MODEL, "trust_remote_code"))
    _version_flags(quant, ("model_version",))
    add_flag(quant, "cache_root", "", "Volume directory for the hub download (HF_HOME=<cache_root>/huggingface)")
    add_config_flags(quant, QuantConfig)
    quant.set_defaults(func=_run, step_func=run_quantize)

    train = sub.add_parser("train", help="step 3: LoRA SFT on the 4-bit model (GPU)", description=run_train.__doc__)
    _path(train, "model", "input: the quantized model directory (from quantize)")
    _path(train, "train_data", "input: the prepared training set (from prep)")
    _path(train, "adapter", "output: the LoRA adapter directory")
    _tracked_outputs(train, "adapter")
    _path(train, "training_report", "output: the training page, curves by step (default: <adapter>.training.html)",
          required=False)
    add_setting_flags(train, ("checkpoint_dir",))
    add_flag(train, "checkpoint_root", "", "Volume directory for per-run checkpoints")
    add_flag(train, "max_length", 0, "Maximum tokens per sample; 0 = the value prep recorded in the data's metadata")
    train.add_argument("--num_gpus", "--num-gpus", "--nproc", dest="num_gpus", type=whole, default=0,
                       help="Data-parallel processes, one per GPU, started through torchrun; 0 = every visible GPU "
                       "(1 without a GPU); ignored under torchrun (default: %(default)s)")
    add_config_flags(train, LoraSettings)
    add_config_flags(train, TrainConfig)
    _run_flags(train)
    train.set_defaults(func=_run, step_func=run_train)

    ev = sub.add_parser("evaluate", help="step 4: compare base and tuned model, write the HTML report (GPU)",
                        description=run_evaluate.__doc__)
    _path(ev, "model", "input: the quantized model directory (from quantize)")
    _path(ev, "adapter", "input: the LoRA adapter directory (from train)")
    _path(ev, "eval_data", "input: the held-out set (from prep)")
    _path(ev, "report", "output: the HTML report")
    _tracked_outputs(ev, "report")
    _path(ev, "training_mlflow_store", "input: train's mlflow_store (default: <adapter>.mlflow)", required=False)
    _path(ev, "train_data", "input: the prepared training set, for train_probe_samples (from prep)", required=False)
    add_setting_flags(ev, ("trust_remote_code",))
    add_config_flags(ev, EvalConfig)
    _run_flags(ev)
    ev.set_defaults(func=_run, step_func=run_evaluate)
