"""The ``kubetune`` command: compile, run locally, submit and compare pipelines, and run single steps.

This module sits above everything (it imports the pipelines); the core never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from kubetune import __version__
from kubetune.errors import KubetuneError, clear_errors

LOCAL_WORKDIR = "kubetune-local"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# The local demo adapts a randomly initialised 2-layer model on the CPU: shorter samples and a high learning
# rate make its held-out loss fall within a few minutes. Any --param overrides these.
LOCAL_DEFAULTS: dict[str, Any] = {
    "max_length": 512,
    "learning_rate": 1e-2,
    "num_epochs": 2.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "save_steps": 20,
    "max_new_tokens": 32,
    "max_generation_samples": 8,
    "max_eval_samples": 40,
}


# -- parameters ------------------------------------------------------------------------------------------------
def pipeline_parameter_types() -> dict[str, str]:
    """Declared pipeline parameters and their KFP types (STRING, NUMBER_INTEGER, ...)."""
    from kubetune.pipelines import finetune_pipeline

    spec = finetune_pipeline.pipeline_spec.root.input_definitions.parameters
    from kfp.pipeline_spec import pipeline_spec_pb2

    enum = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    return {name: enum.Name(definition.parameter_type) for name, definition in spec.items()}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["lora_r=8", "lean=true"]`` → typed values, checked against the pipeline's declared parameters."""
    types = pipeline_parameter_types()
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep:
            problems.append((f"--param {pair!r} has no '='", "write --param NAME=VALUE"))
            continue
        if name not in types:
            problems.append((f"unknown pipeline parameter {name!r}", f"use one of: {', '.join(sorted(types))}"))
            continue
        try:
            values[name] = _convert(raw, types[name])
        except ValueError:
            problems.append(
                (f"--param {name}={raw!r} is not a valid {types[name].lower().replace('_', ' ')}",
                 f"give {name} a value of that type, e.g. {_example(types[name])}")
            )
    from kubetune.errors import collect

    collect(problems)
    return values


def _convert(raw: str, kind: str) -> Any:
    if kind == "NUMBER_INTEGER":
        return int(raw)
    if kind == "NUMBER_DOUBLE":
        return float(raw)
    if kind == "BOOLEAN":
        lowered = raw.strip().lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        raise ValueError(raw)
    if kind in {"LIST", "STRUCT"}:
        parsed = json.loads(raw) if raw.strip().startswith(("[", "{")) else None
        if kind == "LIST":
            return parsed if isinstance(parsed, list) else [part for part in raw.split("|") if part.strip()]
        if not isinstance(parsed, dict):
            raise ValueError(raw)
        return parsed
    return raw


def _example(kind: str) -> str:
    return {"NUMBER_INTEGER": "16", "NUMBER_DOUBLE": "0.0002", "BOOLEAN": "true", "LIST": '\'["q1", "q2"]\' or q1|q2',
            "STRUCT": '\'{"key": "value"}\''}.get(kind, "text")


# -- commands --------------------------------------------------------------------------------------------------
def cmd_tiny_model(args: argparse.Namespace) -> int:
    from kubetune.tiny import make_tiny_model

    print(make_tiny_model(args.directory))
    return 0


