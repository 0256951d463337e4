"""The kubetune fine-tuning pipeline: dataset prep → 4-bit model load → LoRA SFT → evaluation.

One pipeline, built by :func:`make_pipeline` from compile-time options (placement profile, images, volume,
secrets, security). Run-time settings are pipeline parameters, the names the Kubeflow UI shows: their names,
types, defaults and descriptions come from the config dataclasses (:func:`kubetune.parameters.pipeline_settings`),
and each step receives the parameters its component declares by the same name. Everything Kubernetes-specific
here is ignored by kfp.local, so ``kubetune run --local`` runs the same pipeline.
"""

import inspect
import re
from dataclasses import dataclass, field
from typing import Optional

from kfp import compiler, dsl, kubernetes
from kubetune.pipelines.placement import Profile, apply_placement, gpu_node_selector_default, load_profile
from kubetune.pipelines.step_table import STEPS, Step

from kubetune.errors import collect
from kubetune.parameters import pipeline_settings
from kubetune.secrets import redact, without_credentials

PIPELINE_NAME = "kubetune-finetune"
GPU_NODE_SELECTOR = "gpu_node_selector"
GPU_NODE_SELECTOR_HELP = (
    "Node selector of the GPU steps (SFT, evaluation), e.g. "
    '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; replaces the compiled default; {} = any GPU node.'
)

CACHE_MOUNT = "/cache"
"""Where the model-cache volume is mounted (the images' HF_HOME and Triton cache live under it)."""
HF_HOME = f"{CACHE_MOUNT}/huggingface"
CHECKPOINT_ROOT = f"{CACHE_MOUNT}/checkpoints"
GCS_KEY_DIR = "/var/secrets/gcs"
CREATE = "create"

# Each Secret's keys become environment variables of the same name; a missing Secret or key is skipped. Which
# steps get which Secret is the step table's ``secrets``.
SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "hub": ("HF_TOKEN",),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"),
    "object_store": (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
        "MLFLOW_S3_ENDPOINT_URL",
    ),
}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _option(default, help_text: str, **kwargs):
    """A compile-time option with the help text its command-line flag shows."""
    return field(default=default, metadata={"help": help_text, **kwargs})


