"""``kubetune submit`` against a small local HTTP server that answers the KFP v2beta1 REST calls kfp.Client makes
(healthz, experiment lookup and creation, run creation). Nothing in kfp is mocked: the real client talks HTTP."""

import argparse
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kubetune.pipelines import PipelineOptions
from kubetune.pipelines.placement import load_profile

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


class FakeKfp(ThreadingHTTPServer):
    """Answers like the KFP API server; ``deny`` maps a path prefix to an HTTP status (401/403)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.deny: dict[str, int] = {}
        self.experiments: dict[str, dict] = {}
        self.multi_user = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


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
        self.server.requests.append({
            "method": method, "path": url.path, "query": parse_qs(url.query),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": json.loads(raw) if raw else None,
        })
        for prefix, status in self.server.deny.items():
            if url.path.startswith(prefix):
                return self._reply(status, {"error": "denied", "code": 16 if status == 401 else 7,
                                            "message": "Unauthenticated" if status == 401 else "Forbidden"})
        if (method, url.path) == ("GET", "/apis/v2beta1/healthz"):
            return self._reply(200, {"multi_user": self.server.multi_user})
        if (method, url.path) == ("GET", "/apis/v2beta1/experiments"):
            return self._reply(200, {"experiments": list(self.server.experiments.values())} if self.server.experiments
                               else {})
        if (method, url.path) == ("POST", "/apis/v2beta1/experiments"):
            body = self.server.requests[-1]["body"]
            experiment = {"experiment_id": f"exp-{len(self.server.experiments) + 1}",
                          "display_name": body["display_name"]}
            self.server.experiments[body["display_name"]] = experiment
            return self._reply(200, experiment)
        if (method, url.path) == ("POST", "/apis/v2beta1/runs"):
            body = self.server.requests[-1]["body"]
            return self._reply(200, {"run_id": "run-42", "display_name": body["display_name"],
                                     "experiment_id": body["experiment_id"], "state": "PENDING"})
        return self._reply(404, {"error": f"no route {method} {url.path}"})

    def do_GET(self):  # noqa: N802 - http.server's names
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")


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

    assert result["run_id"] == "run-42"
    assert result["url"] == f"{kfp_server.url}/#/runs/details/run-42"
    assert result["experiment_id"] == "exp-1"
    # Every call carried the bearer token.
    assert kfp_server.requests
    assert {r["headers"].get("authorization") for r in kfp_server.requests} == {f"Bearer {TOKEN}"}
    # The experiment was looked up by name, then created.
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/experiments")
    assert json.loads(lookup["query"]["filter"][0])["predicates"][0]["stringValue"] == "tcm"
    (created,) = kfp_server.calls("POST", "/apis/v2beta1/experiments")
    assert created["body"]["display_name"] == "tcm"
    # The run: compiled spec (pipeline + Kubernetes platform spec) and the typed parameters.
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "tcm-r8" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == params
    spec = json_format.ParseDict(body["pipeline_spec"]["pipeline_spec"], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "kubetune-finetune"
    assert set(spec.root.dag.tasks) == {"prepare-dataset", "quantize-model", "train-lora", "evaluate-model"}
    assert "gpu_node_selector" in spec.root.input_definitions.parameters
    executors = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-lora"]["pvcMount"][0]["mountPath"] == "/cache"
    assert executors["exec-train-lora"]["tolerations"][0]["key"] == "nvidia.com/gpu"


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
    assert "KF_PIPELINES_TOKEN" in message
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
    assert json.loads(out.strip().splitlines()[-1]) == {
        "run_id": "run-42", "url": f"{kfp_server.url}/#/runs/details/run-42", "experiment_id": "exp-1"
    }
    assert f"run details: {kfp_server.url}/#/runs/details/run-42" in err
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    assert run["body"]["runtime_config"]["parameters"] == {"lora_r": 8, "lean": True}
    assert run["body"]["display_name"] == "from-cli"
    platform = run["body"]["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]
    train = platform["executors"]["exec-train-lora"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert train["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "model-cache"
    hub = platform["executors"]["exec-quantize-model"]["secretAsEnv"][0]
    assert hub["secretName"] == "hf" and hub["optional"] is True
    spec = run["body"]["pipeline_spec"]["pipeline_spec"]
    assert spec["deploymentSpec"]["executors"]["exec-train-lora"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "2"
    assert "gpu_node_selector" not in spec["root"]["inputDefinitions"]["parameters"]


def test_cli_submit_rejects_bad_cluster_flags():
    args = build_parser().parse_args(["submit", "--host", "http://127.0.0.1:9", "--cache-volume", "create"])
    with pytest.raises(KubetuneError, match="storage class"):
        args.func(args)