def placement_options(args: argparse.Namespace):
    """PipelineOptions from the shared placement flags."""
    from kubetune.containers.images import resolve_images
    from kubetune.pipelines import PipelineOptions
    from kubetune.pipelines.placement import load_profile, override

    profile = override(
        load_profile(args.profile),
        gpu_type=args.gpu_type,
        gpu_count=args.gpu_count,
        node_selector=dict(_key_value(item, "--gpu-node-selector") for item in args.gpu_node_selector),
        tolerations=[_toleration(item) for item in args.gpu_toleration],
    )
    images = resolve_images(args.cpu_image or None, args.gpu_image or None)
    return PipelineOptions(profile=profile, cpu_image=images.cpu, gpu_image=images.gpu)


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise KubetuneError(f"{flag} {item!r} is not KEY=VALUE", f"write e.g. {flag} nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    return key, value


def _toleration(item: str) -> dict[str, str]:
    """``KEY[=VALUE]:EFFECT`` like kubectl taint syntax; no value means operator Exists."""
    spec, _, effect = item.rpartition(":")
    if not spec or effect not in {"NoSchedule", "PreferNoSchedule", "NoExecute"}:
        raise KubetuneError(
            f"--gpu-toleration {item!r} is not KEY[=VALUE]:EFFECT", "write e.g. --gpu-toleration nvidia.com/gpu:NoSchedule"
        )
    key, sep, value = spec.partition("=")
    return {"key": key, "operator": "Equal" if sep else "Exists", "effect": effect, **({"value": value} if sep else {})}


def cmd_compile(args: argparse.Namespace) -> int:
    from kubetune.pipelines import compile_pipeline
    from kubetune.submit import cluster_options

    path = compile_pipeline(args.output, cluster_options(args, placement_options(args)))
    print(path)
    return 0


def run_local(params: dict[str, Any], workdir: str | os.PathLike = LOCAL_WORKDIR) -> dict[str, Any]:
    """Run the whole pipeline under kfp.local (each step a subprocess of this Python). Returns the summary."""
    from kfp import local

    from kubetune.pipelines import finetune_pipeline
    from kubetune.tiny import ensure_tiny_model
    from kubetune.tracking import default_local_uri

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params = dict(params)
    if "base_model" not in params:
        params = {**LOCAL_DEFAULTS, **params, "base_model": ensure_tiny_model(workdir / "tiny-model")}
    params.setdefault("mlflow_tracking_uri", os.environ.get("MLFLOW_TRACKING_URI") or default_local_uri(workdir))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "outputs"),
               raise_on_error=True)
    try:
        task = finetune_pipeline(**params)
    except RuntimeError as error:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        if "FAILURE" not in str(error):
            raise
        plain = ANSI_COLOUR.sub("", str(error))
        raise KubetuneError(
            f"the local pipeline failed: {plain}",
            "read the failed step's log above: it ends with the step's own error and its fix",
        ) from None
    adapter, report = task.outputs["adapter"], task.outputs["report"]
    return {
        "adapter": adapter.path,
        "report": report.path,
        "mlflow_run_id": adapter.metadata.get("mlflow_run_id", ""),
        "mlflow_tracking_uri": params["mlflow_tracking_uri"],
        "mlflow_experiment": params.get("mlflow_experiment", "kubetune"),
        "base_model": params["base_model"],
    }


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise KubetuneError("run needs --local (cluster runs go through `kubetune submit`)",
                            "use `kubetune run --local` here, or `kubetune submit --host URL` for Kubeflow")
    from kubetune.config import validate_parameters

    params = parse_params(args.param)
    validate_parameters(params)
    summary = run_local(params, args.workdir)
    print(f"adapter:      {summary['adapter']}", file=sys.stderr)
    print(f"report:       {summary['report']}", file=sys.stderr)
    print(f"MLflow run:   {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _add_placement_flags(parser: argparse.ArgumentParser) -> None:
    from kubetune.pipelines.placement import profile_names

    group = parser.add_argument_group("placement (GPU steps: train_lora, evaluate_model)")
    group.add_argument("--profile", default="default", choices=profile_names(), help="placement profile")
    group.add_argument("--gpu-type", default="", help="accelerator resource, e.g. nvidia.com/gpu")
    group.add_argument("--gpu-count", type=int, default=0, help="GPUs per GPU step")
    group.add_argument("--gpu-node-selector", action="append", default=[], metavar="KEY=VALUE")
    group.add_argument("--gpu-toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    group.add_argument("--cpu-image", default="", help="image for CPU steps (default: KUBETUNE_CPU_IMAGE or built-in)")
    group.add_argument("--gpu-image", default="", help="image for GPU steps (default: KUBETUNE_GPU_IMAGE or built-in)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="QLoRA fine-tuning pipelines for Kubeflow.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write a small Qwen2 model and tokenizer for local runs and tests")
    tiny.add_argument("directory")
    tiny.set_defaults(func=cmd_tiny_model)

    comp = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML for the Kubeflow UI")
    comp.add_argument("-o", "--output", default="kubetune-pipeline.yaml")
    _add_placement_flags(comp)
    from kubetune.submit import add_cluster_flags

    add_cluster_flags(comp)
    comp.set_defaults(func=cmd_compile)

    run = sub.add_parser("run", help="run the whole pipeline locally with kfp.local")
    run.add_argument("--local", action="store_true", help="run here, each step as a subprocess")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    run.add_argument("--workdir", default=LOCAL_WORKDIR, help="outputs, tiny model and MLflow store")
    run.set_defaults(func=cmd_run)

    # Commands that live beside their own logic: cluster submission, MLflow comparison, plain Argo, single steps.
    from kubetune import compare, stepcli, submit
    from kubetune.pipelines import argo

    for module in (submit, compare, argo, stepcli):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with clear_errors():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