@dataclass
class PipelineOptions:
    """Compile-time choices; everything else is a run-time pipeline parameter."""

    profile: Profile = field(default_factory=load_profile)
    cpu_image: str = ""
    gpu_image: str = ""
    cache_volume: str = _option(
        "", "volume for model downloads and SFT checkpoints: an existing PVC mounted at /cache (kept between runs), "
        "or 'create' for the run's KFP workspace (created with the run, deleted after it)", metavar="CLAIM|create")
    cache_volume_size: str = _option("200Gi", "size of a created cache volume (the run's workspace)")
    cache_volume_storage_class: str = _option("", "storage class of a created cache volume ('' = the workspace "
                                              "default of the KFP installation)")
    cache_volume_access_mode: str = _option("ReadWriteOnce", "access mode of a created cache volume",
                                            choices=("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"))
    hub_secret: str = _option("kubetune-hub", "Secret with HF_TOKEN ('' = none)")
    mlflow_uri: str = _option(
        "", "MLflow tracking server of the SFT and evaluation steps (their MLFLOW_TRACKING_URI), e.g. "
        "http://mlflow.mlflow:5000; '' = the MLflow Secret's MLFLOW_TRACKING_URI or the mlflow_tracking_uri parameter")
    mlflow_secret: str = _option(
        "kubetune-mlflow", "Secret with MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD or "
        "MLFLOW_TRACKING_TOKEN ('' = none)")
    object_store_secret: str = _option(
        "kubetune-object-store", "Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL ('' = none)")
    gcs_secret: str = _option("", "Secret with a GCP service-account key.json ('' = none)")
    gcs_key_file: str = "key.json"
    runtime_gpu_node_selector: bool = True
    """Add the ``gpu_node_selector`` pipeline parameter (default: the profile's GPU selector)."""
    run_as_user: Optional[int] = _option(1000, "non-root uid of every step")  # noqa: UP045 - read at runtime
    retries: int = _option(2, "retries of SFT and evaluation, with backoff")
    """Retries of the GPU steps (SFT resumes from its last checkpoint), with exponential backoff."""
    retry_backoff: str = "60s"
    cache_prep_and_model: bool = True

    def validate(self) -> None:
        problems: list[tuple[str, str]] = []
        volume = self.cache_volume.strip()
        if volume and volume != CREATE and not _DNS_SUBDOMAIN.match(volume):
            problems.append((f"cache_volume {volume!r} is not a PersistentVolumeClaim name",
                             "use a lower-case claim name such as model-cache, or 'create'"))
        if self.cache_volume_access_mode not in ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"):
            problems.append((f"cache_volume_access_mode {self.cache_volume_access_mode!r} is not writable",
                             "use ReadWriteOnce (steps run one after another) or ReadWriteMany"))
        for kind in SECRET_KEYS:
            value = self.secret(kind)
            if value and not _DNS_SUBDOMAIN.match(value):
                problems.append((f"{kind}_secret {value!r} is not a Kubernetes Secret name",
                                 "use a lower-case name such as kubetune-hub, or '' for none"))
        if self.gcs_secret and not _DNS_SUBDOMAIN.match(self.gcs_secret):
            problems.append((f"gcs_secret {self.gcs_secret!r} is not a Kubernetes Secret name",
                             "use a lower-case name such as kubetune-gcs, or '' for none"))
        if self.mlflow_uri and "://" not in self.mlflow_uri:
            problems.append((f"mlflow_uri {redact(self.mlflow_uri)!r} is not a URI",
                             "use the tracking server's URL, e.g. http://mlflow.mlflow:5000"))
        elif without_credentials(self.mlflow_uri) != self.mlflow_uri:
            problems.append(("mlflow_uri holds credentials (user:password@), which would be written into the "
                             "compiled YAML", "give the plain URL, and the credentials as MLFLOW_TRACKING_USERNAME/"
                             f"PASSWORD in the Secret {self.mlflow_secret or 'kubetune-mlflow'}"))
        if self.retries < 0:
            problems.append((f"retries={self.retries} is negative", "use 0 for no retries"))
        if self.run_as_user is not None and self.run_as_user <= 0:
            problems.append((f"run_as_user={self.run_as_user} is root", "use a non-root uid such as 1000"))
        collect(problems)

    def secret(self, kind: str) -> str:
        """The Secret name of a kind in :data:`SECRET_KEYS` ("" = none)."""
        return getattr(self, f"{kind}_secret")

    def secret_keys(self, kind: str) -> tuple[str, ...]:
        """The keys taken from a Secret of this kind: a compiled --mlflow-uri replaces the Secret's URI."""
        return tuple(key for key in SECRET_KEYS[kind] if not (key == "MLFLOW_TRACKING_URI" and self.mlflow_uri))

    def tracking_plan(self, params: dict | None = None) -> str:
        """What the SFT and evaluation steps will log to, in a sentence (``params``: the run's parameters)."""
        uri = str((params or {}).get("mlflow_tracking_uri", "")).strip()
        if uri:
            return f"MLflow: the SFT and evaluation steps log to {redact(uri)} (mlflow_tracking_uri)."
        if self.mlflow_uri:
            return f"MLflow: the SFT and evaluation steps log to {redact(self.mlflow_uri)} (--mlflow-uri)."
        secret = f"the MLFLOW_TRACKING_URI key of the Secret {self.mlflow_secret} if it has one, else " \
            if self.mlflow_secret else ""
        fallback = ("keep their records in their mlflow_store output (mlflow_required=false; `kubetune "
                    "mlflow-import` loads them into a server)") if (params or {}).get("mlflow_required") is False \
            else "stop at start with the fix (set mlflow_required=false to keep the records in their outputs instead)"
        return (f"MLflow: the SFT and evaluation steps log to the mlflow_tracking_uri parameter, else {secret}the "
                f"pod's MLFLOW_TRACKING_URI (Kubeflow's MLflow integration sets it); with none of these they "
                f"{fallback}.")


def _docstring(descriptions: dict[str, str]) -> str:
    """A Google-style docstring whose Args section KFP turns into the parameter descriptions of the UI."""
    args = "\n".join(f"    {name}: {text}" for name, text in descriptions.items())
    return f"QLoRA fine-tuning pipeline.\n\nArgs:\n{args}\n"


def _step_inputs(step: Step, params: dict, constants: dict, available: dict) -> dict:
    """The inputs of a step's component that the pipeline feeds, by name: pipeline parameters and constants, and
    earlier steps' outputs (which take precedence, e.g. the pinned model revision over the branch name)."""
    declared = step.component.component_spec.inputs or {}
    upstream = {name: available[step.sources.get(name, name)] for name in declared
                if step.sources.get(name, name) in available}
    return {name: value for name, value in {**params, **constants}.items() if name in declared} | upstream


def _constants(options: PipelineOptions) -> dict:
    """Inputs the pipeline sets itself: the run's identity, the volume directories and the GPU count."""
    train_placement = options.profile.steps["train_lora"]
    volume = {"": "", CREATE: dsl.WORKSPACE_PATH_PLACEHOLDER}.get(options.cache_volume, CACHE_MOUNT)
    return {
        "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        "checkpoint_root": CHECKPOINT_ROOT if volume == CACHE_MOUNT else volume,
        "cache_root": volume,
        # one process per GPU: the accelerator count sets both the pod's GPU request and the DDP world size
        "num_gpus": max(train_placement.accelerator_count, 1) if train_placement.uses_gpu else 1,
    }


