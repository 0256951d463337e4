"""The README's local run, end to end: `kubetune run --local` with no arguments, under kfp.local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local-run")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", "--local", "--workdir", str(workdir)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return workdir, summary, done.stderr


def test_a_quiet_console_with_a_line_per_step_and_the_demo_note(local_run):
    workdir, summary, console = local_run
    lines = console.splitlines()
    assert len(lines) <= 40, console  # a line per step, not the steps' logs
    assert any(line.startswith("✓ train-lora (LoRA SFT): done in") for line in lines)
    assert any("training step" in line and " left" in line for line in lines)  # progress with the time left
    assert "Executor" not in console and "executor_input" not in console
    assert lines[-1].startswith("note:") and "random weights" in lines[-1]
    (log,) = (workdir / "logs").glob("run-*.log")  # the full log, kept
    assert "executor_input" in log.read_text(encoding="utf-8")
    report = Path(summary["report"]).read_text(encoding="utf-8")
    assert 'id="note-0"' in report and "random weights" in report  # the report says it too
    assert 'class="chrf"' in report  # each held-out answer's chrF


def test_summary_line_points_at_real_outputs(local_run):
    workdir, summary, _ = local_run
    adapter, report = Path(summary["adapter"]), Path(summary["report"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
    assert "<html" in report.read_text(encoding="utf-8").lower() and report.suffix == ".html"  # opens as a page
    assert 'data-series="loss"' in Path(summary["training_report"]).read_text(encoding="utf-8")
    assert summary["mlflow_tracking_uri"] == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert (workdir / "tiny-model" / "config.json").is_file()


def test_tuned_model_beats_base_and_mlflow_has_the_run(local_run):
    from mlflow import MlflowClient

    _, summary, _ = local_run
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["eval.tuned_eval_loss"] < metrics["eval.base_eval_loss"]
    assert run.data.params["lora.lora_r"] == "16" and run.data.params["data.dataset"] == "kubetune://tcm-demo"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert len(history) == metrics["sft.global_step"] and len(history) > 5
    params = run.data.params  # prep's counts are parameters; the metrics page starts with the curves
    assert float(params["data_stats.rows_in"]) > float(params["data_stats.rows_kept"]) > 0
    assert "data.prep_seconds" in metrics and not {"data.rows_in", "data.rows_kept"} & set(metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in logged
    assert run.info.status == "FINISHED"


def test_adapter_loads_onto_the_base_model(local_run):
    from peft import PeftModel

    from kubetune.modeling import load_model

    _, summary, _ = local_run
    base = load_model(summary["base_model"])
    tuned = PeftModel.from_pretrained(base, summary["adapter"])
    assert any("lora_A" in name for name, _ in tuned.named_parameters())


def test_demo_report_shows_training_rows_where_tuning_moved_the_answer(local_run, tmp_path):
    """The newcomer's report, as a browser renders it: the note on the tiny random model, and training rows whose
    tuned answer is closer to the reference than the base answer (chrF per answer)."""
    import re

    from test_report_browser import Tree, chromium

    _, summary, _ = local_run
    tree = Tree()
    tree.feed(chromium(tmp_path, "--dump-dom", Path(summary["report"]).as_uri()))
    assert "random weights" in tree.by_id("note-0")
    training = [e for e in tree.elements if e.get("data-kind") == "training"]
    assert len(training) == 4  # the local run's train_probe_samples
    scores = [[float(x) for x in re.findall(r"chrF ([0-9.]+)", e["text"])] for e in training]
    assert all(len(pair) == 2 for pair in scores), scores
    assert any(tuned > base for base, tuned in scores), scores
