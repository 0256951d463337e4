"""MLflow as a cluster runs it, against a real ``mlflow server``: Kubeflow Pipelines' MLflow integration (a task
run in MLFLOW_RUN_ID), a pod with no tracking server (a clear error at start, or an importable store in the
step's output), and the champion adapter loaded back as an MLflow model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from kubetune.cli import main
from kubetune.cli.steps import metadata_path, read_metadata, write_json
from kubetune.config import EvalConfig, LoraSettings, TrainConfig
from kubetune.errors import KubetuneError
from kubetune.steps import TrainJob, evaluate, train
from kubetune.tracking import Tracking, resolve_tracking_uri
from kubetune.tracking.store import NO_SERVER_FIX

PROBES = ["久咳不愈怎么治疗？"]
CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}  # what Kubernetes sets in every pod


@pytest.fixture(scope="module")
def prepared(prepare_sample):
    return prepare_sample(max_length=256, max_samples=32, max_eval_samples=4)


def _job(model_dir: str, prepared: Path, root: Path, tracking: Tracking) -> TrainJob:
    return TrainJob(model_dir, str(prepared / "train.parquet"), str(root / "adapter"),
                    lora=LoraSettings(lora_r=4, lora_alpha=8),
                    train=TrainConfig(max_steps=2, learning_rate=5e-3, save_steps=0),
                    max_length=256, checkpoint_dir=str(root / "ckpt"), tracking=tracking,
                    model_metadata={"source": model_dir, "quant_quantization": "nf4"},
                    data_metadata={"max_length": 256, "dataset": "kubetune://tcm-demo", "stat_train_rows": 28})


def _evaluate(model_dir: str, prepared: Path, root: Path, tracking: Tracking) -> dict:
    return evaluate(model_dir, str(root / "adapter"), str(prepared / "eval.parquet"), str(root / "report"),
                    EvalConfig(probe_questions=PROBES, max_new_tokens=4, max_generation_samples=2),
                    tracking=tracking, data_metadata={"dataset": "kubetune://tcm-demo"})


# -- where the tracking URI comes from ------------------------------------------------------------------------------
def test_outside_a_cluster_a_local_store_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("", environ={}) == f"sqlite:///{tmp_path / 'kubetune-local' / 'mlflow.db'}"
    assert resolve_tracking_uri("", environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
    assert resolve_tracking_uri("http://given:5000", environ={"MLFLOW_TRACKING_URI": "http://env:5000"}) == \
        "http://given:5000"


def test_in_a_cluster_without_a_server_the_step_stops_or_keeps_a_store(tmp_path):
    with pytest.raises(KubetuneError, match="no MLflow tracking server") as error:
        resolve_tracking_uri("", environ=CLUSTER, store_dir=str(tmp_path))
    assert NO_SERVER_FIX in str(error.value) and "mlflow_required=false" in str(error.value)
    assert resolve_tracking_uri("", required=False, store_dir=str(tmp_path), environ=CLUSTER) == \
        f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the server from the Secret or from Kubeflow's MLflow integration: a cluster step uses it
    assert resolve_tracking_uri("", environ={**CLUSTER, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == \
        "http://mlflow:5000"


@pytest.mark.slow
def test_train_command_without_a_server_fails_at_start(quantized_model_dir, prepared, tmp_path, monkeypatch,
                                                       capsys):
    for name, value in CLUSTER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["train", f"--model={quantized_model_dir}", f"--train_data={prepared / 'train.parquet'}",
              f"--adapter={tmp_path / 'adapter'}", "--max_length=256", "--max_steps=1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "no MLflow tracking server" in err and "--mlflow-uri" in err and "mlflow_required=false" in err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "ckpt").exists()


def _step(*argv: str, env: dict[str, str]) -> dict:
    """A step command in a process of its own, as in its own pod."""
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_without_a_server_the_records_travel_in_the_outputs_and_import(quantized_model_dir, prepared, tmp_path,
                                                                       mlflow_server):
    """mlflow_required=false in pods with no server: training keeps its store in its mlflow_store output,
    evaluation (another pod, another path) carries on in a copy in its own output, and `kubetune mlflow-import`
    loads the lot into a server, once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | CLUSTER | {"HF_HUB_OFFLINE": "1"}
    train_pod, eval_pod = tmp_path / "train-pod", tmp_path / "eval-pod"
    for name in ("train", "eval"):
        write_json(metadata_path(prepared / f"{name}.parquet"), {"dataset": "kubetune://tcm-demo", "max_length": 256})
    common = ["--mlflow_experiment=offline-store", "--mlflow_required=false", "--kfp_run_id=kfp-offline",
              "--kfp_run_name=offline"]
    trained = _step("train", f"--model={quantized_model_dir}", f"--train_data={prepared / 'train.parquet'}",
                    f"--adapter={train_pod / 'adapter'}", f"--mlflow_store={train_pod / 'mlflow_store'}",
                    "--lora_r=4", "--lora_alpha=8", "--max_steps=2", "--save_steps=0", "--learning_rate=0.005",
                    *common, env=env)
    assert read_metadata(train_pod / "adapter")["tracking_uri"] == ""  # the training pod's path means nothing
    for name in ("adapter", "adapter.metadata.json"):  # the adapter artifact, as the next pod receives it
        (shutil.copytree if name == "adapter" else shutil.copy)(train_pod / name, eval_pod / name)
    evaluated = _step("evaluate", f"--model={quantized_model_dir}", f"--adapter={eval_pod / 'adapter'}",
                      f"--eval_data={prepared / 'eval.parquet'}", f"--report={eval_pod / 'report.html'}",
                      f"--mlflow_store={eval_pod / 'mlflow_store'}",
                      f"--training_mlflow_store={train_pod / 'mlflow_store'}", "--probe_questions=久咳不愈怎么治疗？",
                      "--max_new_tokens=4", "--max_generation_samples=2", *common, env=env)
    assert evaluated["mlflow_run_id"] == trained["mlflow_run_id"]

    downloaded = tmp_path / "downloaded-store"  # as the user fetches the output from the artifact store
    shutil.copytree(eval_pod / "mlflow_store", downloaded)
    assert main(["mlflow-import", str(downloaded), "--tracking-uri", mlflow_server.uri]) == 0
    assert main(["mlflow-import", str(downloaded), "--tracking-uri", mlflow_server.uri]) == 0  # skipped
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("offline-store")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.params["lora.lora_r"] == "4" and run.data.tags["kubetune.kfp_run_id"] == "kfp-offline"
    assert len(client.get_metric_history(run.info.run_id, "train.loss")) == 2
    assert "eval.tuned_eval_loss" in run.data.metrics and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "eval", "plots"} <= artifacts
    [version] = client.search_model_versions("name = 'offline-store-adapter'")
    assert version.run_id == run.info.run_id and version.tags["kubetune.lora_r"] == "4"


