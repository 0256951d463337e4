"""The step commands (``python -m kubetune.stepcli prep|quantize|train|evaluate``) end to end on the CPU with the
tiny model, run as subprocesses in the Argo DAG's order, passing data through a directory standing in for the
workflow's volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBES = ["久咳不愈怎么治疗？"]


def _step(*argv: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)
    if check:
        assert done.returncode == 0, f"{argv[0]} failed:\n{done.stderr[-4000:]}"
    return done


def _summary(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_steps_run_in_dag_order_through_a_volume(tmp_path):
    from kubetune.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base")
    volume = tmp_path / "workspace"
    volume.mkdir()
    run = volume / "runs" / "kubetune-finetune-test"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data, model, adapter, report = (run / "prepare-dataset", run / "quantize-model" / "model",
                                    run / "train-lora" / "adapter", run / "evaluate-model" / "report.html")

    # prepare-dataset and quantize-model (parallel in the DAG), then train-lora, then evaluate-model
    prep = _summary(_step(
        "prep", f"--train_data={data / 'train_data.parquet'}", f"--eval_data={data / 'eval_data.parquet'}",
        f"--base_model={base}", "--dataset=kubetune://tcm-demo", "--max_length=256", "--max_samples=48",
        "--max_eval_samples=4", "--num_proc=1", "--trust_remote_code=false", "--persona=", cwd=volume,
    ))
    assert prep["train_rows"] > 0 and prep["eval_rows"] > 0
    data_metadata = json.loads((data / "train_data.parquet.metadata.json").read_text(encoding="utf-8"))
    assert data_metadata["max_length"] == 256 and data_metadata["persona"]  # "" = the built-in persona
    assert (data / "train_data.parquet.stats.json").is_file() and (data / "train_data.parquet.summary.md").is_file()

    _step("quantize", f"--model={model}", f"--base_model={base}", "--quantization=nf4", "--double_quant=true",
          cwd=volume)
    assert json.loads((run / "quantize-model" / "model.metadata.json").read_text(encoding="utf-8"))["source"]

    train = _summary(_step(
        "train", f"--model={model}", f"--train_data={data / 'train_data.parquet'}", f"--adapter={adapter}",
        "--max_steps=2", "--save_steps=0", "--learning_rate=0.002", "--lean=false",
        f"--mlflow_tracking_uri={tracking}", "--kfp_run_id=0b7c-uid", "--kfp_run_name=kubetune-finetune-test",
        cwd=volume,
    ))
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    adapter_metadata = json.loads((run / "train-lora" / "adapter.metadata.json").read_text(encoding="utf-8"))
    assert adapter_metadata["mlflow_run_id"] == train["mlflow_run_id"] and adapter_metadata["tracking_uri"] == tracking
    train_metrics = json.loads((run / "train-lora" / "adapter.metrics.json").read_text(encoding="utf-8"))
    assert train_metrics and all(isinstance(v, (int, float)) for v in train_metrics.values())
    page = (run / "train-lora" / "adapter.training.html").read_text(encoding="utf-8")
    assert 'data-series="loss"' in page and "Speed plan" in page
    note = (run / "train-lora" / "adapter.mlflow" / "README.txt").read_text(encoding="utf-8")
    assert train["mlflow_run_id"] in note  # a server had the records: the store output says where

    # no tracking URI: evaluate logs into the training's run, found through the adapter's metadata
    evaluation = _summary(_step(
        "evaluate", f"--model={model}", f"--adapter={adapter}", f"--eval_data={data / 'eval_data.parquet'}",
        f"--report={report}", "--max_new_tokens=8", "--max_generation_samples=2",
        f"--probe_questions={json.dumps(PROBES, ensure_ascii=False)}", "--kfp_run_id=0b7c-uid",
        "--capability_check=builtin", f"--train_data={data / 'train_data.parquet'}", "--train_probe_samples=2",
        cwd=volume,
    ))
    assert evaluation["mlflow_run_id"] == train["mlflow_run_id"]
    assert "<html" in report.read_text(encoding="utf-8").lower()
    eval_metrics = json.loads((run / "evaluate-model" / "report.html.metrics.json").read_text(encoding="utf-8"))
    assert any(k.startswith("base_") for k in eval_metrics) and any(k.startswith("tuned_") for k in eval_metrics)
    assert eval_metrics["capability_questions"] == 24 and eval_metrics["train_probe_rows"] == 2
    assert 0 <= eval_metrics["base_capability_accuracy"] <= 1 and 'id="metric-capability_accuracy"' in (
        report.read_text(encoding="utf-8"))
    assert not list(volume.rglob(".*partial*"))  # nothing half-written left behind

    # The same evaluation through the KFP component (kfp.local): the same capability accuracies.
    component = _component_metrics(tmp_path, model, adapter, data / "eval_data.parquet", capability_check="builtin",
                                   max_new_tokens=8, max_generation_samples=2, probe_questions=PROBES,
                                   mlflow_required=False)
    for key in ("base_capability_accuracy", "tuned_capability_accuracy", "capability_delta", "base_eval_loss"):
        assert component[key] == pytest.approx(eval_metrics[key], abs=1e-6), key


def _component_metrics(tmp_path: Path, model: Path, adapter: Path, eval_data: Path, **params) -> dict:
    """Run the evaluate_model component under kfp.local on files the CLI steps wrote; its logged metrics."""
    from kfp import dsl, local
    from kubetune.components import evaluate_model

    from kubetune.cli.steps import metadata_path

    def imported(path: Path, cls):
        metadata = json.loads(metadata_path(path).read_text(encoding="utf-8"))
        return dsl.importer(artifact_uri=str(path), artifact_class=cls, metadata=metadata,
                            download_to_workspace=True).output

    def evaluate_only():
        task = evaluate_model(model=imported(model, dsl.Model), adapter=imported(adapter, dsl.Model),
                              eval_data=imported(eval_data, dsl.Dataset), **params)
        return task.outputs["metrics"]

    evaluate_only.__annotations__ = {"return": dsl.Metrics}  # a class, not the string this module's annotations are
    evaluate_only = dsl.pipeline(name="evaluate-only")(evaluate_only)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"),
               workspace_root=str(tmp_path / "kfp-workspace"), raise_on_error=True)
    return dict(evaluate_only().output.metadata)


def test_missing_inputs_fail_with_one_clear_error(tmp_path):
    done = _step("train", f"--model={tmp_path / 'model'}", f"--train_data={tmp_path / 'train.parquet'}",
                 f"--adapter={tmp_path / 'adapter'}", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("kubetune: error: 2 problems")
    assert "run `kubetune quantize` first" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "adapter").exists()


def test_bad_flag_values_are_rejected_before_running(tmp_path):
    done = _step("prep", "--train_data=t", "--eval_data=e", "--double_quant=true", cwd=tmp_path, check=False)
    assert done.returncode == 2 and "unrecognized arguments: --double_quant" in done.stderr
    done = _step("quantize", "--model=m", "--double_quant=maybe", cwd=tmp_path, check=False)
    assert done.returncode == 2 and "not a boolean" in done.stderr