def make_pipeline(options: Optional[PipelineOptions] = None):  # noqa: UP045 - kfp reads annotations at runtime
    """Build the pipeline function for these options (compile it, or call it under kfp.local)."""
    options = options or PipelineOptions()
    options.validate()
    settings = pipeline_settings()
    parameters = [inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=s.default,
                                    annotation=s.type) for s in settings]
    descriptions = {s.name: s.help for s in settings}
    if options.runtime_gpu_node_selector:
        parameters.append(inspect.Parameter(GPU_NODE_SELECTOR, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=gpu_node_selector_default(options.profile), annotation=dict))
        descriptions[GPU_NODE_SELECTOR] = GPU_NODE_SELECTOR_HELP
    constants = _constants(options)

    def finetune(*values):
        params = dict(zip([p.name for p in parameters], values, strict=True))
        selector = params.pop(GPU_NODE_SELECTOR, None)
        available: dict = {}  # every earlier step's outputs by name: they feed later inputs of the same name
        tasks = {}

        def add(step: Step):
            task = step.component(**_step_inputs(step, params, constants, available))
            task.set_display_name(step.display_name)
            _place(task, step, options, selector)
            available.update({name: task.outputs[name] for name in step.component.component_spec.outputs or {}})
            tasks[step.name] = task

        # The exit step runs after the others however they ended (an OOM kill, eviction or cancel included), so
        # the MLflow run is closed with the pipeline's real final state.
        for step in STEPS:
            if step.on_exit:
                add(step)
        exit_task = next(tasks[step.name] for step in STEPS if step.on_exit)
        with dsl.ExitHandler(exit_task, name="fine-tune"):
            for step in STEPS:
                if not step.on_exit:
                    add(step)
        if options.cache_volume and options.cache_volume != CREATE:
            for step in STEPS:
                if step.cache_volume:
                    kubernetes.mount_pvc(tasks[step.name], pvc_name=options.cache_volume, mount_path=CACHE_MOUNT)
                    tasks[step.name].set_env_variable("HF_HOME", HF_HOME)

    finetune.__signature__ = inspect.Signature(parameters)
    finetune.__doc__ = _docstring(descriptions)
    return dsl.pipeline(
        name=PIPELINE_NAME,
        display_name="kubetune: QLoRA fine-tuning",
        description="QLoRA fine-tuning: dataset prep (CPU) → 4-bit model load (CPU) → LoRA SFT (GPU) → "
        "base-vs-tuned evaluation (GPU), logged to MLflow; the MLflow run is closed with the pipeline's final state.",
        pipeline_config=_pipeline_config(options),
    )(finetune)


def _pipeline_config(options: PipelineOptions) -> Optional[dsl.PipelineConfig]:  # noqa: UP045
    """``cache_volume=create``: KFP's per-run workspace volume (created with the run, deleted after it) holds the
    model download and the SFT checkpoints, so a retried pod resumes."""
    if options.cache_volume != CREATE:
        return None
    patch = {"accessModes": [options.cache_volume_access_mode]}
    if options.cache_volume_storage_class:
        patch["storageClassName"] = options.cache_volume_storage_class
    return dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(
        size=options.cache_volume_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)))


def _place(task, step: Step, options: PipelineOptions, gpu_node_selector) -> None:
    """Placement, image, Secrets, security, caching and retries of one step's task."""
    placement = options.profile.steps[step.name]
    apply_placement(task, placement, gpu_node_selector=gpu_node_selector)
    image = options.gpu_image if placement.uses_gpu else options.cpu_image
    if image:
        task.set_container_image(image)
    _use_secrets(task, step, options)
    if options.run_as_user is not None:
        kubernetes.set_security_context(task, run_as_user=options.run_as_user, run_as_group=options.run_as_user,
                                        run_as_non_root=True)
    # A new MLflow run per pipeline run: the tracked steps are never served from the cache.
    task.set_caching_options(step.cached and options.cache_prep_and_model)
    if step.gpu and options.retries:  # SFT resumes from its checkpoints; evaluation is idempotent
        task.set_retry(num_retries=options.retries, backoff_duration=options.retry_backoff,
                       backoff_factor=2.0, backoff_max_duration="3600s")


def _use_secrets(task, step: Step, options: PipelineOptions) -> None:
    """Credentials from Kubernetes Secrets, each optional, never pipeline parameters (the UI shows those)."""
    for kind in step.secrets:
        if options.secret(kind):
            kubernetes.use_secret_as_env(task, options.secret(kind), {key: key for key in options.secret_keys(kind)},
                                         optional=True)
    if options.mlflow_uri and "mlflow" in step.secrets:
        task.set_env_variable("MLFLOW_TRACKING_URI", options.mlflow_uri)
    if options.gcs_secret and "object_store" in step.secrets:
        kubernetes.use_secret_as_volume(task, options.gcs_secret, mount_path=GCS_KEY_DIR, optional=True)
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/{options.gcs_key_file}")


finetune_pipeline = make_pipeline()


def compile_pipeline(output_path: str, options: Optional[PipelineOptions] = None) -> str:  # noqa: UP045
    """Compile to KFP IR YAML (what the Kubeflow UI uploads)."""
    compiler.Compiler().compile(make_pipeline(options), package_path=output_path)
    return output_path
