"""The kubetune fine-tuning pipeline: dataset prep → 4-bit model load → LoRA SFT → evaluation.

One pipeline, built by :func:`make_pipeline` from compile-time options (placement profile, images, volume,
secrets, security). Run-time settings are pipeline parameters, the names the Kubeflow UI shows. Everything
Kubernetes-specific here is ignored by kfp.local, so ``kubetune run --local`` runs the same pipeline.
"""

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Model
from kubetune.components import evaluate_model, prepare_dataset, quantize_model, train_lora
from kubetune.pipelines.placement import Profile, apply_placement, gpu_node_selector_default, load_profile

from kubetune.config import (
    DEFAULT_PERSONA,
    SAMPLE_DATASET,
    DataConfig,
    EvalConfig,
    LoraSettings,
    QuantConfig,
    TrainConfig,
)
from kubetune.errors import KubetuneError, collect

PIPELINE_NAME = "kubetune-finetune"
DEFAULT_BASE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
DEFAULT_PROBES = ["久咳不愈怎么治疗？", "How should a persistent cough be treated in Traditional Chinese Medicine?"]

CACHE_MOUNT = "/cache"
"""Where the model-cache volume is mounted (the images' HF_HOME and Triton cache live under it)."""
HF_HOME = f"{CACHE_MOUNT}/huggingface"
CHECKPOINT_ROOT = f"{CACHE_MOUNT}/checkpoints"
GCS_KEY_DIR = "/var/secrets/gcs"
CREATE = "create"

