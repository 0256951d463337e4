"""``kubetune submit`` against a small local HTTP server that answers the KFP v2beta1 REST calls kfp.Client makes
(healthz, experiments, pipeline and version upload, runs, recurring runs). Nothing in kfp is mocked: the real
client talks HTTP, and the fake stands exactly at the network boundary."""

import _thread
import argparse
import email.parser
import email.policy
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kubetune.pipelines import PipelineOptions
from kubetune.pipelines.placement import load_profile

from kubetune.cli.kfp_run import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TIMEOUT, RunOutcome
from kubetune.cli.submit import (
    SA_TOKEN_PATH_ENV,
    add_parser,
    resolve_host,
    resolve_token,
    run_url,
    submit_pipeline,
)
from kubetune.errors import KubetuneError

TOKEN = "test-token-0123456789"
ENV = ("KUBETUNE_KFP_HOST", "KF_PIPELINES_ENDPOINT", "KUBETUNE_KFP_TOKEN", "KF_PIPELINES_TOKEN",
       "KF_PIPELINES_UI_ENDPOINT", "KUBERNETES_SERVICE_HOST", SA_TOKEN_PATH_ENV)
API = "/apis/v2beta1"


class FakeKfp(ThreadingHTTPServer):
    """Answers like the KFP API server; ``deny`` maps a path prefix to an HTTP status (401/403).

    ``run_states`` is what successive GETs of a run return (the last one repeats); ``on_request`` is called with
    each request's record before it is answered (to rotate a token file, or press Ctrl-C)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.deny: dict[str, int] = {}
        self.experiments: dict[str, dict] = {}
        self.multi_user = False
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []
        self.runs: list[dict] = []
        self.run_states: list[dict] = [{"state": "PENDING"}]
        self.run_gets = 0
        self.on_request = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def uploaded(self, call: dict) -> tuple[dict, dict]:
        """The (pipeline spec, platform spec) of an upload request's package."""
        filename, data = call["files"]["uploadfile"]
        assert filename.endswith(".yaml")
        spec, platform = yaml.safe_load_all(data)
        return spec, platform


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


class Handler(BaseHTTPRequestHandler):
    server: FakeKfp

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type") or ""
        multipart = content_type.startswith("multipart/form-data")
        record = {
            "method": method, "path": url.path, "query": parse_qs(url.query),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": json.loads(raw) if raw and not multipart else None,
            "files": _multipart(content_type, raw) if multipart else {},
        }
        self.server.requests.append(record)
        if self.server.on_request:
            self.server.on_request(record)
        for prefix, status in self.server.deny.items():
            if url.path.startswith(prefix):
                return self._reply(status, {"error": "denied", "code": 16 if status == 401 else 7,
                                            "message": "Unauthenticated" if status == 401 else "Forbidden"})
        status, body = self._route(method, url.path, record)
        return self._reply(status, body)

    def _route(self, method: str, path: str, record: dict) -> tuple[int, dict]:
        server, body, query = self.server, record["body"], record["query"]
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": server.multi_user}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, {"experiments": list(server.experiments.values())} if server.experiments else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {"experiment_id": f"exp-{len(server.experiments) + 1}", "display_name": body["display_name"]}
            server.experiments[body["display_name"]] = experiment
            return 200, experiment
        if (method, path) == ("GET", f"{API}/pipelines"):
            name = json.loads(query["filter"][0])["predicates"][0]["stringValue"]
            namespace = query.get("namespace", [""])[0]  # no namespace: the shared pipelines only
            found = [p for p in server.pipelines if p["display_name"] == name and p["namespace"] == namespace]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            name, namespace = query["name"][0], query.get("namespace", [""])[0]
            if any(p["display_name"] == name and p["namespace"] == namespace for p in server.pipelines):
                return 409, {"error": f"pipeline {name} already exists", "code": 6}
            pipeline = {"pipeline_id": f"pipeline-{len(server.pipelines) + 1}", "display_name": name,
                        "namespace": namespace}
            server.pipelines.append(pipeline)
            self._add_version(pipeline["pipeline_id"], name, record)
            return 200, pipeline
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            pipeline_id, name = query["pipelineid"][0], query["name"][0]
            if not any(p["pipeline_id"] == pipeline_id for p in server.pipelines):
                return 404, {"error": f"pipeline {pipeline_id} not found", "code": 5}
            if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in server.versions):
                return 409, {"error": f"version {name} already exists", "code": 6}
            return 200, self._add_version(pipeline_id, name, record)
        if match := re.fullmatch(f"{API}/pipelines/([^/]+)/versions", path):
            found = [v for v in server.versions if v["pipeline_id"] == match[1]]
            if "desc" in query.get("sort_by", [""])[0]:
                found.reverse()
            return 200, {"pipeline_versions": found[:int(query.get("page_size", ["10"])[0])],
                         "total_size": len(found)}
        if (method, path) == ("POST", f"{API}/runs"):
            run = {**body, "run_id": f"run-{42 + len(server.runs)}", "state": "PENDING"}
            server.runs.append(run)
            return 200, run
        if method == "GET" and path.startswith(f"{API}/runs/"):
            state = server.run_states[min(server.run_gets, len(server.run_states) - 1)]
            server.run_gets += 1
            tasks = state.get("tasks", [])
            return 200, {"run_id": path.rsplit("/", 1)[1], "display_name": "run", "state": state["state"],
                         "run_details": {"task_details": tasks}, **({"error": state["error"]} if "error" in state
                                                                    else {})}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            return 200, {**body, "recurring_run_id": "recurring-1", "status": "ENABLED"}
        return 404, {"error": f"no route {method} {path}"}

    def _add_version(self, pipeline_id: str, name: str, record: dict) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"version-{len(self.server.versions) + 1}",
                   "display_name": name}
        self.server.versions.append(version)
        return version

    def do_GET(self):  # noqa: N802 - http.server's names
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")


