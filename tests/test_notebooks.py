"""The two notebooks, executed end to end in local mode by a real Jupyter kernel (nbclient).

The submission notebook runs the pipeline once (kfp.local, tiny model, sqlite MLflow store in its workdir); one
more local run with another LoRA rank goes into the same store, and the comparison notebook then reads that
experiment. The kernel is this interpreter (a kernelspec written to a temporary folder), so it sees the same
installed kubetune. Submission to a cluster is covered by tests/test_submit.py; here only its wiring is checked.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SUBMIT = NOTEBOOKS / "submit_finetune.ipynb"
COMPARE = NOTEBOOKS / "compare_experiments.ipynb"
REVIEW = NOTEBOOKS / "review_answers.ipynb"
CELL_TIMEOUT_S = int(os.environ.get("KUBETUNE_TEST_NOTEBOOK_CELL_TIMEOUT_S", "1800"))
# Set to keep the executed notebooks (with outputs) for reading, e.g. as CI artifacts.
KEEP_DIR = os.environ.get("KUBETUNE_TEST_NOTEBOOK_OUTPUT_DIR", "")
# Small but complete: a few optimizer steps, a few generated answers.
SMALL = {"max_steps": 3, "max_eval_samples": 8, "max_generation_samples": 2, "max_new_tokens": 12}
NOTEBOOK_LORA_R, SECOND_LORA_R = 8, 4
# Settings of the developer's shell that would send a notebook elsewhere than the test's own local store.
FOREIGN_ENV = ("KUBETUNE_KFP_HOST", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KUBERNETES_SERVICE_HOST")


# -- stored form ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [SUBMIT, COMPARE, REVIEW], ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, "only kernel metadata is stored"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and nb.cells[0].cell_type == "markdown", "a notebook opens with its explanation"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} is stored with outputs"
        assert not cell.metadata, f"cell {cell.id} carries metadata {dict(cell.metadata)}"
        ast.parse(cell.source)  # no IPython magics: every cell is plain Python


def _source(path: Path) -> str:
    import nbformat

    return "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


def test_submission_notebook_submits_through_kubetune_submit():
    """One implementation of submission (``kubetune submit``'s), no kfp.Client code of its own."""
    source = _source(SUBMIT)
    assert "from kubetune.cli.submit import submit_pipeline" in source
    assert "submit_pipeline(kfp_api, params" in source
    assert "resolve_host(KFP_HOST)" in source  # host resolution incl. in-cluster, also shared
    assert "kfp.Client" not in source and "create_run_from_pipeline" not in source
    assert "compile_pipeline(" in source and "run_local(params, WORKDIR)" in source


# -- executed ---------------------------------------------------------------------------------------------------
@dataclass
class Executed:
    nb: object
    workdir: Path

    def outputs(self, cell_id: str) -> list:
        return next(cell for cell in self.nb.cells if cell.get("id") == cell_id).outputs

    def text(self, cell_id: str) -> str:
        parts = []
        for output in self.outputs(cell_id):
            if output.output_type == "stream":
                parts.append(output.text)
            for kind in ("text/markdown", "text/html", "text/plain"):
                parts.append(output.get("data", {}).get(kind, ""))
        return "\n".join(parts)

    def images(self, cell_id: str) -> int:
        return sum("image/png" in output.get("data", {}) for output in self.outputs(cell_id))


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A ``python3`` kernelspec for this interpreter: the kernel runs this venv's Python, whatever other
    ``python3`` kernels the machine has (a user-level one would otherwise win)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / "python3", overrides={"display_name": "Python 3 (kubetune tests)"})
    spec = json.loads((root / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return [str(root)]


def _execute(path: Path, env: dict[str, str], cwd: Path, kernel_dirs: list[str], keep_as: str = "") -> object:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = NotebookClient(nb, km=manager, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=env)  # a cell error raises CellExecutionError with the traceback
    finally:
        if KEEP_DIR:
            Path(KEEP_DIR).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(KEEP_DIR) / (keep_as or path.name))
    return nb


def _kernel_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in FOREIGN_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "KUBETUNE_NOTEBOOK_WORKDIR": str(workdir), **extra})
    return env


@pytest.fixture(scope="module")
def submitted(tmp_path_factory, kernel_dirs) -> Executed:
    """The submission notebook in local mode, with its default local MLflow store."""
    cwd = tmp_path_factory.mktemp("notebooks")
    workdir = cwd / "kubetune-local"
    env = _kernel_env(workdir, KUBETUNE_NOTEBOOK_MODE="local",
                      KUBETUNE_NOTEBOOK_PARAMS=json.dumps({**SMALL, "lora_r": NOTEBOOK_LORA_R}))
    return Executed(_execute(SUBMIT, env, cwd, kernel_dirs), workdir)


