"""The plain Argo Workflow (``kubetune argo``): Argo's JSON schema, DAG, placement, volume, retries, parameters
mirroring the KFP pipeline, step commands the step CLI accepts, and submission to a stand-in Argo Server."""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import yaml
from kubetune.pipelines import PipelineOptions, compile_pipeline, finetune_pipeline
from kubetune.pipelines.argo import ArgoOptions, build_workflow, workflow_manifest
from kubetune.pipelines.placement import load_profile, profile_names

from kubetune.cli.argo import add_parser
from kubetune.errors import KubetuneError

WORKFLOW = "io.argoproj.workflow.v1alpha1.Workflow"
SCHEMA_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "argo" / "workflow-schema.json",  # CI: ../shared
    Path("/work/shared/argo/workflow-schema.json"),
)
DAG_STEPS = ("resolve-sources", "prepare-dataset", "quantize-model", "train-lora", "evaluate-model")
EXIT_STEP = "finish-run"  # the workflow's onExit handler
STEPS = (*DAG_STEPS, EXIT_STEP)
GPU_TASKS = ("train-lora", "evaluate-model")
PROFILES = profile_names()


# -- helpers ---------------------------------------------------------------------------------------------------
def _schema_file() -> Path:
    for path in SCHEMA_CANDIDATES:
        if path.is_file():
            return path
    pytest.skip(f"Argo's workflow JSON schema is not here (looked in {', '.join(map(str, SCHEMA_CANDIDATES))})")


def _strict(schema: dict) -> dict:
    """The schema with unknown keys forbidden in every object it describes, so a misspelt field fails too
    (Argo's published schema leaves additionalProperties open)."""
    schema = copy.deepcopy(schema)
    for definition in schema["definitions"].values():
        if "properties" in definition and "additionalProperties" not in definition:
            definition["additionalProperties"] = False
    schema["$id"] = schema["$id"].replace("schema.json", "schema-strict.json")
    return schema


@pytest.fixture(scope="module")
def validators():
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schema = json.loads(_schema_file().read_text(encoding="utf-8"))
    result = []
    for variant in (schema, _strict(schema)):
        registry = Registry().with_resource(variant["$id"], Resource.from_contents(variant, DRAFT202012))
        result.append(Draft202012Validator({"$ref": f"{variant['$id']}#/definitions/{WORKFLOW}"}, registry=registry))
    return result


def _manifest(profile: str = "default", argo: ArgoOptions | None = None, **options) -> dict:
    return workflow_manifest(build_workflow(PipelineOptions(profile=load_profile(profile), **options), argo))


def _templates(manifest: dict) -> dict[str, dict]:
    return {t["name"]: t for t in manifest["spec"]["templates"]}


def _dag(manifest: dict) -> dict[str, dict]:
    return {task["name"]: task for task in _templates(manifest)["finetune"]["dag"]["tasks"]}


def _assert_valid(validators, manifest: dict) -> None:
    for validator in validators:
        errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {name: _manifest(name) for name in PROFILES}


# -- schema ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_manifest_validates_against_argo_schema(validators, manifests, profile):
    _assert_valid(validators, manifests[profile])


def test_variants_validate_against_argo_schema(validators):
    _assert_valid(validators, _manifest("h100", ArgoOptions(pvc="finetune-data", artifacts=True,
                                                             service_account="kubetune")))
    _assert_valid(validators, _manifest("a10", ArgoOptions(pvc_size="300Gi", storage_class="fast-ssd"),
                                        runtime_gpu_node_selector=False, gcs_secret="gcs-key", run_as_user=None))


def test_schema_check_catches_mistakes(validators):
    broken = _manifest()
    broken["spec"]["templates"][1]["retryStrategy"] = {"limit": ["2"]}
    broken["spec"]["podGc"] = {"strategy": "OnPodSuccess"}  # misspelt: caught by the strict variant only
    assert list(validators[0].iter_errors(broken)) and list(validators[1].iter_errors(broken))


