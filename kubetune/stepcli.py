"""The four pipeline steps as commands: ``kubetune prep | quantize | train | evaluate``.

They run inside the kubetune images, as the containers of the plain Argo Workflow (``kubetune argo``), and call
the same :mod:`kubetune.steps` functions as the KFP components. Flags carry the names of the component inputs
(the pipeline parameters, e.g. ``--base_model``; ``--base-model`` works too) and of the artifacts, which here
are paths: ``--train_data``, ``--model``, ``--adapter``, ``--report`` ... What KFP keeps as an artifact's
metadata is written beside each output as ``<output>.metadata.json``, and the next step reads it from there.

Also runnable as ``python -m kubetune.stepcli prep ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from kubetune.config import DataConfig, EvalConfig, LoraSettings, QuantConfig, TrainConfig, from_dict
from kubetune.errors import clear_errors

STEPS = ("prep", "quantize", "train", "evaluate")
METADATA_SUFFIX = ".metadata.json"
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
    from kubetune.storage import atomic_file

    with atomic_file(path) as staging:
        Path(staging).write_text(json.dumps(values, ensure_ascii=False, indent=2, default=str), encoding="utf-8")


def _require_inputs(producer: dict[str, str], args: argparse.Namespace) -> None:
    """Every input path exists, checked before the heavy imports; one error lists all that are missing."""
    from kubetune.errors import collect

    collect([
        (f"--{name} {getattr(args, name)} does not exist",
         f"run `kubetune {step}` first (it writes --{name}), or pass the path where that step wrote it")
        for name, step in producer.items() if not Path(getattr(args, name)).exists()
    ])


# -- flag types ------------------------------------------------------------------------------------------------
def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"true", "1", "yes", "on"}:
        return True
    if lowered in {"false", "0", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean (use true or false)")


def _whole(raw: str) -> int:
    """An integer; ``2.0`` too, as a KFP number constant arrives in a plain Argo Workflow."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number")
    return int(value)


def _list(raw: str) -> list[str]:
    """A JSON list (as a list pipeline parameter arrives from Argo) or ``a|b|c``."""
    if raw.strip().startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a JSON list: {exc}") from None
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError(f"{raw!r} is not a JSON list")
        return [str(item) for item in parsed]
    return [part for part in raw.split("|") if part.strip()]


def _flag(parser: argparse.ArgumentParser, name: str, default: Any, help_text: str, **kwargs: Any) -> None:
    """``--name`` (the pipeline's spelling) and ``--name-with-dashes``, typed from the default."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    if isinstance(default, bool):
        kwargs.update(type=_bool, nargs="?", const=True, metavar="{true,false}")
    elif isinstance(default, list):
        kwargs.update(type=_list, metavar="JSON_LIST|A|B")
    elif isinstance(default, (int, float)):
        kwargs.update(type=type(default))
    parser.add_argument(*names, dest=name, default=default, help=f"{help_text} (default: %(default)s)", **kwargs)


def _config_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:
    """One flag per field of a config dataclass, with the field's default and help text."""
    instance, hints = cls(), typing.get_type_hints(cls)
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(f"{cls.__name__}: {title}")
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            _flag(group, f.name, getattr(instance, f.name), f.metadata.get("help", ""),
                  **({"choices": choices} if choices else {}))


def _model_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "base_model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
          "Local model directory (e.g. on the mounted volume) or hub id")
    _flag(parser, "model_revision", "", "Hub revision (branch, tag or commit) of base_model; empty for the default")


def _tracking_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MLflow")
    _flag(group, "mlflow_tracking_uri", "", "MLflow tracking URI; empty = MLFLOW_TRACKING_URI, else a local sqlite store")
    _flag(group, "mlflow_experiment", "kubetune", "MLflow experiment name")
    _flag(group, "kfp_run_id", "", "Id of the orchestrator's run (KFP run id, Argo workflow uid), tagged on the MLflow run")
    _flag(group, "kfp_run_name", "", "Name of the orchestrator's run, used as the MLflow run name")


def _path(parser: argparse.ArgumentParser, name: str, help_text: str, *, required: bool = True) -> None:
    parser.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name,
                        required=required, default="", metavar="PATH", help=help_text)


