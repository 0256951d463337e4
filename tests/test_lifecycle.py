"""A local run's lifecycle under kfp.local, as on a cluster: the cache keyed on the sources' content, and the
exit handler that closes the MLflow run with the pipeline's final state when a step is killed.

Two real `kubetune run --local` runs on one workdir: the first finishes; between them the dataset file is
rewritten in place under the same name; the second is SIGKILLed in the middle of training (as an OOM kill or a
lost node would end it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

CHEAP = ["max_generation_samples=1", "max_new_tokens=4", "max_eval_samples=8", "probe_questions=[]", "save_steps=0"]


def _rows(count: int) -> str:
    lines = resources.files("kubetune").joinpath("sample_data", "tcm_demo.jsonl").read_text(encoding="utf-8")
    return "".join(lines.splitlines(keepends=True)[:count])


def _command(workdir: Path, dataset: Path, max_steps: int) -> list[str]:
    params = [f"dataset={dataset}", f"max_steps={max_steps}", *CHEAP]
    return [sys.executable, "-m", "kubetune.cli", "run", "--local", "--workdir", str(workdir),
            *[arg for param in params for arg in ("--param", param)]]


def _runs(workdir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kubetune")
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lifecycle")
    dataset = workdir / "tcm.jsonl"
    dataset.write_text(_rows(60), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    first = subprocess.run(_command(workdir, dataset, 2), cwd=workdir, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert first.returncode == 0, first.stderr[-4000:]

    dataset.write_text(_rows(120), encoding="utf-8")  # new rows, same name
    second = subprocess.Popen(_command(workdir, dataset, 100_000), cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killed = _kill_training(second, workdir)
    output, _ = second.communicate(timeout=600)
    return workdir, first, second.returncode, output, killed


def _kill_training(run: subprocess.Popen, workdir: Path, timeout_s: float = 900) -> int:
    """SIGKILL the SFT step's process once it is training (its MLflow run says so); returns the killed pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.poll() is None, "the second run ended before its training started"
        _, runs = _runs(workdir)
        if len(runs) == 2 and runs[1].data.tags.get("kubetune.running_step") == "train_lora":
            # the Python process of the step (not the `sh -c` that kfp.local starts it with)
            for process in psutil.Process(run.pid).children(recursive=True):
                argv = process.cmdline()
                if argv[1:3] == ["-m", "kfp.dsl.executor_main"] and argv[-1] == "train_lora":
                    time.sleep(2)  # a few optimizer steps in
                    os.kill(process.pid, signal.SIGKILL)
                    return process.pid
        time.sleep(1)
    run.kill()
    raise AssertionError("training of the second run never started")


def test_a_finished_run_records_the_pipeline_state(two_runs):
    workdir, first, *_ = two_runs
    _, runs = _runs(workdir)
    tags = runs[0].data.tags
    assert runs[0].info.status == "FINISHED"
    assert tags["kubetune.pipeline_state"] == "SUCCEEDED" and tags["kubetune.running_step"] == "none"
    assert "kubetune.failed_step" not in tags
    # the run page's result, written by the exit handler: the state and the numbers that decide
    first = min((workdir / "outputs").iterdir())
    page = (first / "finish-run" / "result").read_text(encoding="utf-8")
    assert page.startswith("**Pipeline SUCCEEDED**") and f"`{runs[0].info.run_id}`: FINISHED" in page
    assert "| held-out loss, base → tuned |" in page and "| tuned beats base (held-out loss) |" in page
    assert "| registered adapter | kubetune-adapter version 1 |" in page


def _executed(run_dir: Path) -> set[str]:
    """The tasks that ran in a kfp.local run (one served from the cache writes no folder)."""
    return {path.name for path in run_dir.iterdir() if path.is_dir()}


def test_changed_content_reruns_prep_and_unchanged_model_comes_from_the_cache(two_runs):
    workdir, *_ = two_runs
    first, second = sorted((workdir / "outputs").iterdir(), key=lambda path: path.name)
    assert {"resolve-sources", "prepare-dataset", "quantize-model", "train-lora"} <= _executed(first)
    # same model files: the 4-bit model came from the cache; the rewritten dataset was prepared again
    assert "quantize-model" not in _executed(second)
    assert {"resolve-sources", "prepare-dataset", "train-lora", "finish-run"} <= _executed(second)
    _, runs = _runs(workdir)
    # the new rows reached training (prep's counts, logged by the SFT step before it was killed)
    assert float(runs[0].data.params["data_stats.rows_in"]) == 60
    assert float(runs[1].data.params["data_stats.rows_in"]) == 120


def test_a_killed_training_step_leaves_a_failed_run_naming_it(two_runs):
    workdir, _, returncode, output, killed = two_runs
    assert returncode != 0 and killed
    _, runs = _runs(workdir)
    run = runs[1]
    assert run.info.status == "FAILED"  # not RUNNING for ever
    assert run.data.tags["kubetune.failed_step"] == "train_lora"
    assert run.data.tags["kubetune.pipeline_state"] == "FAILED"
    # the console: a line per step, the failed one named, and the exit step after it
    assert "✗ train-lora (LoRA SFT): failure" in output and "✓ finish-run (Close the MLflow run): done" in output
    assert "train-lora failed without a kubetune error (killed, or a crash)" in output
    assert not [line for line in output.splitlines() if line.startswith('{"adapter"')]  # no summary: it failed
    log = max((workdir / "logs").glob("run-*.log")).read_text(encoding="utf-8")  # the second run's full log
    assert "closed FAILED in train_lora" in log
    page = (max((workdir / "outputs").iterdir()) / "finish-run" / "result").read_text(encoding="utf-8")
    assert page.startswith("**Pipeline FAILED** in `train_lora`") and f"`{run.info.run_id}`: FAILED" in page
