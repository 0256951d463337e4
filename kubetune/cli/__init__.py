"""The ``kubetune`` command: compile, run locally, submit and compare pipelines, and run single steps.

This package is the only part of kubetune that imports kfp, ``kubetune.pipelines`` and ``kubetune.components``
besides those two packages themselves; nothing imports it. One module per command family: ``run`` (kfp.local),
``submit`` (Kubeflow), ``argo`` (plain Argo), ``compare`` (MLflow), ``tracking`` (``mlflow-import``),
``steps`` (the four step commands),
``component_yaml`` (the shipped component files); ``params`` and ``options`` build the flags they share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune import __version__
from kubetune.cli import argo, compare, run, steps, submit, tracking
from kubetune.cli.options import add_cluster_flags, add_placement_flags, placement_options
from kubetune.errors import clear_errors
from kubetune.pipelines import compile_pipeline
from kubetune.tiny import make_tiny_model


def cmd_tiny_model(args: argparse.Namespace) -> int:
    print(make_tiny_model(args.directory))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    options = placement_options(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    print(compile_pipeline(args.output, options))
    print(options.tracking_plan(), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="QLoRA fine-tuning pipelines for Kubeflow.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write a small Qwen2 model and tokenizer for local runs and tests")
    tiny.add_argument("directory")
    tiny.set_defaults(func=cmd_tiny_model)

    comp = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML for the Kubeflow UI")
    comp.add_argument("-o", "--output", default="kubetune-local/kubetune-pipeline.yaml",
                      help="KFP package to write (default: %(default)s)")
    add_placement_flags(comp)
    add_cluster_flags(comp)
    comp.set_defaults(func=cmd_compile)

    for module in (run, submit, compare, tracking, argo, steps):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with clear_errors():
        return args.func(args)