# -- steps -----------------------------------------------------------------------------------------------------
def run_prep(args: argparse.Namespace) -> dict[str, Any]:
    """Dataset prep: writes the train/eval datasets, their metadata, the statistics and the Markdown summary."""
    from kubetune.steps import numbers, parse_columns, prepare

    values = {k: v for k, v in vars(args).items() if k not in _COLUMN_FIELDS}
    if not values["persona"]:
        values.pop("persona")  # empty = the built-in expert persona, as in the component
    config = from_dict(DataConfig, {**values, **parse_columns(args.columns)})
    stats, markdown, metadata = prepare(config, args.base_model, args.train_data, args.eval_data,
                                        revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    for output in (args.train_data, args.eval_data):
        write_json(metadata_path(output), metadata)
    stats_path = args.stats or beside(args.train_data, ".stats.json")
    summary_path = args.summary or beside(args.train_data, ".summary.md")
    write_json(stats_path, numbers(stats))
    from kubetune.storage import atomic_file

    with atomic_file(summary_path) as staging:
        Path(staging).write_text(markdown, encoding="utf-8")
    return {"train_data": args.train_data, "eval_data": args.eval_data, "stats": stats_path,
            "summary": summary_path, **numbers(stats)}


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """4-bit model load: writes the quantized model directory and ``<model>.metadata.json``."""
    from kubetune.steps import numbers, quantize

    metadata = quantize(args.base_model, args.model, from_dict(QuantConfig, vars(args)),
                        revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    write_json(metadata_path(args.model), metadata)
    return {"model": args.model, **numbers(metadata)}


def run_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """LoRA SFT: writes the adapter, ``<adapter>.metadata.json`` (the MLflow run) and the metrics JSON.

    Trains on ``--num_gpus`` GPUs (default: all visible) through torchrun; already under torchrun (e.g. in a
    TrainJob) it runs as its rank, and only rank 0 writes and prints.
    """
    _require_inputs({"model": "quantize", "train_data": "prep"}, args)
    from kubetune.distributed import is_rank_zero, train
    from kubetune.steps import Tracking, checkpoint_location, numbers

    model_metadata, data_metadata = read_metadata(args.model), read_metadata(args.train_data)
    metrics_path = args.metrics or beside(args.adapter, ".metrics.json")
    result = train(
        args.model, args.train_data, args.adapter,
        lora=from_dict(LoraSettings, vars(args)),
        train_config=from_dict(TrainConfig, vars(args)),
        max_length=args.max_length or int(float(data_metadata.get("max_length", 2048))),
        checkpoint_dir=checkpoint_location(args.checkpoint_dir, args.checkpoint_root, args.kfp_run_id, args.adapter),
        tracking=Tracking(args.mlflow_tracking_uri, args.mlflow_experiment, "", args.kfp_run_id, args.kfp_run_name),
        model_metadata=model_metadata,
        data_metadata=data_metadata,
        nproc=args.num_gpus,
    )
    if not is_rank_zero():
        return None
    write_json(metrics_path, numbers(result))
    write_json(metadata_path(args.adapter), {
        **{k: result[k] for k in ("mlflow_run_id", "mlflow_run_url", "tracking_uri")},
        "base_model": model_metadata.get("source", ""),
        "mlflow_experiment": args.mlflow_experiment,
    })
    _print_tracking_report(result)
    return {"adapter": args.adapter, "metrics": metrics_path, "mlflow_run_id": result["mlflow_run_id"],
            **numbers(result)}


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Base-vs-tuned evaluation: writes the HTML report, its metadata and the metrics JSON."""
    _require_inputs({"model": "quantize", "adapter": "train", "eval_data": "prep"}, args)
    from kubetune.steps import Tracking, evaluate, numbers

    adapter_metadata, data_metadata = read_metadata(args.adapter), read_metadata(args.eval_data)
    metrics_path = args.metrics or beside(args.report, ".metrics.json")
    result = evaluate(
        args.model, args.adapter, args.eval_data, args.report, from_dict(EvalConfig, vars(args)),
        tracking=Tracking.of_adapter(adapter_metadata, args.mlflow_tracking_uri, args.mlflow_experiment,
                                     args.kfp_run_id, args.kfp_run_name),
        prompt_style=data_metadata.get("prompt_style", "expert"),
        persona=data_metadata.get("persona", ""),
        trust_remote_code=args.trust_remote_code,
    )
    write_json(metrics_path, numbers(result))
    write_json(metadata_path(args.report), {k: result[k] for k in ("mlflow_run_id", "mlflow_run_url")})
    _print_tracking_report(result)
    return {"report": args.report, "metrics": metrics_path, "mlflow_run_id": result["mlflow_run_id"],
            **numbers(result)}


def _print_tracking_report(result: dict[str, Any]) -> None:
    if result.get("tracking_report"):
        print(result["tracking_report"], file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    summary = args.step_func(args)
    if summary is not None:  # None: a rank other than 0 of a distributed step
        print(json.dumps(summary, ensure_ascii=False, default=str), flush=True)
    return 0


# -- parser ----------------------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``prep``, ``quantize``, ``train`` and ``evaluate`` on a subparsers object."""
    prep = sub.add_parser("prep", help="step 1: prepare the SFT dataset (CPU)",
                          description=run_prep.__doc__)
    _path(prep, "train_data", "output: the prepared training set (parquet)")
    _path(prep, "eval_data", "output: the held-out set (parquet)")
    _path(prep, "stats", "output: statistics JSON (default: <train_data>.stats.json)", required=False)
    _path(prep, "summary", "output: Markdown summary (default: <train_data>.summary.md)", required=False)
    _model_flags(prep)
    _flag(prep, "columns", "", "Explicit column mapping, e.g. instruction=question,output=answer")
    _flag(prep, "trust_remote_code", False, "Allow tokenizer code from the hub")
    _config_flags(prep, DataConfig, skip=_COLUMN_FIELDS)
    prep.set_defaults(func=_run, step_func=run_prep)

    quant = sub.add_parser("quantize", help="step 2: load the base model in 4-bit and save it (CPU)",
                           description=run_quantize.__doc__)
    _path(quant, "model", "output: the quantized model directory")
    _model_flags(quant)
    _flag(quant, "trust_remote_code", False, "Allow model code from the hub")
    _config_flags(quant, QuantConfig)
    quant.set_defaults(func=_run, step_func=run_quantize)

    train = sub.add_parser("train", help="step 3: LoRA SFT on the 4-bit model (GPU)", description=run_train.__doc__)
    _path(train, "model", "input: the quantized model directory (from quantize)")
    _path(train, "train_data", "input: the prepared training set (from prep)")
    _path(train, "adapter", "output: the LoRA adapter directory")
    _path(train, "metrics", "output: metrics JSON (default: <adapter>.metrics.json)", required=False)
    _flag(train, "checkpoint_dir", "", "Where checkpoints go; a retry resumes from the last one. "
          "Empty = <checkpoint_root>/<kfp_run_id>, else <adapter>.checkpoints")
    _flag(train, "checkpoint_root", "", "Volume directory for per-run checkpoints")
    _flag(train, "max_length", 0, "Maximum tokens per sample; 0 = the value prep recorded in the data's metadata")
    train.add_argument("--num_gpus", "--num-gpus", "--nproc", dest="num_gpus", type=_whole, default=0,
                       help="Data-parallel processes, one per GPU, started through torchrun; 0 = every visible GPU "
                       "(1 without a GPU); ignored under torchrun (default: %(default)s)")
    _config_flags(train, LoraSettings)
    _config_flags(train, TrainConfig)
    _tracking_flags(train)
    train.set_defaults(func=_run, step_func=run_train)

    ev = sub.add_parser("evaluate", help="step 4: compare base and tuned model, write the HTML report (GPU)",
                        description=run_evaluate.__doc__)
    _path(ev, "model", "input: the quantized model directory (from quantize)")
    _path(ev, "adapter", "input: the LoRA adapter directory (from train)")
    _path(ev, "eval_data", "input: the held-out set (from prep)")
    _path(ev, "report", "output: the HTML report")
    _path(ev, "metrics", "output: metrics JSON (default: <report>.metrics.json)", required=False)
    _flag(ev, "trust_remote_code", False, "Allow model code from the hub")
    _config_flags(ev, EvalConfig)
    _tracking_flags(ev)
    ev.set_defaults(func=_run, step_func=run_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Run one kubetune pipeline step.")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with clear_errors():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
