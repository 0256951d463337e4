"""The fine-tuning pipeline as a plain Argo Workflow, for clusters that run Argo without Kubeflow.

Built with Hera from the compiled KFP pipeline, so the two never drift: the workflow's parameters are the KFP
pipeline's (names, defaults, descriptions), and the DAG, each step's inputs and which step's output feeds which
are read from the KFP spec. Each step is a container running ``python -m kubetune.cli <step>`` on the
kubetune images, with placement (resources, GPUs, node selector, tolerations, /dev/shm, timeouts) from the same
profiles as the KFP pipeline. Steps pass data through a volume mounted at ``/workspace``: an existing claim
(``--pvc``) or one created per workflow from a volumeClaimTemplate, which Argo deletes when the workflow
succeeds (``volumeClaimGC: OnWorkflowSuccess``) and keeps when it fails, so ``argo retry`` resumes training from
its checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.containers.images import resolve_images, version_tag
from kubetune.pipelines.finetune import (
    GCS_KEY_DIR,
    GPU_NODE_SELECTOR,
    PipelineOptions,
    make_pipeline,
)
from kubetune.pipelines.kfp_spec import (
    StepSpec,
    parameter_value,
    pipeline_parameters,
    pipeline_steps,
    spec_dict,
)
from kubetune.pipelines.step_table import Step

from kubetune import __version__
from kubetune.errors import KubetuneError, collect
from kubetune.modeling import REQUIRE_GPU_ENV
from kubetune.parameters import validate_parameters
from kubetune.storage import atomic_file

if TYPE_CHECKING:
    from hera.workflows import Workflow

WORKSPACE = "/workspace"
PARAMETER_DIR = "/tmp/kubetune-outputs"
RUN_DIR = f"{WORKSPACE}/runs/{{{{workflow.name}}}}"
DAG_NAME = "finetune"
GENERATE_NAME = "kubetune-finetune-"
DEFAULT_PVC_SIZE = "100Gi"
DEFAULT_NAMESPACE = "argo"
TTL_AFTER_SUCCESS_S = 7 * 24 * 3600
TTL_AFTER_FAILURE_S = 14 * 24 * 3600
# Retry crashes, OOM kills and lost nodes; not a user error (exit 2: kubetune's clear errors and bad flags).
RETRY_EXPRESSION = 'lastRetry.status == "Error" || asInt(lastRetry.exitCode) != 2'

# File names on the volume follow the artifact type; a Model is a directory.
EXTENSIONS = {"system.Dataset": ".parquet", "system.Metrics": ".json", "system.Markdown": ".md",
              "system.HTML": ".html"}


@dataclass
class ArgoOptions:
    """Choices that exist only for the Argo form of the pipeline; placement and images are PipelineOptions."""

    pvc: str = ""
    """Existing PersistentVolumeClaim mounted at /workspace; empty = a claim created per workflow."""
    pvc_size: str = ""
    """Size of the created claim (default 100Gi: a 7B model download, its 4-bit copy, data and checkpoints)."""
    storage_class: str = ""
    """Storage class of the created claim; empty = the cluster default."""
    access_mode: str = "ReadWriteOnce"
    """ReadWriteOnce works everywhere (parallel steps then wait for one node); ReadWriteMany lets them spread."""
    service_account: str = ""
    artifacts: bool = False
    """Also save adapter, report and metrics to the artifact repository (needs one configured)."""
    active_deadline_seconds: int = 0
    """Deadline of the whole workflow; 0 = the longest path of step timeouts, retries included."""
    generate_name: str = GENERATE_NAME

    def validate(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.pvc and (self.pvc_size or self.storage_class):
            problems.append((f"--pvc {self.pvc} names an existing claim; --pvc-size/--storage-class only shape a "
                             "created one", "pass either --pvc NAME or --pvc-size/--storage-class"))
        if self.pvc and not _DNS_NAME.match(self.pvc):
            problems.append((f"--pvc {self.pvc!r} is not a Kubernetes object name",
                             "use the claim's name as `kubectl get pvc` shows it"))
        if self.pvc_size and not _QUANTITY.match(self.pvc_size):
            problems.append((f"--pvc-size {self.pvc_size!r} is not a storage size", "write e.g. 200Gi or 1Ti"))
        if self.access_mode not in ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"):
            problems.append((f"access mode {self.access_mode!r} is unknown", "use ReadWriteOnce or ReadWriteMany"))
        if self.active_deadline_seconds < 0:
            problems.append(("the workflow deadline is negative", "use seconds > 0, or 0 for the computed one"))
        collect(problems)


_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def artifact_path(task: str, output: str, schema_title: str) -> str:
    """Where a step's output lives on the volume: ``/workspace/runs/<workflow>/<task>/<output>[.ext]``."""
    return f"{RUN_DIR}/{task}/{output}{EXTENSIONS.get(schema_title, '')}"