# -- shape -----------------------------------------------------------------------------------------------------
def test_workflow_header(manifests):
    manifest = manifests["default"]
    assert manifest["apiVersion"] == "argoproj.io/v1alpha1" and manifest["kind"] == "Workflow"
    assert manifest["metadata"]["generateName"] == "kubetune-finetune-"
    spec = manifest["spec"]
    assert spec["entrypoint"] == "finetune"
    assert spec["podGC"] == {"strategy": "OnPodSuccess"}
    assert spec["ttlStrategy"]["secondsAfterSuccess"] > 0 and spec["ttlStrategy"]["secondsAfterFailure"] > 0
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    for name in STEPS:
        container = _templates(manifest)[name]["container"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["command"][:3] == ["python", "-m", "kubetune.cli"]


def test_dag_order(manifests):
    dag = _dag(manifests["default"])
    assert set(dag) == set(DAG_STEPS)
    assert "dependencies" not in dag["resolve-sources"]
    assert dag["prepare-dataset"]["dependencies"] == dag["quantize-model"]["dependencies"] == ["resolve-sources"]
    assert set(dag["train-lora"]["dependencies"]) == {"prepare-dataset", "quantize-model"}
    assert "train-lora" in dag["evaluate-model"]["dependencies"]
    assert {dag[name]["template"] for name in DAG_STEPS} == set(DAG_STEPS)


def test_exit_handler_and_pinned_versions(manifests):
    """onExit closes the MLflow run with the workflow's final state; prep and quantize read the versions and the
    pinned hub commit resolve-sources wrote as output parameters."""
    manifest = manifests["default"]
    assert manifest["spec"]["onExit"] == EXIT_STEP
    finish = _templates(manifest)[EXIT_STEP]["container"]
    assert "--status={{workflow.status}}" in finish["args"] and "--kfp_run_id={{workflow.uid}}" in finish["args"]
    assert "--mlflow_tracking_uri={{workflow.parameters.mlflow_tracking_uri}}" in finish["args"]
    assert not any("failures" in arg for arg in finish["args"])  # undefined when nothing failed
    resolve = _templates(manifest)["resolve-sources"]
    written = {p["name"]: p["valueFrom"]["path"] for p in resolve["outputs"]["parameters"]}
    assert set(written) == {"dataset_version", "model_version", "pinned_revision"}
    assert all(f"--{name}={path}" in resolve["container"]["args"] for name, path in written.items())
    prep = {p["name"]: p["value"] for p in _dag(manifest)["prepare-dataset"]["arguments"]["parameters"]}
    assert prep["model_revision"] == "{{tasks.resolve-sources.outputs.parameters.pinned_revision}}"
    assert prep["dataset_version"] == "{{tasks.resolve-sources.outputs.parameters.dataset_version}}"


@pytest.mark.parametrize("profile", PROFILES)
def test_gpu_only_where_the_profile_puts_it(manifests, profile):
    placement = load_profile(profile).steps
    templates = _templates(manifests[profile])
    for name in STEPS:
        step = placement[name.replace("-", "_")]
        resources = templates[name]["container"]["resources"]
        image = templates[name]["container"]["image"]
        if name in GPU_TASKS:
            assert resources["limits"][step.accelerator] == str(step.accelerator_count)
            assert "kubetune-gpu:" in image
        else:
            assert not any("gpu" in key for part in resources.values() for key in part)
            assert "kubetune-cpu:" in image
        assert resources["requests"]["cpu"] == step.cpu and resources["requests"]["memory"] == step.memory
        assert templates[name]["activeDeadlineSeconds"] == str(step.timeout_s)
    deadline = manifests[profile]["spec"]["activeDeadlineSeconds"]
    assert deadline >= sum(placement[name].timeout_s for name in ("quantize_model", "train_lora", "evaluate_model"))


def test_node_selector_and_tolerations_follow_the_profile(manifests):
    profile = load_profile("h100").steps
    manifest = manifests["h100"]
    templates = _templates(manifest)
    arguments = {p["name"]: p["value"] for p in manifest["spec"]["arguments"]["parameters"]}
    # the run-time selector (a workflow parameter, as in KFP) defaults to the profile's and patches the GPU pods
    assert json.loads(arguments["gpu_node_selector"]) == profile["train_lora"].node_selector
    selector = '"nodeSelector": {{workflow.parameters.gpu_node_selector}}'
    # SFT saves a checkpoint on SIGTERM: its pod gets the grace period for a step and a save
    assert templates["train-lora"]["podSpecPatch"] == "{" + selector + ', "terminationGracePeriodSeconds": 600}'
    assert templates["evaluate-model"]["podSpecPatch"] == "{" + selector + "}"
    for name in GPU_TASKS:
        patch = templates[name]["podSpecPatch"].replace("{{workflow.parameters.gpu_node_selector}}", "{}")
        assert json.loads(patch)["nodeSelector"] == {}  # valid JSON once Argo substitutes the parameter
        assert templates[name]["tolerations"] == profile[name.replace("-", "_")].tolerations
    for name in ("prepare-dataset", "quantize-model"):
        assert "tolerations" not in templates[name] and "podSpecPatch" not in templates[name]

    static = _templates(_manifest("h100", runtime_gpu_node_selector=False))
    assert static["train-lora"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert json.loads(static["train-lora"]["podSpecPatch"]) == {"terminationGracePeriodSeconds": 600}
    assert "podSpecPatch" not in static["evaluate-model"]


def test_retry_strategy_on_train_and_evaluate(manifests):
    templates = _templates(manifests["default"])
    for name in GPU_TASKS:
        retry = templates[name]["retryStrategy"]
        assert retry["limit"] == "2" and retry["retryPolicy"] == "Always"
        assert retry["backoff"] == {"duration": "60s", "factor": "2"}
        assert "exitCode" in retry["expression"]  # user errors (exit 2) are not retried
    for name in ("prepare-dataset", "quantize-model"):
        assert "retryStrategy" not in templates[name]
    assert "retryStrategy" not in _templates(_manifest(retries=0))["train-lora"]


def test_mounts_and_volume_claim(manifests):
    manifest = manifests["default"]
    profile = load_profile("default").steps
    templates = _templates(manifest)
    for name in STEPS:
        mounts = {m["name"]: m["mountPath"] for m in templates[name]["container"]["volumeMounts"]}
        assert mounts["workspace"] == "/workspace"
        assert templates[name]["container"]["workingDir"] == "/workspace"
        shm = profile[name.replace("-", "_")].shm_size
        if shm:
            assert mounts["dshm"] == "/dev/shm"
            assert templates[name]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
        else:
            assert "dshm" not in mounts
    (claim,) = manifest["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "workspace"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert manifest["spec"]["volumeClaimGC"] == {"strategy": "OnWorkflowSuccess"}

    given = _manifest(argo=ArgoOptions(pvc="finetune-data"))["spec"]
    assert given["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "finetune-data"}}]
    assert "volumeClaimTemplates" not in given and "volumeClaimGC" not in given


def test_outputs_feed_inputs_through_the_volume(manifests):
    templates = _templates(manifests["default"])

    def paths(name: str) -> dict[str, str]:
        return dict(arg[2:].split("=", 1) for arg in templates[name]["container"]["args"] if "=/workspace/" in arg)

    prep, load, train, evaluate = (paths(name) for name in STEPS[1:5])
    assert train["train_data"] == prep["train_data"] and train["model"] == load["model"]
    assert evaluate["adapter"] == train["adapter"] and evaluate["eval_data"] == prep["eval_data"]
    assert evaluate["report"].endswith(".html") and all("{{workflow.name}}" in p for p in evaluate.values())


def test_secrets_are_optional_and_scoped(manifests):
    templates = _templates(manifests["default"])

    def secret_env(name: str) -> dict[str, dict]:
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in templates[name]["container"].get("env", [])
                if "valueFrom" in e}

    for name in STEPS:
        assert all(ref["optional"] is True for ref in secret_env(name).values())
    assert secret_env("prepare-dataset")["HF_TOKEN"]["name"] == "kubetune-hub"
    assert "HF_TOKEN" in secret_env("quantize-model") and "HF_TOKEN" not in secret_env("train-lora")
    for name in GPU_TASKS:
        assert secret_env(name)["MLFLOW_TRACKING_PASSWORD"]["name"] == "kubetune-mlflow"
    assert not any(k.startswith("MLFLOW_TRACKING") for k in secret_env("quantize-model"))


def test_artifacts_option_exports_results():
    templates = _templates(_manifest(argo=ArgoOptions(artifacts=True)))
    assert {a["name"] for a in templates["train-lora"]["outputs"]["artifacts"]} == {"adapter", "metrics",
                                                                                     "training_report"}
    assert {a["name"] for a in templates["evaluate-model"]["outputs"]["artifacts"]} == {"report", "metrics",
                                                                                         "mlflow_store"}
    assert "outputs" not in _templates(_manifest())["train-lora"]


# -- parameters ------------------------------------------------------------------------------------------------
def _typed(value: str, kfp_type: str):
    return {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": lambda v: {"true": True, "false": False}[v],
            "LIST": json.loads, "STRUCT": json.loads}.get(kfp_type, str)(value)


def test_parameters_equal_the_kfp_pipeline(manifests, tmp_path):
    text = Path(compile_pipeline(str(tmp_path / "kfp.yaml"))).read_text(encoding="utf-8")
    compiled = next(yaml.safe_load_all(text))  # the pipeline spec; the platform spec follows
    kfp = compiled["root"]["inputDefinitions"]["parameters"]
    argo = {p["name"]: p for p in manifests["default"]["spec"]["arguments"]["parameters"]}
    assert set(argo) == set(kfp)
    assert list(argo) == list(finetune_pipeline.component_spec.inputs)  # the signature's order, as the UI shows
    for name, definition in kfp.items():
        assert _typed(argo[name]["value"], definition["parameterType"]) == definition["defaultValue"], name
        assert argo[name]["description"] == definition.get("description"), name
    # every parameter reaches a step (or, for gpu_node_selector, the GPU pods)
    used = " ".join(json.dumps(t) for t in manifests["default"]["spec"]["templates"])
    assert all(f"{{{{workflow.parameters.{name}}}}}" in used for name in kfp)


def test_param_overrides_set_the_argument_defaults():
    arguments = {p["name"]: p["value"] for p in workflow_manifest(build_workflow(
        None, None, {"lora_r": 8, "lean": True, "probe_questions": ["q1", "q2"], "learning_rate": 1e-4}
    ))["spec"]["arguments"]["parameters"]}
    assert (arguments["lora_r"], arguments["lean"], arguments["learning_rate"]) == ("8", "true", "0.0001")
    assert json.loads(arguments["probe_questions"]) == ["q1", "q2"]
    with pytest.raises(KubetuneError, match="unknown pipeline parameter"):
        build_workflow(None, None, {"lora_rank": 8})


def _render(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{\{([^}]+)\}\}", lambda m: values[m.group(1)], text)


def test_step_commands_parse_with_the_step_cli(manifests):
    """Every flag the workflow passes exists in the step CLI and its default value parses."""
    from kubetune.cli import build_parser

    manifest = manifests["h100"]
    defaults = {f"workflow.parameters.{p['name']}": p["value"] for p in manifest["spec"]["arguments"]["parameters"]}
    defaults |= {"workflow.name": "kubetune-finetune-x1", "workflow.uid": "0b7c", "workflow.status": "Failed"}
    defaults |= {f"tasks.resolve-sources.outputs.parameters.{name}": "sha256-0f"
                 for name in ("dataset_version", "model_version", "pinned_revision")}
    parser = build_parser()
    for name, task in {**_dag(manifest), EXIT_STEP: {"arguments": {"parameters": []}}}.items():
        inputs = {f"inputs.parameters.{p['name']}": _render(p["value"], defaults)
                  for p in task["arguments"]["parameters"]}
        container = _templates(manifest)[name]["container"]
        args = parser.parse_args([container["command"][-1], *(_render(a, {**defaults, **inputs})
                                                              for a in container["args"])])
        assert args.step_func.__name__.endswith(container["command"][-1])
        if name == "train-lora":
            assert args.kfp_run_id == "0b7c" and args.lora_r == 16 and args.lean is False
        if name == "evaluate-model":
            assert len(args.probe_questions) == 2 and args.report.endswith("/evaluate-model/report.html")
        if name == EXIT_STEP:
            assert args.status == "Failed" and args.kfp_run_id == "0b7c"


# -- command ---------------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["argo", *argv])
    return args.func(args)


def test_command_writes_the_manifest(tmp_path, capsys):
    out = tmp_path / "workflow.yaml"
    assert _cli(["-o", str(out), "--profile", "a10", "--pvc", "finetune-data", "--param", "lora_r=8",
                 "--gpu-image", "registry.example.com/kubetune-gpu:0.1.0", "--hub-secret", "hub"]) == 0
    manifest = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert capsys.readouterr().out.strip() == str(out)
    templates = _templates(manifest)
    assert templates["train-lora"]["container"]["image"] == "registry.example.com/kubetune-gpu:0.1.0"
    (hub,) = [e for e in templates["prepare-dataset"]["container"]["env"] if e["name"] == "HF_TOKEN"]
    assert hub["valueFrom"]["secretKeyRef"]["name"] == "hub"
    assert manifest["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "finetune-data"
    assert {p["name"]: p["value"] for p in manifest["spec"]["arguments"]["parameters"]}["lora_r"] == "8"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pvc", "data", "--pvc-size", "10Gi"], "existing claim"),
        (["--pvc-size", "lots"], "not a storage size"),
        (["--param", "lora_rank=8"], "unknown pipeline parameter"),
        (["--submit"], "Argo Server address"),
    ],
)
def test_command_rejects_bad_options(tmp_path, monkeypatch, argv, message):
    monkeypatch.delenv("ARGO_SERVER", raising=False)
    out = tmp_path / "workflow.yaml"
    with pytest.raises(KubetuneError, match=message):
        _cli(["-o", str(out), *argv])
    assert not out.exists()


# -- submission ------------------------------------------------------------------------------------------------
class _ArgoServer(http.server.ThreadingHTTPServer):
    """Answers the Argo Server's create-workflow call, POST /api/v1/workflows/<namespace>."""

    status = 200
    requests: list

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.server.status != 200:
            answer = {"code": 16, "message": "token not valid"}
        else:
            answer = copy.deepcopy(body["workflow"])
            answer["metadata"] = {**answer["metadata"], "name": "kubetune-finetune-7xk2p",
                                  "namespace": self.path.rsplit("/", 1)[-1]}
        data = json.dumps(answer).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def argo_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    server = _ArgoServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_submit_posts_the_manifest(argo_server, tmp_path, capsys):
    out = tmp_path / "workflow.yaml"
    assert _cli(["-o", str(out), "--profile", "h100", "--submit", "--host", argo_server.url, "--token", "s3cret",
                 "--namespace", "ml"]) == 0
    (request,) = argo_server.requests
    assert request["path"] == "/api/v1/workflows/ml"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    assert request["body"]["workflow"] == yaml.safe_load(out.read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    assert "kubetune-finetune-7xk2p" in printed
    assert f"{argo_server.url}/workflows/ml/kubetune-finetune-7xk2p" in printed


def test_submit_takes_host_and_token_from_the_environment(argo_server, monkeypatch, capsys):
    monkeypatch.setenv("ARGO_SERVER", argo_server.url)
    monkeypatch.setenv("ARGO_TOKEN", "Bearer from-env")
    assert _cli(["-o", "", "--submit"]) == 0
    (request,) = argo_server.requests
    assert request["path"] == "/api/v1/workflows/argo"
    assert request["headers"]["Authorization"] == "Bearer from-env"
    assert f"{argo_server.url}/workflows/argo/kubetune-finetune-7xk2p" in capsys.readouterr().out


@pytest.mark.parametrize(("status", "message"), [(401, "rejected the credentials"), (403, "refused")])
def test_submit_refused_gives_a_clear_error(argo_server, status, message):
    argo_server.status = status
    with pytest.raises(KubetuneError, match=message) as error:
        _cli(["-o", "", "--submit", "--host", argo_server.url, "--token", "wrong"])
    assert str(status) in str(error.value) and "Fix:" in str(error.value)


def test_submit_to_an_unreachable_host_gives_a_clear_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(KubetuneError, match="cannot reach the Argo Server") as error:
        _cli(["-o", "", "--submit", "--host", f"http://127.0.0.1:{port}"])
    assert "ARGO_SERVER" in error.value.fix


def test_server_address_as_the_argo_cli_takes_it():
    from kubetune.pipelines.argo_server import server_url

    assert server_url("localhost:2746", {}) == "https://localhost:2746"
    assert server_url("localhost:2746", {"ARGO_SECURE": "false"}) == "http://localhost:2746"
    assert server_url("https://argo.example.com/", {}) == "https://argo.example.com"
