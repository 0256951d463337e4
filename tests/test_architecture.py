"""The shape of the code, enforced: the core never imports what sits above it, no import cycles, one step table
that every registry reads, settings defined once in the config dataclasses, small files and signatures."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import kubetune.components as components
import pytest
from kubetune.pipelines import finetune_pipeline
from kubetune.pipelines.kfp_spec import container_tasks, spec_dict
from kubetune.pipelines.placement import load_profile, profile_names
from kubetune.pipelines.step_table import STEP_NAMES, STEPS

from kubetune.cli import build_parser
from kubetune.parameters import CONFIGS, PIPELINE_PARAMETERS, settings

ROOT = Path(__file__).resolve().parents[1]
# Where each import path's files live (see pyproject.toml's package-dir).
PACKAGES = {"kubetune.components": ROOT / "components", "kubetune.pipelines": ROOT / "pipelines",
            "kubetune.containers": ROOT / "containers", "kubetune": ROOT / "kubetune"}
ABOVE_THE_CORE = ("kfp", "kubetune.cli", "kubetune.pipelines", "kubetune.components")
MAX_LINES = 400
# The demo data generator is mostly the data itself (tables of symptoms, herbs and answers).
DATA_FILES = {ROOT / "kubetune" / "sample_data" / "generate.py"}
MAX_PARAMETERS = 12
# A component's signature is its KFP interface, checked against the config by test_component_inputs_match_*.
SIGNATURE_EXCEPTIONS = {ROOT / "components"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts or (package == "kubetune" and any(
                    path.is_relative_to(other) for other in PACKAGES.values() if other != folder)):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(path: Path, *, typing_only: bool = True) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); ``typing_only=False`` leaves
    out the imports under ``if TYPE_CHECKING:``, which never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _edges(module: str) -> set[str]:
    """The kubetune modules a module imports (``from package import submodule`` counts as the submodule)."""
    return {name for name in _imports(MODULES[module], typing_only=False) if name in MODULES and name != module}


def test_the_core_imports_nothing_above_it():
    offenders = {}
    for module, path in MODULES.items():
        if module.startswith("kubetune.") and path.is_relative_to(ROOT / "kubetune") and \
                not module.startswith("kubetune.cli"):
            bad = sorted(name for name in _imports(path)
                         if any(name == top or name.startswith(top + ".") for top in ABOVE_THE_CORE))
            if bad:
                offenders[module] = bad
    assert not offenders, f"the core imports what sits above it: {offenders}"


def test_nothing_imports_the_command():
    importers = sorted(module for module in MODULES if not module.startswith("kubetune.cli")
                       and any(name.startswith("kubetune.cli") for name in _imports(MODULES[module])))
    assert not importers


def test_no_import_cycles():
    graph = {module: _edges(module) for module in MODULES}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    graph = {module: {e for e in edges if not module.startswith(e + ".")} for module, edges in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target):], target] if target in trail else [module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_source_files_stay_small():
    long = {str(path.relative_to(ROOT)): n for path in MODULES.values() if path not in DATA_FILES
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_functions_take_few_parameters():
    wide = []
    for path in MODULES.values():
        if any(path.is_relative_to(folder) for folder in SIGNATURE_EXCEPTIONS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
                count -= bool(node.args.args and node.args.args[0].arg in ("self", "cls"))
                if count > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not wide, f"functions with more than {MAX_PARAMETERS} parameters: {wide}"


# -- one step table -----------------------------------------------------------------------------------------------
def test_every_registry_reads_the_step_table():
    assert tuple(components.__all__) == STEP_NAMES
    assert [step.component for step in STEPS] == [getattr(components, name) for name in STEP_NAMES]
    for name in profile_names():
        assert tuple(load_profile(name).steps) == STEP_NAMES
    tasks = [name for name, *_ in container_tasks(spec_dict(finetune_pipeline))]  # the exit handler's too
    assert sorted(tasks) == sorted(step.task for step in STEPS)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {step.command for step in STEPS} <= set(commands)


def test_a_step_name_is_defined_once():
    """Outside the step table, step names appear only as the components' own definitions and profile keys."""
    for step in STEPS:
        definitions = [path for path in MODULES.values()
                       if f'"{step.name}", "{step.command}"' in path.read_text(encoding="utf-8")]
        assert definitions == [ROOT / "pipelines" / "step_table.py"]


# -- settings defined once ----------------------------------------------------------------------------------------
def test_a_setting_shared_by_two_configs_agrees():
    seen: dict[str, object] = {}
    for cls in CONFIGS:
        instance = cls()
        for name in cls.__dataclass_fields__:
            value = getattr(instance, name)
            assert seen.setdefault(name, value) == value, f"{name} has two defaults"


def test_pipeline_parameters_come_from_the_config():
    known = settings()
    inputs = finetune_pipeline.component_spec.inputs
    assert [name for name in inputs if name != "gpu_node_selector"] == list(PIPELINE_PARAMETERS)
    for name in PIPELINE_PARAMETERS:
        assert inputs[name].default == known[name].default, name
        assert " ".join((inputs[name].description or "").split()) == known[name].help, name


def test_run_help_lists_every_pipeline_parameter(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    shown = capsys.readouterr().out
    assert all(f"  {name} (default: " in shown for name in PIPELINE_PARAMETERS)


# The built-in persona is long: the component takes "" for it (see its docstring), the pipeline passes the text.
COMPONENT_DEFAULT_EXCEPTIONS = {("prepare_dataset", "persona"): ""}


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.name)
def test_component_inputs_match_the_config(step):
    known = settings()
    for name, spec in step.component.component_spec.inputs.items():
        if name not in known:
            continue
        exception = COMPONENT_DEFAULT_EXCEPTIONS.get((step.name, name))
        assert spec.default == (known[name].default if exception is None else exception), f"{step.name}.{name}"
        if exception is None:
            assert " ".join((spec.description or "").split()) == known[name].help, f"{step.name}.{name}"
        annotation = inspect.signature(step.component.python_func).parameters[name].annotation
        assert annotation is known[name].type, f"{step.name}.{name}: {annotation} vs {known[name].type}"


# -- declared dependencies ----------------------------------------------------------------------------------------
# Imported only behind a find_spec check, on the GPU image whose torch build brings it.
OPTIONAL_WITHOUT_EXTRA = {"triton"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", item)[0]).lower() for item in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    """What kubetune imports is what pyproject.toml declares (directly, or in the extra of the feature that needs
    it), so an install with only the declared dependencies imports every module."""
    from importlib.metadata import packages_distributions, requires

    required = requires("kubetune") or []  # the installed metadata: pyproject.toml as setup.sh installed it
    declared = _requirement_names([item for item in required if "extra ==" not in item])
    extras = _requirement_names([item for item in required if "extra ==" in item])
    distributions = packages_distributions()
    undeclared = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "kubetune" or top in OPTIONAL_WITHOUT_EXTRA:
                    continue
                provided = _requirement_names(distributions.get(top, [top]))
                if not provided & (declared | extras):
                    undeclared.append(f"{path.relative_to(ROOT)}: {name} ({', '.join(sorted(provided))})")
    assert not undeclared, f"imports of undeclared distributions: {sorted(set(undeclared))}"
