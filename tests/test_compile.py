"""The compiled pipeline, as a platform team uploads it: golden YAML per profile, and every executor's placement,
volume, secrets, retries, timeouts, caching and security context read back with KFP's own protos.

kfp.local ignores all Kubernetes settings, so these assertions are the only check that they are right.
Update the golden files after an intended change with ``KUBETUNE_UPDATE_GOLDEN=1 pytest tests/test_compile.py``.
"""

import os
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler, components, dsl
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2
from kubetune.containers.images import resolve_images, version_tag
from kubetune.pipelines import PipelineOptions, compile_pipeline
from kubetune.pipelines.finetune import CHECKPOINT_ROOT, GPU_NODE_SELECTOR_HELP, HF_HOME, SECRET_KEYS
from kubetune.pipelines.placement import load_profile, override, profile_names
from kubetune.pipelines.step_table import GPU_STEPS, STEP_NAMES

import kubetune
from kubetune.cli.component_yaml import (
    default_directory,
    stale_component_yamls,
    without_sdk_version,
    yaml_documents,
)
from kubetune.errors import KubetuneError
from kubetune.parameters import settings
from kubetune.secrets import SECRET_NAME

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1"
PROFILES = profile_names()
CPU_STEPS = tuple(step for step in STEP_NAMES if step not in GPU_STEPS)
TASKS = {step: step.replace("_", "-") for step in STEP_NAMES}  # KFP task names
IMAGES = resolve_images(env={})


# -- helpers -----------------------------------------------------------------------------------------------------
class Compiled:
    """One compiled pipeline, parsed with KFP's protos."""

    def __init__(self, text: str):
        self.text = text
        docs = list(yaml.safe_load_all(text))
        self.doc = docs[0]
        self.spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
        self.deployment = json_format.ParseDict(
            json_format.MessageToDict(self.spec.deployment_spec), pipeline_spec_pb2.PipelineDeploymentConfig()
        )
        platform = json_format.ParseDict(docs[1] if len(docs) > 1 else {}, pipeline_spec_pb2.PlatformSpec())
        k8s = json_format.MessageToDict(platform.platforms["kubernetes"].deployment_spec) if platform.platforms else {}
        self.k8s = {
            label: json_format.ParseDict(config, k8s_pb.KubernetesExecutorConfig())
            for label, config in k8s.get("executors", {}).items()
        }

    @property
    def tasks(self) -> dict:
        """Every container task by name, the exit handler's group looked through."""
        found = {}

        def visit(dag) -> None:
            for name, task in dag.tasks.items():
                component = self.spec.components[task.component_ref.name]
                if component.WhichOneof("implementation") == "dag":
                    visit(component.dag)
                else:
                    found[name] = task

        visit(self.spec.root.dag)
        return found

    def executor(self, task: str) -> str:
        return self.spec.components[self.tasks[task].component_ref.name].executor_label

    def container(self, task: str):
        return self.deployment.executors[self.executor(task)].container

    def kubernetes(self, task: str) -> k8s_pb.KubernetesExecutorConfig:
        return self.k8s.get(self.executor(task), k8s_pb.KubernetesExecutorConfig())

    def env(self, task: str) -> dict[str, str]:
        return {item.name: item.value for item in self.container(task).env}

    def secret_env(self, task: str) -> dict[str, tuple[str, bool]]:
        """env var → (secret name, optional)."""
        return {
            pair.env_var: (secret.secret_name_parameter.runtime_value.constant.string_value, secret.optional)
            for secret in self.kubernetes(task).secret_as_env
            for pair in secret.key_to_env
        }

    def parameters(self):
        return self.spec.root.input_definitions.parameters


def options(profile: str = "default", **kwargs) -> PipelineOptions:
    return PipelineOptions(profile=load_profile(profile), cpu_image=IMAGES.cpu, gpu_image=IMAGES.gpu, **kwargs)


def compile_with(tmp_path: Path, pipeline_options: PipelineOptions, name: str = "pipeline.yaml") -> Compiled:
    return Compiled(Path(compile_pipeline(str(tmp_path / name), pipeline_options)).read_text(encoding="utf-8"))