# -- the workflow ----------------------------------------------------------------------------------------------
def _seconds(duration: str) -> int:
    """KFP durations are protobuf Duration strings such as ``60s``."""
    return int(float(duration.rstrip("s") or 0))


def _retry_strategy(retry: dict[str, Any] | None):
    """The KFP task's retryPolicy as an Argo retryStrategy (limit, backoff duration and factor)."""
    from hera.workflows import RetryStrategy
    from hera.workflows import models as m

    if not retry or not retry.get("maxRetryCount"):
        return None
    # backoffMaxDuration is left out: Argo's maxDuration bounds the time since the step *started*, which would
    # forbid any retry of a training step that ran longer than an hour.
    return RetryStrategy(
        limit=str(int(retry["maxRetryCount"])), retry_policy="Always", expression=RETRY_EXPRESSION,
        backoff=m.Backoff(duration=f"{_seconds(retry.get('backoffDuration', '0s'))}s",
                          factor=str(max(1, round(float(retry.get("backoffFactor", 1)))))),
    )


def _critical_path_s(steps: list[StepSpec], profile) -> int:
    """Longest path through the DAG, each step at its timeout times its attempts plus the backoff between."""
    finish: dict[str, int] = {}
    for step in steps:  # already in DAG order
        if step.final_status:  # onExit runs after the workflow's deadline too
            continue
        timeout = profile.steps[step.step.name].timeout_s
        if not timeout:
            return 0
        retry = step.retry or {}
        retries, delay = int(retry.get("maxRetryCount", 0)), _seconds(retry.get("backoffDuration", "0s"))
        backoff = int(sum(delay * float(retry.get("backoffFactor", 1)) ** i for i in range(retries)))
        finish[step.task] = max((finish[d] for d in step.dependencies), default=0) + timeout * (1 + retries) + backoff
    return max(finish.values())


def _pod_spec_patch(step: Step, gpu_selector: bool) -> str | None:
    """The run-time GPU node selector and the step's termination grace period, as Argo's podSpecPatch."""
    fields = [f'"nodeSelector": {{{{workflow.parameters.{GPU_NODE_SELECTOR}}}}}'] if gpu_selector else []
    if step.grace_period_s:
        fields.append(f'"terminationGracePeriodSeconds": {step.grace_period_s}')
    return "{" + ", ".join(fields) + "}" if fields else None


def _secret_env(step: Step, options: PipelineOptions) -> tuple[list, list]:
    """(env, volumes) for the credentials a step needs, from the same optional Secrets as the KFP pipeline."""
    from hera.workflows import Env, SecretEnv, SecretVolume

    env: list = [SecretEnv(name=key, secret_name=options.secret(kind), secret_key=key, optional=True)
                 for kind in step.secrets if options.secret(kind) for key in options.secret_keys(kind)]
    if options.mlflow_uri and "mlflow" in step.secrets:
        env.append(Env(name="MLFLOW_TRACKING_URI", value=options.mlflow_uri))
    volumes: list = []
    if options.gcs_secret and "object_store" in step.secrets:
        volumes.append(SecretVolume(name="gcs-key", secret_name=options.gcs_secret, optional=True,
                                    mount_path=GCS_KEY_DIR))
        env.append(Env(name="GOOGLE_APPLICATION_CREDENTIALS", value=f"{GCS_KEY_DIR}/{options.gcs_key_file}"))
    return env, volumes


