"""Pipeline parameters and settings on the command line: ``--param NAME=VALUE`` pairs typed by the pipeline's
declared parameters, and one flag per setting of the config dataclasses for the step commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from kfp.pipeline_spec import pipeline_spec_pb2

from kubetune.errors import collect
from kubetune.parameters import settings
from kubetune.pipelines import finetune_pipeline

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def pipeline_parameter_types() -> dict[str, str]:
    """Declared pipeline parameters and their KFP types (STRING, NUMBER_INTEGER, ...)."""
    spec = finetune_pipeline.pipeline_spec.root.input_definitions.parameters
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
        if name in values:
            problems.append((f"--param {name} is given twice", f"give {name} once"))
            continue
        try:
            values[name] = _convert(raw, types[name])
        except ValueError:
            problems.append(
                (f"--param {name}={raw!r} is not a valid {types[name].lower().replace('_', ' ')}",
                 f"give {name} a value of that type, e.g. {_example(types[name])}")
            )
    collect(problems)
    return values


def _convert(raw: str, kind: str) -> Any:
    if kind == "NUMBER_INTEGER":
        return int(raw)
    if kind == "NUMBER_DOUBLE":
        return float(raw)
    if kind == "BOOLEAN":
        return boolean(raw)
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


# -- flag types ------------------------------------------------------------------------------------------------
def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(raw)


def _bool_flag(raw: str) -> bool:
    try:
        return boolean(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean (use true or false)") from None


def whole(raw: str) -> int:
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


def add_flag(parser, name: str, default: Any, help_text: str, **kwargs: Any) -> None:
    """``--name`` (the pipeline's spelling) and ``--name-with-dashes``, typed from the default."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    if isinstance(default, bool):
        kwargs.update(type=_bool_flag, nargs="?", const=True, metavar="{true,false}")
    elif isinstance(default, list):
        kwargs.update(type=_list, metavar="JSON_LIST|A|B")
    elif isinstance(default, (int, float)):
        kwargs.update(type=type(default))
    parser.add_argument(*names, dest=name, default=default, help=f"{help_text} (default: %(default)s)", **kwargs)


def add_setting_flags(parser, names: typing.Iterable[str], title: str = "") -> None:
    """One flag per named setting (see :func:`kubetune.parameters.settings`), with its default and help."""
    known = settings()
    group = parser.add_argument_group(title) if title else parser
    for name in names:
        setting = known[name]
        add_flag(group, name, setting.default, setting.help,
                 **({"choices": setting.choices} if setting.choices else {}))


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: typing.Container[str] = ()) -> None:
    """One flag per field of a config dataclass."""
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    add_setting_flags(parser, [f.name for f in dataclasses.fields(cls) if f.name not in skip],
                      f"{cls.__name__}: {title}")

