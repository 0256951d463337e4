"""The pipeline parameters: which settings of the config dataclasses the pipeline exposes, in which order, with
which types, defaults and descriptions; and their validation before a run. The pipeline signature, the component
drift checks and the command-line flags are generated from here."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.config import (
    DataConfig,
    EvalConfig,
    LoraSettings,
    QuantConfig,
    RunConfig,
    TrainConfig,
    from_dict,
)
from kubetune.errors import collect

CONFIGS: tuple[type, ...] = (RunConfig, DataConfig, QuantConfig, LoraSettings, TrainConfig, EvalConfig)
"""Every settings dataclass; a name that two of them declare (seed, trust_remote_code) is one setting."""

PIPELINE_PARAMETERS: tuple[str, ...] = (
    "dataset", "dataset_subset", "dataset_split", "base_model", "model_revision", "dataset_format", "columns", "prompt_style",
    "persona", "max_length",
    "length_policy", "max_samples", "eval_fraction", "max_eval_samples", "quantization", "double_quant", "lora_r",
    "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler", "warmup_ratio", "num_epochs",
    "max_steps", "batch_tokens", "gradient_accumulation", "lean", "save_steps", "checkpoint_dir", "seed",
    "probe_questions", "max_new_tokens", "max_generation_samples", "train_probe_samples", "capability_check", "reasoning", "thinking_budget", "temperature",
    "top_p", "repetition_penalty", "mlflow_tracking_uri", "mlflow_experiment",
    "mlflow_required", "trust_remote_code",
)
"""The pipeline parameters the Kubeflow UI shows, in its order; each is a field of one of :data:`CONFIGS`."""


@dataclass(frozen=True)
class Setting:
    """One setting as the pipeline, the components and the command line declare it."""

    name: str
    type: type  # the plain Python type KFP understands: str, int, float, bool, list
    default: Any
    help: str
    choices: tuple[Any, ...] = ()  # the values of a Literal[...] field


def _plain_type(hint: Any) -> type:
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return typing.get_origin(hint) or hint


def settings() -> dict[str, Setting]:
    """Every field of :data:`CONFIGS` by name (the first declaration of a shared name wins; a test checks that
    the others agree)."""
    found: dict[str, Setting] = {}
    for cls in CONFIGS:
        hints, instance = typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            found.setdefault(f.name, Setting(
                f.name, _plain_type(hint), getattr(instance, f.name), " ".join(f.metadata.get("help", "").split()),
                typing.get_args(hint) if typing.get_origin(hint) is Literal else (),
            ))
    return found


def pipeline_settings() -> list[Setting]:
    """The pipeline parameters as :class:`Setting` rows, in the order the UI shows them."""
    known = settings()
    return [known[name] for name in PIPELINE_PARAMETERS]


def validate_parameters(values: dict[str, Any]) -> None:
    """Check pipeline parameter values (by name, as ``--param`` and the Kubeflow UI set them) against the rules of
    every config they feed, before anything runs: one error listing every problem, instead of a step failing
    minutes into the run. Names no config declares are ignored."""
    problems: list[tuple[str, str]] = []
    for cls in CONFIGS:
        for problem in from_dict(cls, values).problems():
            if problem not in problems:  # seed, say, feeds two configs
                problems.append(problem)
    collect(problems)