def normalized(text: str) -> str:
    """Compiled YAML without what changes by itself: the SDK version line and the package version in image tags."""
    return re.sub(rf"(kubetune-(?:cpu|gpu)):{re.escape(version_tag())}\b", r"\1:VERSION", without_sdk_version(text))


# -- golden files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_golden_yaml(profile, tmp_path):
    compiled = normalized(compile_with(tmp_path, options(profile)).text)
    golden = GOLDEN / f"finetune-{profile}.yaml"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(compiled, encoding="utf-8")
    assert golden.is_file(), f"{golden} missing: run KUBETUNE_UPDATE_GOLDEN=1 pytest {__file__}"
    assert yaml_documents(compiled) == yaml_documents(golden.read_text(encoding="utf-8")), (
        f"compiled pipeline for profile {profile!r} differs from {golden.name}; if intended, "
        "run KUBETUNE_UPDATE_GOLDEN=1 pytest tests/test_compile.py and review the diff"
    )


def test_golden_yaml_with_the_runs_workspace(tmp_path):
    """--cache-volume create: the golden shows the pipeline workspace (pipelineConfig) beside the exit handler and
    the cache keys of the default golden."""
    compiled = normalized(compile_with(tmp_path, options("h100", cache_volume="create",
                                                         cache_volume_storage_class="fast-rwo")).text)
    golden = GOLDEN / "workspace-h100.yaml"
    if UPDATE_GOLDEN:
        golden.write_text(compiled, encoding="utf-8")
    assert yaml_documents(compiled) == yaml_documents(golden.read_text(encoding="utf-8")), (
        "compiled workspace pipeline differs from workspace-h100.yaml; if intended, run KUBETUNE_UPDATE_GOLDEN=1 "
        "pytest tests/test_compile.py and review the diff"
    )
    assert "pipelineConfig:\n      workspace:" in compiled and "{{$.workspace_path}}" in compiled


def test_every_profile_has_a_golden_file():
    assert sorted(p.name for p in GOLDEN.glob("finetune-*.yaml")) == sorted(f"finetune-{p}.yaml" for p in PROFILES)
    assert {"default", "h100", "a10"} <= set(PROFILES)


# -- placement ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_placement_per_executor(profile, tmp_path):
    compiled = compile_with(tmp_path, options(profile))
    placement = load_profile(profile).steps
    for step, task in TASKS.items():
        resources = compiled.container(task).resources
        want = placement[step]
        assert resources.resource_cpu_request == want.cpu
        assert resources.resource_memory_request == want.memory
        assert resources.resource_memory_limit == want.memory_limit
        config = compiled.kubernetes(task)
        assert config.active_deadline_seconds == want.timeout_s > 0
        if step in GPU_STEPS:
            assert resources.accelerator.resource_type == "nvidia.com/gpu"
            assert resources.accelerator.resource_count == "1"
            assert compiled.container(task).image == IMAGES.gpu
            # /dev/shm in memory, sized by the profile
            (shm,) = [m for m in config.empty_dir_mounts if m.mount_path == "/dev/shm"]
            assert shm.medium == "Memory" and shm.size_limit == want.shm_size
            # the GPU node selector is the run-time parameter; its default is the profile's selector
            # (inside the exit handler's group, the pipeline parameter arrives as its channel)
            selector = config.node_selector.node_selector_json.component_input_parameter
            assert selector.removeprefix("pipelinechannel--") == "gpu_node_selector"
            assert not config.node_selector.labels, "labels beside nodeSelectorJson are ignored by the KFP driver"
            assert [json_format.MessageToDict(t) for t in config.tolerations] == [
                {k: v for k, v in t.items() if v is not None} for t in want.tolerations
            ]
        else:
            assert not resources.HasField("accelerator"), f"{step} must not ask for a GPU"
            assert not resources.accelerator.resource_type
            assert compiled.container(task).image == IMAGES.cpu
            assert not config.empty_dir_mounts
            assert not config.HasField("node_selector")
            assert not config.tolerations
    selector = json_format.MessageToDict(compiled.parameters()["gpu_node_selector"].default_value)
    assert selector == placement["train_lora"].node_selector
    if profile == "h100":
        assert selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    if profile == "a10":
        assert selector == {"nvidia.com/gpu.product": "NVIDIA-A10G"}


