"""The compiled KFP pipeline, read back: its parameters (names, types, defaults, descriptions) and its DAG (which
parameters and which upstream outputs feed each step). The plain Argo Workflow is built from this, so the two
forms of the pipeline never drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from kubetune.pipelines.finetune import finetune_pipeline
from kubetune.pipelines.step_table import BY_NAME, STEPS, Step

# KFP run placeholders → Argo variables.
RUNTIME_VALUES = {"{{$.pipeline_job_uuid}}": "{{workflow.uid}}", "{{$.pipeline_job_name}}": "{{workflow.name}}"}


@dataclass
class WorkflowParameter:
    name: str
    kfp_type: str
    default: str | None
    description: str = ""


@dataclass
class StepSpec:
    """One KFP task as the Argo builder needs it."""

    task: str  # KFP task name, e.g. train-lora
    step: Step  # its row in the step table
    inputs: dict[str, str]  # step flag → pipeline parameter
    constants: dict[str, str]  # step flag → literal or Argo variable
    artifacts_in: dict[str, tuple[str, str]]  # step flag → (producer task, producer output)
    artifacts_out: dict[str, str]  # step flag → schema title (system.Model, ...)
    dependencies: list[str]
    retry: dict[str, Any] | None  # KFP retryPolicy: maxRetryCount, backoffDuration, backoffFactor
    parameters_in: dict[str, tuple[str, str]] = field(default_factory=dict)  # flag → (producer task, output)
    parameters_out: list[str] = field(default_factory=list)  # output parameters (strings) the step writes
    final_status: str = ""  # the input that receives the pipeline's final status (the exit step's)


def spec_dict(pipeline=finetune_pipeline) -> dict[str, Any]:
    return json_format.MessageToDict(pipeline.pipeline_spec)


def parameter_value(value: Any, kfp_type: str) -> str:
    """A pipeline parameter value as the string an Argo parameter holds (and the step commands parse)."""
    if kfp_type == "BOOLEAN":
        return "true" if value else "false"
    if kfp_type == "NUMBER_INTEGER":
        return str(int(value))
    if kfp_type == "NUMBER_DOUBLE":
        return repr(float(value))
    if kfp_type in ("LIST", "STRUCT"):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def pipeline_parameters(spec: dict[str, Any] | None = None, order: list[str] | None = None) -> list[WorkflowParameter]:
    """The KFP pipeline's parameters with their defaults and descriptions, in ``order`` (the pipeline
    signature's, which the UI then shows) where given; the compiled spec itself keeps no order."""
    spec = spec or spec_dict()
    descriptions: dict[str, str] = {}
    for task in spec["root"]["dag"]["tasks"].values():
        component = spec["components"][task["componentRef"]["name"]]
        declared = component.get("inputDefinitions", {}).get("parameters", {})
        for flag, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source and declared.get(flag, {}).get("description"):
                descriptions.setdefault(source["componentInputParameter"], declared[flag]["description"])
    result = []
    definitions = spec["root"]["inputDefinitions"]["parameters"]
    rank = {name: i for i, name in enumerate(order or sorted(definitions))}
    for name, definition in sorted(definitions.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])):
        kfp_type = definition["parameterType"]
        default = parameter_value(definition["defaultValue"], kfp_type) if "defaultValue" in definition else None
        result.append(WorkflowParameter(name, kfp_type, default, definition.get("description") or
                                        descriptions.get(name, "")))
    return result


def container_tasks(spec: dict[str, Any]) -> list[tuple[str, dict, dict, dict[str, str]]]:
    """Every container task, nested DAGs (the exit handler's group) included: (name, task, component, the group's
    channel names → pipeline parameters)."""
    found = []

    def visit(dag: dict[str, Any], channels: dict[str, str]) -> None:
        for name, task in dag.get("tasks", {}).items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" not in component:
                found.append((name, task, component, channels))
                continue
            inner = {key: channels.get(source["componentInputParameter"], source["componentInputParameter"])
                     for key, source in task.get("inputs", {}).get("parameters", {}).items()
                     if "componentInputParameter" in source}
            visit(component["dag"], inner)

    visit(spec["root"]["dag"], {})
    return found


def pipeline_steps(spec: dict[str, Any] | None = None) -> list[StepSpec]:
    """The KFP DAG's tasks: which pipeline parameters and which upstream outputs feed each step (a group such as
    the exit handler's is looked through: its tasks are the steps)."""
    spec = spec or spec_dict()
    steps = []
    for task_name, task, component, channels in container_tasks(spec):
        if task_name.replace("-", "_") not in BY_NAME:
            raise ValueError(f"KFP task {task_name} is not in the step table")
        inputs, constants, artifacts_in, parameters_in, final_status = {}, {}, {}, {}, ""
        for flag, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                inputs[flag] = channels.get(source["componentInputParameter"], source["componentInputParameter"])
            elif "runtimeValue" in source:
                constant = source["runtimeValue"]["constant"]
                constants[flag] = RUNTIME_VALUES.get(constant, constant) if isinstance(constant, str) else \
                    json.dumps(constant)
            elif "taskOutputParameter" in source:
                producer = source["taskOutputParameter"]
                parameters_in[flag] = (producer["producerTask"], producer["outputParameterKey"])
            elif "taskFinalStatus" in source:
                final_status = flag
            else:
                raise ValueError(f"KFP task {task_name} input {flag} comes from {source}, which Argo cannot map")
        for flag, source in task.get("inputs", {}).get("artifacts", {}).items():
            producer = source["taskOutputArtifact"]
            artifacts_in[flag] = (producer["producerTask"], producer["outputArtifactKey"])
        outputs = component.get("outputDefinitions", {})
        steps.append(StepSpec(
            task=task_name, step=BY_NAME[task_name.replace("-", "_")], inputs=inputs, constants=constants,
            artifacts_in=artifacts_in,
            artifacts_out={flag: out["artifactType"]["schemaTitle"]
                           for flag, out in outputs.get("artifacts", {}).items()},
            dependencies=[] if final_status else sorted(task.get("dependentTasks", [])),
            retry=task.get("retryPolicy"),
            parameters_in=parameters_in,
            parameters_out=sorted(outputs.get("parameters", {})),
            final_status=final_status,
        ))
    return sorted(steps, key=lambda spec: STEPS.index(spec.step))