# Each Secret's keys become environment variables of the same name; a missing Secret or key is skipped.
HUB_KEYS = ("HF_TOKEN",)
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
OBJECT_STORE_KEYS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
# Which steps need which credentials: the hub for downloads (prep reads the tokenizer and hub datasets), MLflow
# for the tracked steps, the object store for s3:// / gs:// datasets and MLflow's artifact store.
HUB_STEPS = ("prepare_dataset", "quantize_model")
MLFLOW_STEPS = ("train_lora", "evaluate_model")
OBJECT_STORE_STEPS = ("prepare_dataset", "train_lora", "evaluate_model")
CACHE_STEPS = ("quantize_model", "train_lora", "evaluate_model")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass
class PipelineOptions:
    """Compile-time choices; everything else is a run-time pipeline parameter."""

    profile: Profile = field(default_factory=load_profile)
    cpu_image: str = ""
    gpu_image: str = ""
    retries: int = 2
    """Retries of the GPU steps (SFT resumes from its last checkpoint), with exponential backoff."""
    retry_backoff: str = "60s"
    cache_prep_and_model: bool = True
    runtime_gpu_node_selector: bool = True
    """Add the ``gpu_node_selector`` pipeline parameter (default: the profile's GPU selector)."""
    cache_volume: str = ""
    """Model cache PVC mounted at /cache in the model steps: an existing claim name, "create" (made at the start,
    deleted at the end of each run), or "" for none."""
    cache_volume_size: str = "200Gi"
    cache_volume_storage_class: str = ""
    cache_volume_access_mode: str = "ReadWriteOnce"
    hub_secret: str = "kubetune-hub"
    """Secret with HF_TOKEN (optional: a missing Secret is skipped). "" = none."""
    mlflow_secret: str = "kubetune-mlflow"
    """Secret with MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN. "" = none."""
    object_store_secret: str = "kubetune-object-store"
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ... "" = none."""
    gcs_secret: str = ""
    """Secret with a Google service-account key file (key ``gcs_key_file``), mounted and named by
    GOOGLE_APPLICATION_CREDENTIALS. "" = none."""
    gcs_key_file: str = "key.json"
    run_as_user: Optional[int] = 1000  # noqa: UP045 - read at runtime on Python 3.10 too
    """Non-root uid of every step (the images' user); None leaves the security context to the cluster."""

    def validate(self) -> None:
        problems: list[tuple[str, str]] = []
        volume = self.cache_volume.strip()
        if volume == CREATE and not self.cache_volume_storage_class.strip():
            problems.append((
                "cache_volume=create needs a storage class: KFP's CreatePVC sends storageClassName '' otherwise, "
                "which only binds pre-made volumes",
                "name one with --cache-volume-storage-class (see `kubectl get storageclass`), or pass an existing "
                "claim name as --cache-volume",
            ))
        elif volume and volume != CREATE and not _DNS_SUBDOMAIN.match(volume):
            problems.append((f"cache_volume {volume!r} is not a PersistentVolumeClaim name",
                             "use a lower-case claim name such as model-cache, or 'create'"))
        if self.cache_volume_access_mode not in ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"):
            problems.append((f"cache_volume_access_mode {self.cache_volume_access_mode!r} is not writable",
                             "use ReadWriteOnce (steps run one after another) or ReadWriteMany"))
        for name in ("hub_secret", "mlflow_secret", "object_store_secret", "gcs_secret"):
            value = getattr(self, name)
            if value and not _DNS_SUBDOMAIN.match(value):
                problems.append((f"{name} {value!r} is not a Kubernetes Secret name",
                                 "use a lower-case name such as kubetune-hub, or '' for none"))
        if self.retries < 0:
            problems.append((f"retries={self.retries} is negative", "use 0 for no retries"))
        if self.run_as_user is not None and self.run_as_user <= 0:
            problems.append((f"run_as_user={self.run_as_user} is root", "use a non-root uid such as 1000"))
        collect(problems)


class PipelineOutputs(NamedTuple):
    adapter: Model
    report: HTML


def _config_help(*classes: type) -> dict[str, str]:
    return {f.name: f.metadata["help"] for cls in classes for f in dataclasses.fields(cls) if "help" in f.metadata}


# Descriptions of the pipeline parameters, shown by the Kubeflow UI. The config dataclasses hold most of them.
PARAMETER_HELP: dict[str, str] = {
    **_config_help(EvalConfig, TrainConfig, LoraSettings, QuantConfig, DataConfig),
    "base_model": "Base model: a local directory (e.g. on the cache volume, /cache/...) or a hub id.",
    "model_revision": "Hub revision (branch, tag or commit) of base_model; empty for the default branch.",
    "columns": "Explicit column mapping, e.g. instruction=question,output=answer (empty = detect).",
    "persona": "The expert persona placed at the top of every prompt.",
    "seed": "Seed for sampling, the train/eval split and training.",
    "checkpoint_dir": "Where SFT checkpoints go; a retried step resumes from the last one. Empty = "
    "/cache/checkpoints/<run id> when a cache volume is mounted, else beside the output (lost with the pod).",
    "mlflow_tracking_uri": "MLflow tracking URI; empty = MLFLOW_TRACKING_URI of the pod, else a local sqlite store.",
    "mlflow_experiment": "MLflow experiment name.",
    "trust_remote_code": "Allow model and tokenizer code from the hub.",
    "gpu_node_selector": "Node selector of the GPU steps (SFT, evaluation), e.g. "
    '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; replaces the compiled default; {} = any GPU node.',
}


def make_pipeline(options: Optional[PipelineOptions] = None):  # noqa: UP045 - kfp reads annotations at runtime
    """Build the pipeline function for these options (compile it, or call it under kfp.local)."""
    options = options or PipelineOptions()
    options.validate()
    steps = options.profile.steps
    selector_default = gpu_node_selector_default(options.profile) if options.runtime_gpu_node_selector else {}

    def finetune(
        dataset: str = SAMPLE_DATASET,
        base_model: str = DEFAULT_BASE_MODEL,
        model_revision: str = "",
        dataset_format: str = "auto",
        columns: str = "",
        prompt_style: str = "expert",
        persona: str = DEFAULT_PERSONA,
        max_length: int = 2048,
        length_policy: str = "truncate",
        max_samples: int = 0,
        eval_fraction: float = 0.1,
        max_eval_samples: int = 200,
        quantization: str = "nf4",
        double_quant: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: str = "all-linear",
        learning_rate: float = 2e-4,
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.03,
        num_epochs: float = 1.0,
        max_steps: int = 0,
        batch_tokens: int = 0,
        gradient_accumulation: int = 1,
        lean: bool = False,
        save_steps: int = 50,
        checkpoint_dir: str = "",
        seed: int = 42,
        probe_questions: list = DEFAULT_PROBES,
        max_new_tokens: int = 256,
        max_generation_samples: int = 32,
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "kubetune",
        trust_remote_code: bool = False,
        gpu_node_selector: dict = selector_default,  # last: removed from the signature when not wanted
    ) -> PipelineOutputs:
        prep = prepare_dataset(
            dataset=dataset, base_model=base_model, model_revision=model_revision, dataset_format=dataset_format,
            columns=columns, prompt_style=prompt_style, persona=persona, max_length=max_length,
            length_policy=length_policy, max_samples=max_samples, eval_fraction=eval_fraction,
            max_eval_samples=max_eval_samples, seed=seed, trust_remote_code=trust_remote_code,
        ).set_display_name("Prepare dataset")
        load = quantize_model(
            base_model=base_model, model_revision=model_revision, quantization=quantization,
            double_quant=double_quant, trust_remote_code=trust_remote_code,
        ).set_display_name("Load model in 4-bit")
        sft = train_lora(
            model=load.outputs["model"], train_data=prep.outputs["train_data"], lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
            num_epochs=num_epochs, max_steps=max_steps, batch_tokens=batch_tokens,
            gradient_accumulation=gradient_accumulation, lean=lean, save_steps=save_steps, seed=seed,
            checkpoint_dir=checkpoint_dir, checkpoint_root=CHECKPOINT_ROOT if options.cache_volume else "",
            mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            # one process per GPU: the accelerator count sets both the pod's GPU request and the DDP world size
            num_gpus=max(steps["train_lora"].accelerator_count, 1) if steps["train_lora"].uses_gpu else 1,
            trust_remote_code=trust_remote_code,
        ).set_display_name("LoRA SFT")
        evaluation = evaluate_model(
            model=load.outputs["model"], adapter=sft.outputs["adapter"], eval_data=prep.outputs["eval_data"],
            probe_questions=probe_questions, max_new_tokens=max_new_tokens,
            max_generation_samples=max_generation_samples, mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_experiment=mlflow_experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, trust_remote_code=trust_remote_code,
        ).set_display_name("Evaluate base vs tuned")

        tasks = {"prepare_dataset": prep, "quantize_model": load, "train_lora": sft, "evaluate_model": evaluation}
        for name, task in tasks.items():
            apply_placement(task, steps[name],
                            gpu_node_selector=gpu_node_selector if options.runtime_gpu_node_selector else None)
            image = options.gpu_image if steps[name].uses_gpu else options.cpu_image
            if image:
                task.set_container_image(image)
            _use_secrets(task, name, options)
            if options.run_as_user is not None:
                _run_as_non_root(task, options.run_as_user)
        for task in (prep, load):
            task.set_caching_options(options.cache_prep_and_model)
        for task in (sft, evaluation):
            # A new MLflow run per pipeline run: the tracked steps are never served from the cache.
            task.set_caching_options(False)
            if options.retries:
                task.set_retry(num_retries=options.retries, backoff_duration=options.retry_backoff,
                               backoff_factor=2.0, backoff_max_duration="3600s")
        if options.cache_volume:
            _mount_cache_volume([tasks[name] for name in CACHE_STEPS], list(tasks.values()), options)
        return PipelineOutputs(adapter=sft.outputs["adapter"], report=evaluation.outputs["report"])

    signature = inspect.signature(finetune)
    parameters = list(signature.parameters.values())
    if not options.runtime_gpu_node_selector:
        parameters = [p for p in parameters if p.name != "gpu_node_selector"]
        finetune.__signature__ = signature.replace(parameters=parameters)
    finetune.__doc__ = _docstring([p.name for p in parameters])
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="QLoRA fine-tuning: dataset prep (CPU) → 4-bit model load (CPU) → LoRA SFT (GPU) → "
        "base-vs-tuned evaluation (GPU), logged to MLflow.",
    )(finetune)


