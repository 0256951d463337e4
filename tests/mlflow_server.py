"""Pytest fixtures for MLflow tests: a real ``mlflow server`` and two local pipeline runs logged to it.

Loaded by ``tests/conftest.py`` (``pytest_plugins``). Both fixtures are session-scoped: the server starts once,
and the two pipeline runs (about two minutes each on a small CPU) are shared by test_tracking and test_compare.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SERVER_START_TIMEOUT_S = float(os.environ.get("KUBETUNE_TEST_MLFLOW_START_S", "120"))
EXPERIMENT = "kubetune-test"
# Planted secrets: the secrets test must find these values nowhere in MLflow.
SECRET_ENV = {"HF_TOKEN": "kt-secret-123456", "MLFLOW_TRACKING_PASSWORD": "kt-pw-7890abcdef"}
SECRET_PERSONA = f"You are a careful TCM physician (key {SECRET_ENV['HF_TOKEN']}). Answer briefly."
LORA_RANKS = (8, 4)


@dataclass
class MlflowServer:
    uri: str
    root: Path
    db_path: Path
    artifacts_dir: Path
    log_path: Path


@dataclass
class PipelineRuns:
    """Two local pipeline runs in one experiment that differ only in lora_r."""

    server: MlflowServer
    experiment: str
    workdir: Path
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return [summary["mlflow_run_id"] for summary in self.summaries]

    @property
    def uri(self) -> str:
        return self.server.uri


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its workers: they share the process group started for it."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts served from a local folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = MlflowServer(uri, root, root / "mlflow.db", root / "artifacts", root / "server.log")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{server.db_path}",
        "--artifacts-destination", str(server.artifacts_dir),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: a faster start on small CPUs
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                                   start_new_session=True)
    try:
        deadline = time.time() + SERVER_START_TIMEOUT_S
        while not _healthy(uri):
            if process.poll() is not None or time.time() > deadline:
                tail = server.log_path.read_text(errors="replace")[-3000:]
                why = f"exited with {process.returncode}" if process.poll() is not None else (
                    f"did not answer {uri}/health within {SERVER_START_TIMEOUT_S:.0f} s")
                pytest.fail(f"mlflow server {why}.\ncommand: {' '.join(command)}\nlog tail:\n{tail}",
                            pytrace=False)
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def pipeline_runs(mlflow_server, tmp_path_factory) -> PipelineRuns:
    """The local pipeline run twice (lora_r 8, then 4) against the server, with secrets planted in the
    environment and in the persona parameter. Both runs share one workdir, hence one tiny base model."""
    from kubetune.cli.run import run_local

    workdir = tmp_path_factory.mktemp("pipeline-runs")
    runs = PipelineRuns(mlflow_server, EXPERIMENT, workdir)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SECRET_ENV.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for rank in LORA_RANKS:
            params = {
                "max_steps": 3,
                "lora_r": rank,
                "persona": SECRET_PERSONA,
                "max_generation_samples": 4,
                "max_new_tokens": 16,
                "mlflow_tracking_uri": mlflow_server.uri,
                "mlflow_experiment": EXPERIMENT,
            }
            runs.summaries.append(run_local(params, workdir))
    return runs