def test_flags_override_gpu_steps_only(tmp_path):
    profile = override(
        load_profile("default"), gpu_type="nvidia.com/mig-3g.40gb", gpu_count=2,
        node_selector={"pool": "gpu-a"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    )
    compiled = compile_with(tmp_path, PipelineOptions(profile=profile, runtime_gpu_node_selector=False))
    for task in ("train-lora", "evaluate-model"):
        accelerator = compiled.container(task).resources.accelerator
        assert (accelerator.resource_type, accelerator.resource_count) == ("nvidia.com/mig-3g.40gb", "2")
        config = compiled.kubernetes(task)
        assert dict(config.node_selector.labels) == {"pool": "gpu-a"}
        assert not config.node_selector.HasField("node_selector_json")
        assert [(t.key, t.operator, t.value, t.effect) for t in config.tolerations] == [
            ("dedicated", "Equal", "ml", "NoSchedule")
        ]
    for task in ("prepare-dataset", "quantize-model"):
        assert not compiled.container(task).resources.HasField("accelerator")
        assert not compiled.kubernetes(task).HasField("node_selector")
    assert "gpu_node_selector" not in compiled.parameters()


def test_runtime_selector_default_takes_the_flags(tmp_path):
    profile = override(load_profile("h100"), node_selector={"pool": "gpu-a"})
    compiled = compile_with(tmp_path, PipelineOptions(profile=profile))
    default = json_format.MessageToDict(compiled.parameters()["gpu_node_selector"].default_value)
    assert default == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu-a"}


def test_gpu_steps_with_different_selectors_need_static_selectors():
    profile = load_profile("h100")
    profile.steps["evaluate_model"].node_selector = {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    with pytest.raises(KubetuneError, match="different node selectors"):
        compile_pipeline("/dev/null", PipelineOptions(profile=profile))
    # Static selectors can differ per step.
    PipelineOptions(profile=profile, runtime_gpu_node_selector=False)


# -- fault tolerance, caching, security --------------------------------------------------------------------------
def test_retries_caching_security_and_display_names(tmp_path):
    compiled = compile_with(tmp_path, options())
    for step, task in TASKS.items():
        spec = compiled.tasks[task]
        assert spec.task_info.name, f"{task} has no display name"
        security = compiled.kubernetes(task).security_context
        assert (security.run_as_user, security.run_as_group, security.run_as_non_root) == (1000, 1000, True)
        if step in GPU_STEPS:
            assert spec.retry_policy.max_retry_count == 2
            assert spec.retry_policy.backoff_duration.seconds == 60
            assert spec.retry_policy.backoff_factor == 2.0
            assert spec.retry_policy.backoff_max_duration.seconds == 3600
        else:
            assert not spec.HasField("retry_policy")
        # Tracked steps open one MLflow run per pipeline run; resolve_sources looks at the sources afresh.
        assert spec.caching_options.enable_cache == (step in ("prepare_dataset", "quantize_model")), step
    assert {compiled.tasks[t].task_info.name for t in TASKS.values()} == {
        "Pin dataset and model versions", "Prepare dataset", "Load model in 4-bit", "LoRA SFT",
        "Evaluate base vs tuned", "Close the MLflow run",
    }


def test_cache_keys_hold_the_resolved_source_versions(tmp_path):
    """KFP's cache key is made of a task's inputs: the cached steps take the versions resolve_sources found (and
    the hub commit it pinned), so new content behind an unchanged name is a new key."""
    compiled = compile_with(tmp_path, options())

    def from_resolve(task: str) -> dict[str, str]:
        return {name: value.task_output_parameter.output_parameter_key
                for name, value in compiled.tasks[task].inputs.parameters.items()
                if value.task_output_parameter.producer_task == "resolve-sources"}

    assert from_resolve("prepare-dataset") == {"dataset_version": "dataset_version", "model_version": "model_version",
                                               "model_revision": "pinned_revision"}
    assert from_resolve("quantize-model") == {"model_version": "model_version", "model_revision": "pinned_revision"}
    assert not compiled.tasks["resolve-sources"].caching_options.enable_cache


def test_security_context_left_to_the_cluster(tmp_path):
    compiled = compile_with(tmp_path, options(run_as_user=None, retries=0))
    for task in TASKS.values():
        assert not compiled.kubernetes(task).HasField("security_context")
        assert not compiled.tasks[task].HasField("retry_policy")


# -- secrets -----------------------------------------------------------------------------------------------------
def test_secrets_as_optional_env(tmp_path):
    compiled = compile_with(tmp_path, options())
    hub = {key: ("kubetune-hub", True) for key in SECRET_KEYS["hub"]}
    mlflow = {key: ("kubetune-mlflow", True) for key in SECRET_KEYS["mlflow"]}
    store = {key: ("kubetune-object-store", True) for key in SECRET_KEYS["object_store"]}
    assert compiled.secret_env("prepare-dataset") == {**hub, **store}
    assert compiled.secret_env("quantize-model") == hub
    assert compiled.secret_env("train-lora") == {**mlflow, **store}
    assert compiled.secret_env("evaluate-model") == {**mlflow, **store}
    # Never pipeline parameters: nothing secret-like is a UI field.
    names = set(compiled.parameters())
    assert not {n for n in names if SECRET_NAME.search(n)}
    assert "HF_TOKEN" not in str(compiled.doc["root"])


def test_secret_names_configurable_and_gcs_key_file(tmp_path):
    compiled = compile_with(tmp_path, options(hub_secret="hf", mlflow_secret="", object_store_secret="",
                                              gcs_secret="gcp-sa"))
    assert compiled.secret_env("prepare-dataset") == {"HF_TOKEN": ("hf", True)}
    assert compiled.secret_env("train-lora") == {}
    for task in ("prepare-dataset", "train-lora", "evaluate-model"):
        (volume,) = compiled.kubernetes(task).secret_as_volume
        assert volume.secret_name_parameter.runtime_value.constant.string_value == "gcp-sa"
        assert volume.optional and volume.mount_path == "/var/secrets/gcs"
        assert compiled.env(task)["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/gcs/key.json"
    assert not compiled.kubernetes("quantize-model").secret_as_volume


def test_tracking_server_from_the_secret_or_a_compiled_uri(tmp_path):
    """By default the MLflow Secret may carry MLFLOW_TRACKING_URI; --mlflow-uri sets it as plain env of the tracked
    steps instead (and the Secret's key is then not mapped, so one value wins). No credential reaches the YAML."""
    assert "MLFLOW_TRACKING_URI" in compile_with(tmp_path, options()).secret_env("train-lora")
    compiled = compile_with(tmp_path, options(mlflow_uri="http://mlflow.mlflow:5000"), "uri.yaml")
    for task in ("train-lora", "evaluate-model"):
        assert compiled.env(task)["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000"
        secret = compiled.secret_env(task)
        assert "MLFLOW_TRACKING_URI" not in secret and secret["MLFLOW_TRACKING_PASSWORD"] == ("kubetune-mlflow", True)
    for task in ("prepare-dataset", "quantize-model"):
        assert "MLFLOW_TRACKING_URI" not in compiled.env(task)
    with pytest.raises(KubetuneError, match="holds credentials") as error:
        compile_with(tmp_path, options(mlflow_uri="https://user:s3cret@mlflow.example.com"), "creds.yaml")
    assert "s3cret" not in str(error.value) and "MLFLOW_TRACKING_USERNAME/PASSWORD" in str(error.value)
    with pytest.raises(KubetuneError, match="is not a URI"):
        compile_with(tmp_path, options(mlflow_uri="mlflow:5000"), "bad.yaml")


def test_compile_says_where_tracking_goes(tmp_path, capsys):
    from kubetune.cli import main

    assert main(["compile", "-o", str(tmp_path / "a.yaml")]) == 0
    assert "stop at start" in capsys.readouterr().err
    assert main(["compile", "-o", str(tmp_path / "b.yaml"), "--mlflow-uri", "http://mlflow.mlflow:5000"]) == 0
    assert "log to http://mlflow.mlflow:5000 (--mlflow-uri)" in capsys.readouterr().err


def test_bad_secret_and_volume_names():
    with pytest.raises(KubetuneError) as error:
        PipelineOptions(hub_secret="HF Token", cache_volume="My_Claim").validate()
    assert "hub_secret" in str(error.value) and "My_Claim" in str(error.value)


# -- model cache volume ------------------------------------------------------------------------------------------
def _train_argument(compiled: Compiled, name: str) -> str:
    return compiled.tasks["train-lora"].inputs.parameters[name].runtime_value.constant.string_value


def test_no_volume_by_default(tmp_path):
    compiled = compile_with(tmp_path, options())
    for task in TASKS.values():
        assert not compiled.kubernetes(task).pvc_mount
        assert "HF_HOME" not in compiled.env(task)
    assert _train_argument(compiled, "checkpoint_root") == ""
    assert set(compiled.tasks) == set(TASKS.values())


def test_existing_claim_mounted_in_model_steps(tmp_path):
    compiled = compile_with(tmp_path, options("h100", cache_volume="model-cache"))
    for step, task in TASKS.items():
        mounts = compiled.kubernetes(task).pvc_mount
        if step in ("prepare_dataset", "finish_run"):
            assert not mounts
            continue
        (mount,) = mounts
        assert mount.mount_path == "/cache"
        assert mount.pvc_name_parameter.runtime_value.constant.string_value == "model-cache"
        assert compiled.env(task)["HF_HOME"] == HF_HOME == "/cache/huggingface"
    # Checkpoints go to /cache/checkpoints/<run id>, so a retried SFT pod resumes from them.
    assert _train_argument(compiled, "checkpoint_root") == CHECKPOINT_ROOT
    assert compiled.tasks["train-lora"].inputs.parameters["kfp_run_id"].runtime_value.constant.string_value == (
        dsl.PIPELINE_JOB_ID_PLACEHOLDER
    )
    assert set(compiled.tasks) == set(TASKS.values()), "an existing claim is neither created nor deleted"


def test_created_volume_is_the_runs_kfp_workspace(tmp_path):
    """cache_volume=create: KFP's pipeline workspace (created with the run, deleted after it) instead of
    hand-built CreatePVC/DeletePVC tasks; the SFT checkpoints and the hub download go on it."""
    compiled = compile_with(tmp_path, options(cache_volume="create", cache_volume_storage_class="fast-rwx",
                                              cache_volume_size="300Gi", cache_volume_access_mode="ReadWriteMany"))
    platform = json_format.ParseDict(list(yaml.safe_load_all(compiled.text))[1], pipeline_spec_pb2.PlatformSpec())
    workspace = json_format.MessageToDict(platform.platforms["kubernetes"].pipelineConfig.workspace)
    assert workspace == {"size": "300Gi", "kubernetes": {"pvcSpecPatch": {
        "accessModes": ["ReadWriteMany"], "storageClassName": "fast-rwx"}}}
    assert set(compiled.tasks) == set(TASKS.values()), "no CreatePVC/DeletePVC tasks"
    assert _train_argument(compiled, "checkpoint_root") == dsl.WORKSPACE_PATH_PLACEHOLDER
    quantize = compiled.tasks["quantize-model"].inputs.parameters["cache_root"]
    assert quantize.runtime_value.constant.string_value == dsl.WORKSPACE_PATH_PLACEHOLDER
    for task in TASKS.values():
        assert not compiled.kubernetes(task).pvc_mount
    # Without a storage class the workspace uses the installation's default (KFP's own configuration).
    default = compile_with(tmp_path, options(cache_volume="create"), "default.yaml")
    platform = json_format.ParseDict(list(yaml.safe_load_all(default.text))[1], pipeline_spec_pb2.PlatformSpec())
    patch = json_format.MessageToDict(platform.platforms["kubernetes"].pipelineConfig.workspace)["kubernetes"]
    assert patch == {"pvcSpecPatch": {"accessModes": ["ReadWriteOnce"]}}


# -- Kubeflow UI -------------------------------------------------------------------------------------------------
def test_parameters_typed_with_defaults_and_descriptions(tmp_path):
    compiled = compile_with(tmp_path, options())
    enum = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    parameters = compiled.parameters()
    assert len(parameters) >= 30
    descriptions = {name: setting.help for name, setting in settings().items()}
    descriptions["gpu_node_selector"] = GPU_NODE_SELECTOR_HELP
    for name, definition in parameters.items():
        assert definition.description == descriptions[name], name
        assert definition.is_optional and definition.HasField("default_value"), f"{name} has no default"
    assert parameters["lora_r"].parameter_type == enum.NUMBER_INTEGER
    assert parameters["learning_rate"].parameter_type == enum.NUMBER_DOUBLE
    assert parameters["lean"].parameter_type == enum.BOOLEAN
    assert parameters["probe_questions"].parameter_type == enum.LIST
    assert parameters["gpu_node_selector"].parameter_type == enum.STRUCT
    assert compiled.spec.pipeline_info.description.startswith("QLoRA fine-tuning")


def test_metrics_and_report_reach_the_run_page(tmp_path):
    compiled = compile_with(tmp_path, options())

    def outputs(task: str) -> dict[str, str]:
        spec = compiled.spec.components[compiled.tasks[task].component_ref.name]
        return {name: a.artifact_type.schema_title for name, a in spec.output_definitions.artifacts.items()}

    # mlflow_store: the MLflow records when there was no tracking server (mlflow_required=false), else a note
    assert outputs("evaluate-model") == {"metrics": "system.Metrics", "report": "system.HTML",
                                         "mlflow_store": "system.Artifact"}
    assert outputs("train-lora") == {"adapter": "system.Model", "metrics": "system.Metrics",
                                     "training_report": "system.HTML", "mlflow_store": "system.Artifact"}
    assert outputs("prepare-dataset")["stats"] == "system.Metrics"
    assert outputs("prepare-dataset")["summary"] == "system.Markdown"
    assert compiled.spec.pipeline_info.display_name == "kubetune: QLoRA fine-tuning"


def test_exit_handler_closes_the_mlflow_run_whatever_ended_the_steps(tmp_path):
    """Every step but the final-status one runs inside a dsl.ExitHandler group; that one runs after the group
    however it ended, and receives its final status."""
    compiled = compile_with(tmp_path, options())
    root = compiled.spec.root.dag.tasks
    assert set(root) == {"exit-handler-1", "finish-run"}
    assert root["exit-handler-1"].task_info.name == "fine-tune"
    inner = compiled.spec.components[root["exit-handler-1"].component_ref.name].dag.tasks
    assert set(inner) == set(TASKS.values()) - {"finish-run"}
    final = root["finish-run"]
    assert final.trigger_policy.strategy == \
        pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED
    assert final.inputs.parameters["status"].task_final_status.producer_task == "exit-handler-1"
    assert final.inputs.parameters["kfp_run_id"].runtime_value.constant.string_value == \
        dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert final.inputs.parameters["mlflow_tracking_uri"].component_input_parameter == "mlflow_tracking_uri"
    assert not final.caching_options.enable_cache and not final.HasField("retry_policy")
    assert not compiled.container("finish-run").resources.accelerator.resource_type
    assert set(compiled.secret_env("finish-run")) == set(SECRET_KEYS["mlflow"])


def test_cli_compile_takes_placement_flags(tmp_path):
    from kubetune.cli import main

    path = tmp_path / "cli.yaml"
    assert main(["compile", "-o", str(path), "--profile", "a10", "--gpu-count", "2",
                 "--gpu-toleration", "dedicated=ml:NoSchedule"]) == 0
    compiled = Compiled(path.read_text(encoding="utf-8"))
    assert compiled.container("train-lora").resources.accelerator.resource_count == "2"
    assert ("dedicated", "Equal", "ml") in [(t.key, t.operator, t.value)
                                           for t in compiled.kubernetes("train-lora").tolerations]


# -- component YAML files ----------------------------------------------------------------------------------------
def test_shipped_component_yamls_are_up_to_date():
    assert not stale_component_yamls(), "run `python -m kubetune.cli.component_yaml` and commit components/yaml/"


@pytest.mark.parametrize("name", STEP_NAMES)
def test_component_yaml_keeps_interface_and_descriptions(name):
    import kubetune.components as python_components

    path = default_directory() / f"{name}.yaml"
    loaded = components.load_component_from_file(str(path))
    original = getattr(python_components, name).component_spec
    spec = loaded.component_spec
    assert spec.name == original.name == name.replace("_", "-")
    # The docstring is the description (KFP reads it back from the embedded source, Args included).
    assert original.description
    assert " ".join(spec.description.split()).startswith(" ".join(original.description.split()))
    header = original.description.splitlines()[0]
    assert f"# Description: {header}" in path.read_text(encoding="utf-8")
    assert set(spec.inputs) == set(original.inputs)
    assert set(spec.outputs or {}) == set(original.outputs or {})
    for io_name, io_spec in spec.inputs.items():
        assert (io_spec.type, io_spec.default) == (original.inputs[io_name].type, original.inputs[io_name].default)
    for io_name, io_spec in (spec.outputs or {}).items():
        assert io_spec.type == original.outputs[io_name].type
    # Every input and output keeps its description in the file. (kfp 2.17's loader does not copy them onto the
    # loaded InputSpec/OutputSpec objects, so read the file with KFP's proto.)
    ir = Compiled(path.read_text(encoding="utf-8")).spec.components[f"comp-{spec.name}"]
    described = {}
    for definitions in (ir.input_definitions, ir.output_definitions):
        described.update({k: v.description for k, v in definitions.parameters.items()})
        described.update({k: v.description for k, v in definitions.artifacts.items()})
    assert set(described) == set(spec.inputs) | set(spec.outputs or {})
    assert all(described.values()), [k for k, v in described.items() if not v]
    image = spec.implementation.container.image
    assert image == (IMAGES.gpu if name in GPU_STEPS else IMAGES.cpu)
    assert image.endswith(f":{version_tag(kubetune.__version__)}")


def test_users_pipeline_from_component_yamls_alone(tmp_path):
    """What a user outside this repo does: load the four YAML files and wire their own pipeline."""
    loaded = {name: components.load_component_from_file(str(default_directory() / f"{name}.yaml"))
              for name in STEP_NAMES}

    @dsl.pipeline(name="my-tcm-finetune")
    def my_pipeline(dataset: str = "s3://bucket/tcm.jsonl", base_model: str = "/models/qwen2-7b"):
        prep = loaded["prepare_dataset"](dataset=dataset, base_model=base_model, max_samples=1000)
        model = loaded["quantize_model"](base_model=base_model)
        sft = loaded["train_lora"](model=model.outputs["model"], train_data=prep.outputs["train_data"], lora_r=8)
        sft.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        loaded["evaluate_model"](model=model.outputs["model"], adapter=sft.outputs["adapter"],
                                 eval_data=prep.outputs["eval_data"])

    path = tmp_path / "mine.yaml"
    compiler.Compiler().compile(my_pipeline, str(path))
    compiled = Compiled(path.read_text(encoding="utf-8"))
    assert set(compiled.tasks) == {"prepare-dataset", "quantize-model", "train-lora", "evaluate-model"}
    assert compiled.container("train-lora").resources.accelerator.resource_type == "nvidia.com/gpu"
    assert compiled.tasks["train-lora"].inputs.parameters["lora_r"].runtime_value.constant.number_value == 8
    assert compiled.container("evaluate-model").image == IMAGES.gpu
