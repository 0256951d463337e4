"""Compiled component YAML files, shipped in ``kubetune/components/yaml/`` for reuse one by one.

Anyone can load a step into their own pipeline without installing kubetune's Python API::

    from kfp import components
    train_lora = components.load_component_from_file("train_lora.yaml")

Regenerate them after changing a component (a test fails while they are stale)::

    python -m kubetune.cli.component_yaml            # writes components/yaml/*.yaml
    python -m kubetune.cli.component_yaml --check    # exit 1 if any file is stale

The files always name the default images of this package version (``ghcr.io/kubetune/kubetune-*:<version>``),
whatever ``KUBETUNE_*_IMAGE`` says in the shell that regenerates them.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

import yaml
from kfp import compiler

from kubetune.containers.images import resolve_images
from kubetune.pipelines.step_table import BY_NAME, STEPS

_SDK_VERSION = re.compile(r"^sdkVersion: .*$", re.M)


def default_directory() -> Path:
    """``components/yaml`` inside the installed ``kubetune.components`` package (the repo in an editable install)."""
    return Path(str(resources.files("kubetune.components"))) / "yaml"


def compile_component(name: str, path: str | Path) -> Path:
    """Compile one component to ``path`` with the package's default image for its kind."""
    images = resolve_images(env={})  # defaults only: the shipped files must not depend on the shell
    step = BY_NAME[name]
    component = copy.copy(step.component)
    component.component_spec = copy.deepcopy(component.component_spec)
    component.component_spec.implementation.container.image = images.gpu if step.gpu else images.cpu
    compiler.Compiler().compile(component, package_path=str(path))
    return Path(path)


def write_component_yamls(directory: str | Path | None = None) -> list[Path]:
    """Compile every component to ``<directory>/<name>.yaml`` (default: :func:`default_directory`)."""
    target = Path(directory) if directory is not None else default_directory()
    target.mkdir(parents=True, exist_ok=True)
    return [compile_component(step.name, target / f"{step.name}.yaml") for step in STEPS]


def without_sdk_version(text: str) -> str:
    """The YAML text without its ``sdkVersion:`` line, which changes with every kfp release."""
    return _SDK_VERSION.sub("", text)


def yaml_documents(text: str) -> list:
    """The parsed documents of a YAML text without its SDK version: equal content compares equal whatever the
    string style (importing hera, for one, changes how PyYAML writes multi-line strings)."""
    return list(yaml.safe_load_all(without_sdk_version(text)))


def stale_component_yamls(directory: str | Path | None = None) -> list[str]:
    """Names of the shipped component YAMLs that differ from what the code compiles to now."""
    shipped = Path(directory) if directory is not None else default_directory()
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in write_component_yamls(tmp):
            current = shipped / fresh.name
            if not current.is_file() or yaml_documents(current.read_text(encoding="utf-8")) != \
                    yaml_documents(fresh.read_text(encoding="utf-8")):
                stale.append(fresh.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.cli.component_yaml", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=None, help="where to write (default: the package's components/yaml)")
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_component_yamls(args.output_dir)
        for name in stale:
            print(f"stale: {name} (run python -m kubetune.cli.component_yaml)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_component_yamls(args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