def task(name: str, state: str, error: str = "") -> dict:
    """A task_details entry as the KFP API reports it."""
    found = {"task_id": f"task-{name}", "display_name": name, "state": state}
    if error:
        found["error"] = {"code": 2, "message": error}
    return found


@pytest.fixture
def kfp_server():
    server = FakeKfp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(SA_TOKEN_PATH_ENV, str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- submit ------------------------------------------------------------------------------------------------------
def test_submit_sends_compiled_spec_parameters_and_bearer_token(kfp_server, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    options = PipelineOptions(profile=load_profile("h100"), cache_volume="model-cache")
    params = {"lora_r": 8, "learning_rate": 1e-4, "lean": True, "probe_questions": ["久咳不愈怎么治疗？"],
              "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}

    result = submit_pipeline(kfp_server.url, params, experiment="tcm", run_name="tcm-r8", options=options)

    assert result == {"run_id": "run-42", "url": f"{kfp_server.url}/#/runs/details/run-42", "experiment_id": "exp-1",
                      "pipeline_id": "pipeline-1", "pipeline_version_id": "version-1"}
    # Every call carried the bearer token.
    assert kfp_server.requests
    assert {r["headers"].get("authorization") for r in kfp_server.requests} == {f"Bearer {TOKEN}"}
    # The experiment was looked up by name, then created.
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/experiments")
    assert json.loads(lookup["query"]["filter"][0])["predicates"][0]["stringValue"] == "tcm"
    (created,) = kfp_server.calls("POST", "/apis/v2beta1/experiments")
    assert created["body"]["display_name"] == "tcm"
    # The uploaded package: compiled spec (pipeline + Kubernetes platform spec).
    (upload,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    pipeline_spec, platform_spec = kfp_server.uploaded(upload)
    spec = json_format.ParseDict(pipeline_spec, pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "kubetune-finetune"
    tasks = set(spec.root.dag.tasks).union(*(component.dag.tasks for component in spec.components.values()))
    assert {"prepare-dataset", "quantize-model", "train-lora", "evaluate-model"} <= tasks
    assert "gpu_node_selector" in spec.root.input_definitions.parameters
    executors = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-lora"]["pvcMount"][0]["mountPath"] == "/cache"
    assert executors["exec-train-lora"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The run: that pipeline version, in the experiment, with the typed parameters.
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "tcm-r8" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == params
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-1"}
    assert "pipeline_spec" not in body


def test_submit_uploads_the_pipeline_then_a_new_version_each_time(kfp_server, monkeypatch):
    """First submission: the pipeline is created (its package is its first version). Next: found by name, and the
    package becomes a new version with a readable, unique name. Each run references its own version."""
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    first = submit_pipeline(kfp_server.url, {}, run_name="tcm-r8", pipeline_name="tcm-pipeline")
    second = submit_pipeline(kfp_server.url, {"lora_r": 8}, run_name="TCM r16")

    lookups = kfp_server.calls("GET", "/apis/v2beta1/pipelines")
    assert [json.loads(c["query"]["filter"][0])["predicates"][0]["stringValue"] for c in lookups] == [
        "tcm-pipeline", "kubetune-finetune"]
    third = submit_pipeline(kfp_server.url, {}, run_name="TCM r16", pipeline_name="tcm-pipeline")

    uploads = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert [u["query"]["name"] for u in uploads] == [["tcm-pipeline"], ["kubetune-finetune"]]
    (new_version,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert new_version["query"]["pipelineid"] == ["pipeline-1"]
    assert re.fullmatch(r"tcm-r16-\d+\.\d+\.\d+\S*-\d{8}-\d{6}", new_version["query"]["name"][0])
    assert kfp_server.uploaded(new_version)[0]["pipelineInfo"]["name"] == "kubetune-finetune"
    # Creating a pipeline stores its first version; that one is run, not uploaded twice.
    assert len(kfp_server.calls("GET", "/apis/v2beta1/pipelines/pipeline-1/versions")) == 1
    assert (first["pipeline_id"], first["pipeline_version_id"]) == ("pipeline-1", "version-1")
    assert (second["pipeline_id"], second["pipeline_version_id"]) == ("pipeline-2", "version-2")
    assert (third["pipeline_id"], third["pipeline_version_id"]) == ("pipeline-1", "version-3")
    references = [r["body"]["pipeline_version_reference"] for r in kfp_server.calls("POST", "/apis/v2beta1/runs")]
    assert references == [{"pipeline_id": p, "pipeline_version_id": v}
                          for p, v in (("pipeline-1", "version-1"), ("pipeline-2", "version-2"),
                                       ("pipeline-1", "version-3"))]
    assert {r["body"]["experiment_id"] for r in kfp_server.calls("POST", "/apis/v2beta1/runs")} == {"exp-1"}
    assert [r["run_id"] for r in (first, second, third)] == ["run-42", "run-43", "run-44"]


def test_existing_experiment_is_reused_and_host_comes_from_env(kfp_server, monkeypatch):
    monkeypatch.setenv("KUBETUNE_KFP_HOST", kfp_server.url)
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.experiments["kubetune"] = {"experiment_id": "exp-existing", "display_name": "kubetune"}
    result = submit_pipeline(None, {})
    assert result["experiment_id"] == "exp-existing"
    assert not kfp_server.calls("POST", "/apis/v2beta1/experiments")
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    assert run["body"]["experiment_id"] == "exp-existing"
    assert run["body"]["runtime_config"].get("parameters", {}) == {}


def test_in_pod_service_account_token_file(kfp_server, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-abcdef\n")
    monkeypatch.setenv(SA_TOKEN_PATH_ENV, str(token_file))
    submit_pipeline(kfp_server.url, {"max_steps": 10}, run_name="sa")
    assert {r["headers"].get("authorization") for r in kfp_server.requests} == {"Bearer sa-token-abcdef"}


def test_in_pod_service_account_token_goes_through_kfp_credentials(kfp_server, monkeypatch, tmp_path):
    """kfp's ServiceAccountTokenVolumeCredentials read the file on every request, so a token the kubelet rotates
    mid-submission (or during a long --wait) is picked up; our own healthz check sent the token the client read."""
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-before\n")
    monkeypatch.setenv(SA_TOKEN_PATH_ENV, str(token_file))

    def rotate(record):
        if record["path"] == "/apis/v2beta1/experiments" and record["method"] == "POST":
            token_file.write_text("sa-token-after\n")

    kfp_server.on_request = rotate
    submit_pipeline(kfp_server.url, {}, run_name="sa")
    sent = [(r["method"], r["path"], r["headers"].get("authorization")) for r in kfp_server.requests]
    created = sent.index(("POST", "/apis/v2beta1/experiments", "Bearer sa-token-before"))
    assert sent[0] == ("GET", "/apis/v2beta1/healthz", "Bearer sa-token-before")  # our check
    assert {auth for _, _, auth in sent[:created + 1]} == {"Bearer sa-token-before"}
    assert {auth for _, _, auth in sent[created + 1:]} == {"Bearer sa-token-after"}
    assert ("POST", "/apis/v2beta1/runs", "Bearer sa-token-after") in sent


def test_unreachable_host_names_it_and_suggests_port_forward(monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KubetuneError) as error:
        submit_pipeline(host, {})
    message = str(error.value)
    assert f"cannot reach Kubeflow Pipelines at {host}" in message
    assert "kubectl port-forward" in message


def test_401_says_the_token_is_the_problem(kfp_server, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    kfp_server.deny["/apis/"] = 401
    with pytest.raises(KubetuneError) as error:
        submit_pipeline(kfp_server.url, {})
    message = str(error.value)
    assert "401 Unauthorized" in message and "token was rejected" in message
    assert "KF_PIPELINES_TOKEN" in message and TOKEN not in message
    assert not kfp_server.calls("POST", "/apis/v2beta1/runs")


def test_401_without_token_says_none_was_sent(kfp_server):
    kfp_server.deny["/apis/"] = 401
    with pytest.raises(KubetuneError, match="no bearer token was sent"):
        submit_pipeline(kfp_server.url, {})
    assert "authorization" not in kfp_server.requests[0]["headers"]


def test_403_on_experiments_after_healthz(kfp_server, monkeypatch):
    """Healthz open, the namespace's API closed: the error from inside kfp.Client is mapped too."""
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    kfp_server.deny["/apis/v2beta1/experiments"] = 403
    with pytest.raises(KubetuneError) as error:
        submit_pipeline(kfp_server.url, {})
    assert "403 Forbidden" in str(error.value) and "KF_PIPELINES_TOKEN" in str(error.value)


def test_unknown_parameter_is_rejected_before_any_request(kfp_server):
    with pytest.raises(KubetuneError, match="unknown pipeline parameters"):
        submit_pipeline(kfp_server.url, {"lora_rank": 8})
    assert not kfp_server.requests


def test_invalid_settings_are_rejected_before_any_request(kfp_server):
    """A setting that would fail minutes into the cluster run (and be retried) stops the submission instead."""
    with pytest.raises(KubetuneError, match=r"(?s)lora_r=100000 is far larger .*learning_rate=nan is not a finite"):
        submit_pipeline(kfp_server.url, {"lora_r": 100000, "learning_rate": float("nan")})
    assert not kfp_server.requests


def test_multi_user_needs_a_namespace(kfp_server, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    kfp_server.multi_user = True
    with pytest.raises(KubetuneError, match="--namespace"):
        submit_pipeline(kfp_server.url, {})
    assert not kfp_server.calls("POST", "/apis/v2beta1/runs")
    submit_pipeline(kfp_server.url, {}, namespace="team-tcm")
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/experiments")
    assert lookup["query"]["namespace"] == ["team-tcm"]
    (created,) = kfp_server.calls("POST", "/apis/v2beta1/experiments")
    assert created["body"]["namespace"] == "team-tcm"
    # The profile's own pipelines are looked up and created in its namespace, so the next submission finds it.
    (pipelines,) = kfp_server.calls("GET", "/apis/v2beta1/pipelines")
    assert pipelines["query"]["namespace"] == ["team-tcm"]
    (upload,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["namespace"] == ["team-tcm"]
    submit_pipeline(kfp_server.url, {}, namespace="team-tcm")
    (version,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["pipelineid"] == ["pipeline-1"]


def test_host_and_token_resolution(tmp_path):
    assert resolve_host("localhost:8080/") == "https://localhost:8080"
    assert resolve_host(None, {"KF_PIPELINES_ENDPOINT": "http://kfp:8888"}) == "http://kfp:8888"
    assert resolve_host("", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).startswith("http://ml-pipeline.kubeflow")
    with pytest.raises(KubetuneError, match="no Kubeflow Pipelines host"):
        resolve_host(None, {})
    token_file = tmp_path / "t"
    token_file.write_text("from-file")
    assert resolve_token(None, {SA_TOKEN_PATH_ENV: str(token_file)}) == "from-file"
    assert resolve_token(None, {"KUBETUNE_KFP_TOKEN": "a", SA_TOKEN_PATH_ENV: str(token_file)}) == "a"
    assert resolve_token(None, {SA_TOKEN_PATH_ENV: str(tmp_path / "missing")}) == ""
    assert run_url("https://kf.example.com/pipeline/", "abc") == "https://kf.example.com/pipeline/#/runs/details/abc"


# -- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_submit_prints_the_run_link(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    args = build_parser().parse_args([
        "submit", "--host", kfp_server.url, "--experiment", "cli", "--run-name", "from-cli",
        "--param", "lora_r=8", "--param", "lean=true", "--profile", "a10", "--gpu-count", "2",
        "--cache-volume", "model-cache", "--hub-secret", "hf", "--static-gpu-node-selector",
    ])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1, "stdout is the one JSON line; kfp's own links go to stderr"
    assert json.loads(out) == {
        "run_id": "run-42", "url": f"{kfp_server.url}/#/runs/details/run-42", "experiment_id": "exp-1",
        "pipeline_id": "pipeline-1", "pipeline_version_id": "version-1",
    }
    assert f"run details: {kfp_server.url}/#/runs/details/run-42" in err
    assert TOKEN not in out + err
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    assert run["body"]["runtime_config"]["parameters"] == {"lora_r": 8, "lean": True}
    assert run["body"]["display_name"] == "from-cli"
    (upload,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    spec, platform_spec = kfp_server.uploaded(upload)
    platform = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]
    train = platform["executors"]["exec-train-lora"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert train["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "model-cache"
    hub = platform["executors"]["exec-quantize-model"]["secretAsEnv"][0]
    assert hub["secretName"] == "hf" and hub["optional"] is True
    assert spec["deploymentSpec"]["executors"]["exec-train-lora"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "2"
    assert "gpu_node_selector" not in spec["root"]["inputDefinitions"]["parameters"]


def _progress(err: str) -> list[str]:
    return [line for line in err.splitlines() if re.fullmatch(r"[\w-]+: [A-Z_]+", line)]


def test_cli_wait_reports_each_state_change_until_the_run_succeeds(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.run_states = [
        {"state": "PENDING"},
        {"state": "RUNNING", "tasks": [task("prepare-dataset", "RUNNING")]},
        {"state": "RUNNING", "tasks": [task("prepare-dataset", "RUNNING")]},  # nothing changed: no line
        {"state": "RUNNING", "tasks": [task("prepare-dataset", "SUCCEEDED"), task("train-lora", "RUNNING")]},
        {"state": "SUCCEEDED", "tasks": [task("prepare-dataset", "SUCCEEDED"), task("train-lora", "SUCCEEDED")]},
    ]
    args = build_parser().parse_args(["submit", "--host", kfp_server.url, "--wait", "--poll-interval", "0.01"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert _progress(err) == ["run: PENDING", "prepare-dataset: RUNNING", "run: RUNNING",
                              "prepare-dataset: SUCCEEDED", "train-lora: RUNNING", "train-lora: SUCCEEDED"]
    assert "run run-42 finished: SUCCEEDED" in err
    assert err.index(f"run details: {kfp_server.url}/#/runs/details/run-42") < err.index("run: PENDING")
    assert len(kfp_server.calls("GET", "/apis/v2beta1/runs/run-42")) == 5
    result = json.loads(out)
    assert result["run_id"] == "run-42" and result["state"] == "SUCCEEDED" and result["wait"] == "finished"
    assert "failed_tasks" not in result


def test_cli_wait_on_a_failed_run_names_the_task_and_exits_non_zero(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.run_states = [
        {"state": "RUNNING", "tasks": [task("prepare-dataset", "SUCCEEDED"), task("train-lora", "RUNNING")]},
        {"state": "FAILED", "error": {"code": 2, "message": "1 task failed"},
         "tasks": [task("prepare-dataset", "SUCCEEDED"),
                   task("train-lora", "FAILED", "CUDA out of memory (tried to allocate 2.00 GiB)")]},
    ]
    args = build_parser().parse_args(["submit", "--host", kfp_server.url, "--wait", "--poll-interval", "0.01"])
    assert args.func(args) == EXIT_FAILED != 0
    out, err = capsys.readouterr()
    assert "train-lora: FAILED" in _progress(err)
    assert "run run-42 finished: FAILED" in err
    assert "task train-lora failed: CUDA out of memory (tried to allocate 2.00 GiB)" in err
    result = json.loads(out)
    assert result["state"] == "FAILED"
    assert result["failed_tasks"] == [{"task": "train-lora", "error": "CUDA out of memory (tried to allocate 2.00 GiB)"}]


def test_cli_wait_timeout_stops_waiting_with_its_own_exit_code(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.run_states = [{"state": "RUNNING", "tasks": [task("train-lora", "RUNNING")]}]
    args = build_parser().parse_args(["submit", "--host", kfp_server.url, "--wait", "--timeout", "0.3",
                                      "--poll-interval", "0.05"])
    status = args.func(args)
    assert status == EXIT_TIMEOUT and status not in (0, EXIT_FAILED, 2)
    out, err = capsys.readouterr()
    assert "stopped waiting after 0.3 s: run run-42 is RUNNING and keeps going" in err
    assert _progress(err) == ["train-lora: RUNNING", "run: RUNNING"]
    assert json.loads(out)["wait"] == "timed_out"
    # Waiting never touches the run: only GETs after it was created.
    created = kfp_server.requests.index(kfp_server.calls("POST", "/apis/v2beta1/runs")[0])
    assert {r["method"] for r in kfp_server.requests[created + 1:]} == {"GET"}


def test_ctrl_c_stops_waiting_and_the_run_keeps_going(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.run_states = [{"state": "RUNNING"}]

    def press_ctrl_c(record):
        if record["path"] == "/apis/v2beta1/runs/run-42" and kfp_server.run_gets == 1:
            _thread.interrupt_main()

    kfp_server.on_request = press_ctrl_c
    result = submit_pipeline(kfp_server.url, {}, wait=True, poll_interval=0.05)
    assert result["wait"] == "interrupted" and result["state"] == "RUNNING"
    assert RunOutcome(result["state"], result["wait"]).exit_code == EXIT_INTERRUPTED
    assert "stopped waiting (Ctrl-C): run run-42 keeps going on the cluster" in capsys.readouterr().err
    assert not [r for r in kfp_server.requests if r["method"] != "GET" and "run-42" in r["path"]]


def test_wait_rides_out_a_blip_but_not_a_rejected_token(kfp_server, monkeypatch):
    """One 503 while polling (a port-forward that blinks) is retried; a 403 ends the waiting with the token fix,
    and says the run keeps going."""
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    kfp_server.run_states = [{"state": "RUNNING"}, {"state": "SUCCEEDED"}]

    def blink(record):
        gets = len(kfp_server.calls("GET", "/apis/v2beta1/runs/run-42"))
        kfp_server.deny = {"/apis/v2beta1/runs/run-42": 503} if gets == 1 else {}

    kfp_server.on_request = blink
    assert submit_pipeline(kfp_server.url, {}, wait=True, poll_interval=0.01)["state"] == "SUCCEEDED"

    kfp_server.on_request = None
    kfp_server.deny = {"/apis/v2beta1/runs/run-43": 403}
    with pytest.raises(KubetuneError) as error:
        submit_pipeline(kfp_server.url, {}, wait=True, poll_interval=0.01)
    assert "stopped waiting for run run-43, which keeps going" in error.value.problem
    assert "403 Forbidden" in error.value.problem and "KF_PIPELINES_TOKEN" in error.value.fix
    assert "/#/runs/details/run-43" in error.value.fix
    assert len(kfp_server.calls("GET", "/apis/v2beta1/runs/run-43")) == 1


def test_cli_schedule_creates_a_recurring_run_of_the_uploaded_version(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    args = build_parser().parse_args(["submit", "--host", kfp_server.url, "--experiment", "nightly",
                                      "--run-name", "nightly-tcm", "--param", "lora_r=8",
                                      "--schedule", "0 0 2 * * *"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "recurring_run_id": "recurring-1", "url": f"{kfp_server.url}/#/recurringrun/details/recurring-1",
        "experiment_id": "exp-1", "pipeline_id": "pipeline-1", "pipeline_version_id": "version-1",
        "schedule": "0 0 2 * * *",
    }
    assert "recurring run (0 0 2 * * *)" in err
    assert not kfp_server.calls("POST", "/apis/v2beta1/runs")
    (recurring,) = kfp_server.calls("POST", "/apis/v2beta1/recurringruns")
    body = recurring["body"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-1"}
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "nightly-tcm"
    assert body["runtime_config"]["parameters"] == {"lora_r": 8}
    assert body["mode"] == "ENABLE" and int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert "pipeline_spec" not in body


def test_five_field_schedule_gets_the_seconds_field_and_says_so(kfp_server, monkeypatch, capsys):
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", TOKEN)
    result = submit_pipeline(kfp_server.url, {}, schedule="30 2 * * 1-5")
    assert result["schedule"] == "0 30 2 * * 1-5"
    (recurring,) = kfp_server.calls("POST", "/apis/v2beta1/recurringruns")
    assert recurring["body"]["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * 1-5"
    assert "read as '0 30 2 * * 1-5': KFP's cron starts with a seconds field" in capsys.readouterr().err


@pytest.mark.parametrize(("schedule", "problem"), [
    ("0 0 25 * * *", "the hour field '25' is out of range (0-23)"),
    ("every night", "has 2 fields; KFP's cron has 6"),
    ("0 0 2 * * * 2030", "has 7 fields"),
    ("0 0 2 * * FRIDAY", "the day of week field 'FRIDAY' is out of range"),
    ("0 ? 2 * * *", "the minute field '?' cannot be ?"),
])
def test_bad_schedule_is_rejected_before_any_request(kfp_server, schedule, problem):
    with pytest.raises(KubetuneError) as error:
        submit_pipeline(kfp_server.url, {}, schedule=schedule)
    assert problem in str(error.value)
    assert "6 fields, seconds first" in error.value.fix and "--schedule '0 0 2 * * *'" in error.value.fix
    assert not kfp_server.requests


def test_schedule_with_wait_is_rejected_before_any_request(kfp_server):
    args = build_parser().parse_args(["submit", "--host", kfp_server.url, "--schedule", "0 0 2 * * *", "--wait"])
    with pytest.raises(KubetuneError, match="--schedule and --wait do not go together") as error:
        args.func(args)
    assert "drop --wait" in error.value.fix
    with pytest.raises(KubetuneError, match="timeout was given without --wait"):
        submit_pipeline(kfp_server.url, {}, timeout=60)
    assert not kfp_server.requests


def test_cli_submit_rejects_bad_cluster_flags():
    args = build_parser().parse_args(["submit", "--host", "http://127.0.0.1:9", "--cache-volume", "Model_Cache"])
    with pytest.raises(KubetuneError, match="not a PersistentVolumeClaim name"):
        args.func(args)
