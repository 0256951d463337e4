"""The step table: every pipeline step, named once, with what each registry needs to know about it.

The pipeline, the placement helper, the compiled component YAMLs, the plain Argo Workflow and the step commands
all read this table; a step's placement defaults (resources, accelerator, node selector) live in
``profiles.yaml`` under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.components import (
    evaluate_model,
    finish_run,
    prepare_dataset,
    quantize_model,
    resolve_sources,
    train_lora,
)


@dataclass(frozen=True)
class Step:
    name: str
    """The component's name, the KFP task (with dashes) and the key of the step in profiles.yaml."""
    command: str
    """The step command, ``kubetune <command>``: the container of the plain Argo Workflow."""
    component: object
    """The KFP component."""
    display_name: str
    """The task's name on the Kubeflow run page."""
    gpu: bool
    """Built for the GPU image and placed on GPU nodes; the others never hold a GPU."""
    secrets: tuple[str, ...]
    """Which optional Secrets become its environment: hub, mlflow, object_store (see PipelineOptions)."""
    cached: bool
    """Served from KFP's cache while its inputs are unchanged: these take the versions resolve_sources found, so
    a changed dataset or model behind the same name is a new key. The tracked steps never are (one MLflow run
    each), nor is resolve_sources (it looks at the sources afresh every run)."""
    cache_volume: bool
    """Mounts the model cache volume (HF_HOME, checkpoints) when the pipeline has one."""
    results: tuple[str, ...] = ()
    """Outputs the plain Argo Workflow can also keep in the cluster's artifact repository."""
    sources: dict[str, str] = field(default_factory=dict)
    """Inputs fed by an earlier step's output of another name (input → output); the rest match by name, and an
    earlier step's output takes precedence over the pipeline parameter of the same name."""
    grace_period_s: int = 0
    """The pod's terminationGracePeriodSeconds where the target can set it (plain Argo); 0 = the cluster's."""
    on_exit: bool = False
    """Runs once every other step has ended, whatever their state (KFP's exit handler, Argo's onExit); it takes
    only pipeline parameters and the run's identity, and receives the pipeline's final status."""

    @property
    def task(self) -> str:
        """The KFP task name: the component name with dashes."""
        return self.name.replace("_", "-")


PINNED = {"model_revision": "pinned_revision"}  # the hub commit resolve_sources found, not the branch name

STEPS: tuple[Step, ...] = (
    Step("resolve_sources", "resolve", resolve_sources, "Pin dataset and model versions", gpu=False,
         secrets=("hub", "object_store"), cached=False, cache_volume=True),
    Step("prepare_dataset", "prep", prepare_dataset, "Prepare dataset", gpu=False,
         secrets=("hub", "object_store"), cached=True, cache_volume=False, sources=PINNED),
    Step("quantize_model", "quantize", quantize_model, "Load model in 4-bit", gpu=False,
         secrets=("hub",), cached=True, cache_volume=True, sources=PINNED),
    # On SIGTERM SFT saves a checkpoint at the next step boundary: the grace period has to cover a step and a save.
    Step("train_lora", "train", train_lora, "LoRA SFT", gpu=True,
         secrets=("mlflow", "object_store"), cached=False, cache_volume=True, grace_period_s=600,
         results=("adapter", "metrics", "training_report")),
    Step("evaluate_model", "evaluate", evaluate_model, "Evaluate base vs tuned", gpu=True,
         secrets=("mlflow", "object_store"), cached=False, cache_volume=True,
         results=("report", "metrics", "mlflow_store"), sources={"training_mlflow_store": "mlflow_store"}),
    Step("finish_run", "finish", finish_run, "Close the MLflow run", gpu=False,
         secrets=("mlflow",), cached=False, cache_volume=False, on_exit=True),
)
BY_NAME: dict[str, Step] = {step.name: step for step in STEPS}
STEP_NAMES: tuple[str, ...] = tuple(BY_NAME)
GPU_STEPS: tuple[str, ...] = tuple(step.name for step in STEPS if step.gpu)


def by_task(task: str) -> Step:
    """The step of a KFP task name (``train-lora``)."""
    return BY_NAME[task.replace("-", "_")]