def build_workflow(options: PipelineOptions | None = None, argo: ArgoOptions | None = None,
                   params: dict[str, Any] | None = None) -> Workflow:
    """The Hera Workflow for these options (``kubetune.pipelines.PipelineOptions``: placement profile, images,
    Secrets, non-root uid) and ``argo`` (volume, artifacts, deadline).

    ``params`` overrides parameter defaults by name (typed values).
    """
    # Hera is the optional ``argo`` extra: imported here, so the rest of kubetune works without it.
    from hera.workflows import (
        DAG,
        Artifact,
        Container,
        EmptyDirVolume,
        Env,
        NoneArchiveStrategy,
        Parameter,
        Resources,
        Task,
        Workflow,
    )
    from hera.workflows import models as m

    # The KFP model-cache volume is KFP's own; here the workspace volume holds the cache and the checkpoints.
    options = dataclasses.replace(options or PipelineOptions(), cache_volume="")
    argo = argo or ArgoOptions()
    argo.validate()
    pipeline = make_pipeline(options)
    spec = spec_dict(pipeline)
    parameters = pipeline_parameters(spec, list(pipeline.component_spec.inputs or {}))
    steps = pipeline_steps(spec)
    kinds = {p.name: p.kfp_type for p in parameters}
    unknown = sorted(set(params or {}) - set(kinds))
    if unknown:
        raise KubetuneError(f"unknown pipeline parameter(s) {', '.join(unknown)}", f"use one of: {', '.join(kinds)}")
    validate_parameters(params or {})
    overrides = {name: parameter_value(value, kinds[name]) for name, value in (params or {}).items()}
    runtime_selector = GPU_NODE_SELECTOR in kinds
    images = resolve_images(options.cpu_image or None, options.gpu_image or None)
    outputs = {(step.task, flag): artifact_path(step.task, flag, kind)
               for step in steps for flag, kind in step.artifacts_out.items()}
    # Output parameters a later step reads (the pinned versions): a file Argo reads back after the step.
    consumed = {source for step in steps for source in step.parameters_in.values()}
    parameter_files = {source: f"{PARAMETER_DIR}/{source[1]}" for source in consumed}
    non_root = options.run_as_user is not None
    container_security = m.SecurityContext(allow_privilege_escalation=False, capabilities=m.Capabilities(drop=["ALL"]),
                                           run_as_non_root=True if non_root else None)

    templates: dict[str, Container] = {}
    for step in steps:
        placement = options.profile.steps[step.step.name]
        resources = Resources(
            cpu_request=placement.cpu or None, cpu_limit=placement.cpu_limit or None,
            memory_request=placement.memory or None, memory_limit=placement.memory_limit or None,
            **({"gpus": placement.accelerator_count, "gpu_flag": placement.accelerator} if placement.uses_gpu else {}),
        )
        inputs = [*step.inputs, *step.constants, *step.parameters_in]
        if step.final_status:  # onExit: no arguments reach it, it reads the workflow's own variables
            args = [f"--{flag}={{{{workflow.parameters.{source}}}}}" for flag, source in step.inputs.items()]
            args += [f"--{flag}={value}" for flag, value in step.constants.items()]
            # {{workflow.failures}} is undefined when nothing failed (and then breaks the template); the step
            # names the failed step from the MLflow run instead.
            args.append("--status={{workflow.status}}")
            inputs = []
        else:
            args = [f"--{flag}={{{{inputs.parameters.{flag}}}}}" for flag in inputs]
        args += [f"--{flag}={outputs[source]}" for flag, source in step.artifacts_in.items()]
        args += [f"--{flag}={outputs[(step.task, flag)]}" for flag in step.artifacts_out]
        written = [name for name in step.parameters_out if (step.task, name) in parameter_files]
        args += [f"--{name}={parameter_files[(step.task, name)]}" for name in written]
        secret_env, secret_volumes = _secret_env(step.step, options)
        gpu_selector_patch = runtime_selector and placement.uses_gpu
        result_artifacts = [
            Artifact(name=flag, path=outputs[(step.task, flag)],
                     archive=None if step.artifacts_out[flag] == "system.Model" else NoneArchiveStrategy())
            for flag in step.step.results if argo.artifacts
        ]
        volumes = [*secret_volumes]
        if placement.shm_size:
            # PyTorch data loaders and NCCL use /dev/shm; the container default (64 MiB) is far too small.
            volumes.append(EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory",
                                          size_limit=placement.shm_size))
        templates[step.task] = Container(
            name=step.task,
            image=images.gpu if placement.uses_gpu else images.cpu,
            command=["python", "-m", "kubetune.cli", step.step.command],
            args=args,
            working_dir=WORKSPACE,
            inputs=[Parameter(name=flag) for flag in inputs] or None,
            outputs=[*result_artifacts, *[Parameter(name=name, value_from=m.ValueFrom(
                path=parameter_files[(step.task, name)])) for name in written]] or None,
            # Model downloads land on the volume: an existing claim keeps them between runs.
            env=[
                Env(name="HF_HOME", value=f"{WORKSPACE}/.cache/huggingface"),
                *([Env(name=REQUIRE_GPU_ENV, value=placement.accelerator)] if placement.uses_gpu else []),
                *secret_env,
            ],
            resources=resources,
            node_selector=None if gpu_selector_patch else placement.node_selector or None,
            pod_spec_patch=_pod_spec_patch(step.step, gpu_selector_patch),
            tolerations=[m.Toleration(**toleration) for toleration in placement.tolerations] or None,
            volume_mounts=[m.VolumeMount(name="workspace", mount_path=WORKSPACE)],
            volumes=volumes or None,
            retry_strategy=_retry_strategy(step.retry),
            # per pod, so each retry gets the full time again
            active_deadline_seconds=str(placement.timeout_s) if placement.timeout_s else None,
            security_context=container_security,
        )

    dag = DAG(name=DAG_NAME, tasks=[
        Task(
            name=step.task,
            template=templates[step.task],
            dependencies=step.dependencies or None,
            arguments=[Parameter(name=flag, value=f"{{{{workflow.parameters.{source}}}}}")
                       for flag, source in step.inputs.items()]
            + [Parameter(name=flag, value=value) for flag, value in step.constants.items()]
            + [Parameter(name=flag, value=f"{{{{tasks.{task}.outputs.parameters.{key}}}}}")
               for flag, (task, key) in step.parameters_in.items()],
        )
        for step in steps if not step.final_status
    ])
    on_exit = next((step.task for step in steps if step.final_status), None)
    if argo.pvc:
        volumes = [m.Volume(name="workspace",
                            persistent_volume_claim=m.PersistentVolumeClaimVolumeSource(claim_name=argo.pvc))]
        claim_templates = None
    else:
        volumes = None
        claim_templates = [m.PersistentVolumeClaim(
            metadata=m.ObjectMeta(name="workspace"),
            spec=m.PersistentVolumeClaimSpec(
                access_modes=[argo.access_mode],
                storage_class_name=argo.storage_class or None,
                resources=m.VolumeResourceRequirements(
                    requests={"storage": m.Quantity(root=argo.pvc_size or DEFAULT_PVC_SIZE)}),
            ),
        )]
    deadline = argo.active_deadline_seconds or _critical_path_s(steps, options.profile)
    uid = options.run_as_user
    return Workflow(
        generate_name=argo.generate_name,
        labels={"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/version": version_tag(__version__),
                "kubetune/placement-profile": options.profile.name},
        annotations={"workflows.argoproj.io/description": spec["pipelineInfo"].get("description", "")},
        entrypoint=DAG_NAME,
        # closes the MLflow run with the workflow's final state, whatever ended it
        on_exit=on_exit,
        arguments=[Parameter(name=p.name, value=overrides.get(p.name, p.default), description=p.description or None)
                   for p in parameters],
        templates=[dag, *templates.values()],
        volumes=volumes,
        volume_claim_templates=claim_templates,
        # a failed run keeps its volume, so `argo retry` resumes training from the checkpoints on it
        volume_claim_gc=None if argo.pvc else m.VolumeClaimGC(strategy="OnWorkflowSuccess"),
        active_deadline_seconds=deadline or None,
        pod_gc=m.PodGC(strategy="OnPodSuccess"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=TTL_AFTER_SUCCESS_S,
                                   seconds_after_failure=TTL_AFTER_FAILURE_S),
        security_context=m.PodSecurityContext(
            run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
            fs_group_change_policy="OnRootMismatch", seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
        ) if non_root else m.PodSecurityContext(seccomp_profile=m.SeccompProfile(type="RuntimeDefault")),
        service_account_name=argo.service_account or None,
    )


def workflow_manifest(workflow) -> dict[str, Any]:
    """The Workflow as the plain dict that goes into the YAML file and the Argo Server request."""
    return workflow.to_dict()


def write_workflow(workflow: Workflow, path: str | os.PathLike) -> str:
    with atomic_file(path) as staging:
        Path(staging).write_text(workflow.to_yaml(allow_unicode=True, width=120), encoding="utf-8")
    return str(path)