@pytest.mark.slow
def test_kubeflow_mlflow_integration_run_is_the_parent(quantized_model_dir, prepared, tmp_path, monkeypatch,
                                                       mlflow_server):
    """As Kubeflow Pipelines' MLflow integration runs a task: a parent run per pipeline run, a nested run per
    task in MLFLOW_RUN_ID, MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID in the pod. kubetune's run sits in that
    tree, in KFP's experiment, and no other top-level run appears."""
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("KFP-Default-test")
    parent = client.create_run(experiment_id, run_name="kfp-run", tags={"kfp.pipeline_run_id": "kfp-123"})
    task = client.create_run(experiment_id, run_name="train-lora",
                             tags={"mlflow.parentRunId": parent.info.run_id})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", task.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    tracking = Tracking(experiment="kubetune-ignored", kfp_run_id="kfp-123", kfp_run_name="kfp-run",
                        registered_model="none")
    trained = train(_job(quantized_model_dir, prepared, tmp_path, tracking))
    evaluated = _evaluate(quantized_model_dir, prepared, tmp_path, tracking.for_evaluation(
        {"mlflow_run_id": trained["mlflow_run_id"], "tracking_uri": trained["tracking_uri"]}))

    run = client.get_run(trained["mlflow_run_id"])
    assert evaluated["mlflow_run_id"] == run.info.run_id
    assert run.info.experiment_id == experiment_id
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["lora.lora_r"] == "4" and "eval.tuned_eval_loss" in run.data.metrics
    top_level = [r.info.run_id for r in client.search_runs([experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert top_level == [parent.info.run_id]
    assert client.get_experiment_by_name("kubetune-ignored") is None
    inputs = {i.dataset.name: i for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"tcm-demo"} and json.loads(inputs["tcm-demo"].dataset.source)["url"] == \
        "kubetune://tcm-demo"


@pytest.mark.slow
def test_champion_adapter_loads_as_an_mlflow_model(pipeline_runs, capsys):
    """After the local pipeline runs: `kubetune compare --set-alias champion` names the best version, and MLflow's
    own loader gives a model that generates; the LoggedModel carries the evaluation metrics."""
    name = f"{pipeline_runs.experiment}-adapter"
    assert main(["compare", "--tracking-uri", pipeline_runs.uri, "--experiment", pipeline_runs.experiment,
                 "--set-alias", "champion"]) == 0
    capsys.readouterr()
    mlflow.set_tracking_uri(pipeline_runs.uri)
    mlflow.set_registry_uri(pipeline_runs.uri)
    generate = mlflow.transformers.load_model(f"models:/{name}@champion")
    answer = generate("久咳不愈怎么治疗？", max_new_tokens=8)[0]["generated_text"]
    assert isinstance(answer, str) and answer
    experiment = MlflowClient(pipeline_runs.uri).get_experiment_by_name(pipeline_runs.experiment)
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert len(models) == len(pipeline_runs.run_ids)
    assert all("eval.tuned_eval_loss" in {m.key for m in model.metrics} for model in models)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