@pytest.fixture(scope="module")
def compared(submitted, kernel_dirs) -> tuple[Executed, list[str]]:
    """A second local run into the submission notebook's store, then the comparison notebook on it."""
    from mlflow import MlflowClient

    from kubetune.cli.run import run_local

    uri = f"sqlite:///{submitted.workdir / 'mlflow.db'}"
    run_local({**SMALL, "lora_r": SECOND_LORA_R, "mlflow_tracking_uri": uri}, submitted.workdir)
    experiment = MlflowClient(uri).get_experiment_by_name("kubetune")
    run_ids = [run.info.run_id for run in MlflowClient(uri).search_runs([experiment.experiment_id])]
    assert len(run_ids) == 2
    executed = _execute(COMPARE, _kernel_env(submitted.workdir), submitted.workdir.parent, kernel_dirs)
    return Executed(executed, submitted.workdir), run_ids


@pytest.mark.slow
def test_submission_notebook_runs_locally(submitted):
    from mlflow import MlflowClient

    assert "runs locally" in submitted.text("submit")
    assert "locally with kfp.local" in submitted.text("params")
    assert (submitted.workdir / "kubetune-pipeline.yaml").is_file()
    outputs = submitted.text("local-run")
    assert "adapter_model.safetensors" in outputs and "LoRA adapter" in outputs
    assert "Executor" not in outputs, "step logs go to the log file, not into the notebook"
    assert "✓ train-lora (LoRA SFT): done" in outputs  # a line per step in the notebook
    (log,) = (submitted.workdir / "logs").glob("run-*.log")  # every step's full log beside it
    assert "Pipeline 'kubetune-finetune' finished with status SUCCESS" in _plain(log.read_text())
    client = MlflowClient(f"sqlite:///{submitted.workdir / 'mlflow.db'}")  # the notebook's default local store
    runs = client.search_runs([client.get_experiment_by_name("kubetune").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["lora.lora_r"] == str(NOTEBOOK_LORA_R)
    assert runs[0].info.run_id in outputs
    metrics = submitted.text("metrics")
    assert "Base vs tuned" in metrics and "Held-out loss" in metrics and "chrF" in metrics
    assert submitted.images("metrics") == 1  # the loss curve
    report = submitted.text("report")
    assert "<iframe sandbox srcdoc=" in report and "Tuned model (base + LoRA)" in report


def _plain(text: str) -> str:
    """Text without terminal colour codes (kfp.local colours its log lines)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.slow
def test_submission_notebook_rejects_an_unknown_parameter_before_running(tmp_path, kernel_dirs):
    from nbclient.exceptions import CellExecutionError

    env = _kernel_env(tmp_path / "kubetune-local", KUBETUNE_NOTEBOOK_MODE="local",
                      KUBETUNE_NOTEBOOK_PARAMS=json.dumps({"lora_rank": 8}))
    with pytest.raises(CellExecutionError) as error:
        _execute(SUBMIT, env, tmp_path, kernel_dirs, keep_as="submit_finetune.unknown-parameter.ipynb")
    assert "unknown pipeline parameters ['lora_rank']" in str(error.value) and "lora_r" in str(error.value)
    assert not (tmp_path / "kubetune-local").exists(), "nothing is compiled or run"


@pytest.mark.slow
def test_comparison_notebook_compares_the_runs(compared):
    executed, run_ids = compared
    table = executed.text("table")
    assert "2 run(s)" in table and "lora.lora_r" in table and "★" in table
    assert all(run_id[:8] in table for run_id in run_ids)
    assert executed.images("plots") >= 3  # loss curves, metric by run, one more eval metric
    best = executed.text("best")
    assert "Best run by `eval.tuned_eval_loss` (min)" in best
    answers = executed.text("answers")
    assert "kubetune-answers" in answers and "久咳不愈怎么治疗？" in answers and "<iframe sandbox srcdoc=" in answers
    assert "Answer accurately and carefully" not in answers.split("<iframe")[0], "the shared persona is left out"


@pytest.mark.slow
def test_review_notebook_records_blinded_preferences_on_the_run(compared, kernel_dirs):
    """The review notebook on the first local run: preferences given by pair number (the reviewer's view) are
    recorded as wins of the model that wrote the chosen answer, and the win rate lands on the run."""
    from mlflow import MlflowClient

    from kubetune.review import WIN_RATE_METRIC, ReviewSession

    executed, run_ids = compared
    uri = f"sqlite:///{executed.workdir / 'mlflow.db'}"
    pairs = ReviewSession(uri, run_ids[0], seed=0).pairs  # what the notebook shows, with the hidden sides
    preferences = {pairs[0].number: pairs[0].tuned_is, pairs[1].number: ["tie", "both vague"]}
    if len(pairs) > 2:
        preferences[pairs[2].number] = "a" if pairs[2].tuned_is == "b" else "b"  # the base answer
    expected = (1 + 0.5 + 0) / len(preferences)
    env = _kernel_env(executed.workdir, MLFLOW_TRACKING_URI=uri, KUBETUNE_REVIEW_RUN_ID=run_ids[0],
                      KUBETUNE_REVIEWER="nb-test", KUBETUNE_REVIEW_PREFERENCES=json.dumps(preferences))
    notebook = _execute(REVIEW, env, executed.workdir.parent, kernel_dirs, keep_as="review_answers.ipynb")
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{len(preferences)} preferences saved" in printed
    run = MlflowClient(uri).get_run(run_ids[0])
    assert run.data.metrics[WIN_RATE_METRIC] == pytest.approx(expected)
    assert run.data.tags["kubetune.reviewed_by"] == "nb-test"
