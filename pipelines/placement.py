"""The one GPU-placement helper: resources, accelerator, node selector, tolerations and /dev/shm per step.

Profiles live in ``profiles.yaml`` beside this file; CLI flags override single fields. kfp.local ignores all of
this, so tests assert it on the compiled YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kfp import kubernetes
from kubetune.pipelines.step_table import GPU_STEPS, STEP_NAMES

from kubetune.errors import KubetuneError
from kubetune.modeling import REQUIRE_GPU_ANNOTATION, REQUIRE_GPU_ENV


@dataclass
class StepPlacement:
    """Where one step runs and what it may use."""

    cpu: str = ""
    memory: str = ""
    cpu_limit: str = ""
    memory_limit: str = ""
    accelerator: str = ""
    accelerator_count: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    shm_size: str = ""
    timeout_s: int = 0

    @property
    def uses_gpu(self) -> bool:
        return bool(self.accelerator) and self.accelerator_count > 0


@dataclass
class Profile:
    name: str
    description: str
    steps: dict[str, StepPlacement]


def _load_raw() -> dict[str, Any]:
    import yaml

    text = resources.files("kubetune.pipelines").joinpath("profiles.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def profile_names() -> list[str]:
    return sorted(_load_raw())


def load_profile(name: str = "default") -> Profile:
    raw = _load_raw()
    if name not in raw:
        raise KubetuneError(f"placement profile {name!r} is unknown", f"use one of: {', '.join(sorted(raw))}")
    known = {f.name for f in dataclasses.fields(StepPlacement)}
    steps: dict[str, StepPlacement] = {}
    for step in STEP_NAMES:
        values = raw[name]["steps"].get(step, {})
        unknown = set(values) - known
        if unknown:
            raise KubetuneError(
                f"profile {name!r} step {step} has unknown fields {sorted(unknown)}", f"use only {sorted(known)}"
            )
        steps[step] = StepPlacement(**values)
    return Profile(name, raw[name].get("description", ""), steps)


def override(profile: Profile, *, gpu_type: str = "", gpu_count: int = 0, node_selector: dict[str, str] | None = None,
             tolerations: list[dict[str, Any]] | None = None) -> Profile:
    """Apply CLI overrides to the GPU steps of a profile."""
    for step in GPU_STEPS:
        placement = profile.steps[step]
        if gpu_type:
            placement.accelerator = gpu_type
        if gpu_count:
            placement.accelerator_count = gpu_count
        if node_selector:
            placement.node_selector = {**placement.node_selector, **node_selector}
        if tolerations:
            placement.tolerations = [*placement.tolerations, *tolerations]
    return profile


def gpu_node_selector_default(profile: Profile) -> dict[str, str]:
    """The static node selector the GPU steps share: the default of the run-time ``gpu_node_selector``
    parameter. The parameter replaces the selector of both GPU steps, so they must agree."""
    selectors = {step: profile.steps[step].node_selector for step in GPU_STEPS if profile.steps[step].uses_gpu}
    distinct = {tuple(sorted(selector.items())) for selector in selectors.values()}
    if len(distinct) > 1:
        raise KubetuneError(
            f"profile {profile.name!r} gives the GPU steps different node selectors {selectors}, but the run-time "
            "gpu_node_selector parameter sets one selector for both",
            "give train_lora and evaluate_model the same node_selector, or compile without the run-time override "
            "(PipelineOptions(runtime_gpu_node_selector=False), `--static-gpu-node-selector`)",
        )
    return dict(next(iter(selectors.values()), {}))


def apply_placement(task, placement: StepPlacement, *, gpu_node_selector=None):
    """Set resources and scheduling on a KFP task.

    ``gpu_node_selector`` is a pipeline parameter (a dict) that sets a GPU step's node selector at run time.
    The KFP driver lets a JSON selector replace the static labels outright (labels written beside it are
    ignored), so with the parameter the static selector is not written here: it is the parameter's default
    (see :func:`gpu_node_selector_default`) and the Kubeflow UI shows it.
    """
    if placement.cpu:
        task.set_cpu_request(placement.cpu)
    if placement.memory:
        task.set_memory_request(placement.memory)
    if placement.cpu_limit:
        task.set_cpu_limit(placement.cpu_limit)
    if placement.memory_limit:
        task.set_memory_limit(placement.memory_limit)
    runtime_selector = placement.uses_gpu and gpu_node_selector is not None
    if placement.uses_gpu:
        task.set_accelerator_type(placement.accelerator)
        task.set_accelerator_limit(placement.accelerator_count)
        # The step stops with a clear error when its pod got no usable GPU. Through the pod's annotation rather
        # than a plain env variable, which kfp.local would apply to CPU runs as well.
        kubernetes.add_pod_annotation(task, REQUIRE_GPU_ANNOTATION, placement.accelerator)
        kubernetes.use_field_path_as_env(task, REQUIRE_GPU_ENV, f"metadata.annotations['{REQUIRE_GPU_ANNOTATION}']")
    if runtime_selector:
        kubernetes.add_node_selector_json(task, gpu_node_selector)
    else:
        for key, value in placement.node_selector.items():
            kubernetes.add_node_selector(task, key, value)
    for toleration in placement.tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.get("key"),
            operator=toleration.get("operator"),
            value=toleration.get("value"),
            effect=toleration.get("effect"),
            toleration_seconds=toleration.get("toleration_seconds"),
        )
    if placement.shm_size:
        # PyTorch data loaders and NCCL use /dev/shm; the container default (64 MiB) is far too small.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=placement.shm_size)
    if placement.timeout_s:
        # activeDeadlineSeconds: per pod, so each retry gets the full time again.
        kubernetes.set_timeout(task, placement.timeout_s)
    return task