def _docstring(names: list[str]) -> str:
    """A Google-style docstring whose Args section KFP turns into the parameter descriptions of the UI."""
    missing = [name for name in names if name not in PARAMETER_HELP]
    if missing:  # a new parameter without a description: caught by the compile tests
        raise KubetuneError(f"pipeline parameters without a description: {missing}", "add them to PARAMETER_HELP")
    args = "\n".join(f"    {name}: {' '.join(PARAMETER_HELP[name].split())}" for name in names)
    return f"QLoRA fine-tuning pipeline.\n\nArgs:\n{args}\n"


def _use_secrets(task, step: str, options: PipelineOptions) -> None:
    """Credentials from Kubernetes Secrets, each optional, never pipeline parameters (the UI shows those)."""
    from kfp import kubernetes

    for secret, keys, wanted_in in (
        (options.hub_secret, HUB_KEYS, HUB_STEPS),
        (options.mlflow_secret, MLFLOW_KEYS, MLFLOW_STEPS),
        (options.object_store_secret, OBJECT_STORE_KEYS, OBJECT_STORE_STEPS),
    ):
        if secret and step in wanted_in:
            kubernetes.use_secret_as_env(task, secret, {key: key for key in keys}, optional=True)
    if options.gcs_secret and step in OBJECT_STORE_STEPS:
        kubernetes.use_secret_as_volume(task, options.gcs_secret, mount_path=GCS_KEY_DIR, optional=True)
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/{options.gcs_key_file}")


def _run_as_non_root(task, uid: int) -> None:
    from kfp import kubernetes

    kubernetes.set_security_context(task, run_as_user=uid, run_as_group=uid, run_as_non_root=True)


def _mount_cache_volume(model_tasks: list, all_tasks: list, options: PipelineOptions) -> None:
    """Mount the model cache at /cache with HF_HOME on it, so a model is downloaded once per volume.

    "create": a claim named after the run id (the only name both CreatePVC and a DeletePVC without data
    dependencies can know), deleted once every step has finished, failed or not. An existing claim is kept.
    """
    from kfp import kubernetes

    if options.cache_volume == CREATE:
        created = kubernetes.CreatePVC(
            pvc_name=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            access_modes=[options.cache_volume_access_mode],
            size=options.cache_volume_size,
            storage_class_name=options.cache_volume_storage_class,
        ).set_display_name("Create model cache volume")
        # A cached CreatePVC would hand out the name of a claim an earlier run deleted.
        created.set_caching_options(False)
        claim = created.outputs["name"]
        delete = kubernetes.DeletePVC(pvc_name=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_display_name(
            "Delete model cache volume"
        )
        delete.set_caching_options(False)
        delete.after(*all_tasks).ignore_upstream_failure()
    else:
        claim = options.cache_volume
    for task in model_tasks:
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=CACHE_MOUNT)
        task.set_env_variable("HF_HOME", HF_HOME)


finetune_pipeline = make_pipeline()


def compile_pipeline(output_path: str, options: Optional[PipelineOptions] = None) -> str:  # noqa: UP045
    """Compile to KFP IR YAML (what the Kubeflow UI uploads)."""
    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(options), package_path=output_path)
    return output_path
