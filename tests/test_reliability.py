"""Reliability on the CPU with the tiny 4-bit model: a real SIGKILL during training (by hand, and inside a kfp.local
run with retries), outputs that never look finished before they are, and MLflow outages before and during training
against a real ``mlflow server`` that this file stops and restarts.

Nothing here injects faults into product code: the training step is killed from outside, and the writers are
killed (in a subprocess) from a wrapper around a function they call.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow_server import SERVER_START_TIMEOUT_S, _free_port, _healthy, _stop

from kubetune.cli.steps import metadata_path, write_json
from kubetune.sft import last_complete_checkpoint
from kubetune.storage import OWN_OUTPUT, is_partial

MAX_LENGTH = 256
SAVE_STEPS = 2
STEPS = 8
WAIT_S = 900  # a busy shared CPU: generous limits, never sleeps of fixed length
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _env() -> dict[str, str]:
    env = {**os.environ, **OFFLINE}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KUBETUNE_REQUIRE_GPU", None)
    return env


def _wait_for(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None,
              log: Path | None = None, timeout_s: float = WAIT_S):
    deadline = time.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"process ended ({process.returncode}) before {what}:\n{tail}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _finished_files(root: Path) -> list[str]:
    """Files under ``root`` that a later step could take as a result (anything but hidden staging leftovers)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(is_partial(part) for part in p.relative_to(root).parts))


@pytest.fixture(scope="module")
def prepared(prepare_sample) -> Path:
    """A small prepared training set with the metadata the train step reads (its max_length)."""
    root = prepare_sample(max_length=MAX_LENGTH, max_samples=96, max_eval_samples=4)
    for path in (root / "train.parquet", root / "eval.parquet"):
        write_json(metadata_path(path), {"max_length": MAX_LENGTH, "dataset": "kubetune://tcm-demo"})
    return root


# -- kill and resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_resumes(quantized_model_dir, prepared, tmp_path):
    """The train step as its own process, SIGKILLed once a checkpoint is complete, then started again with the same
    inputs and output location: it resumes from the last complete checkpoint and writes a complete adapter."""
    from mlflow import MlflowClient
    from safetensors import safe_open

    adapter = tmp_path / "run" / "adapter"
    checkpoints = tmp_path / "run" / "adapter.checkpoints"  # the step's default: beside the adapter
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "kubetune.cli", "train", f"--model={quantized_model_dir}",
            f"--train_data={prepared / 'train.parquet'}", f"--adapter={adapter}", f"--max_steps={STEPS}",
            f"--save_steps={SAVE_STEPS}", "--lora_r=4", "--learning_rate=0.005", f"--mlflow_tracking_uri={tracking}",
            "--mlflow_experiment=kill-resume", "--kfp_run_id=kill-resume-run", "--kfp_run_name=kill-resume"]

    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        _wait_for(lambda: last_complete_checkpoint(str(checkpoints)), "a complete checkpoint", first, log)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = time.time()
    assert first.returncode == -signal.SIGKILL
    resume_from = int(Path(last_complete_checkpoint(str(checkpoints))).name.removeprefix("checkpoint-"))
    assert SAVE_STEPS <= resume_from < STEPS

    # The killed step left nothing that looks finished: no adapter, no metrics, no metadata for the next step ...
    assert _finished_files(tmp_path / "run") == sorted(
        str(p.relative_to(tmp_path / "run")) for p in checkpoints.rglob("*") if p.is_file())
    # ... and the evaluation step refuses to start without the adapter, with the fix.
    from kubetune.cli import main as step_main

    with pytest.raises(SystemExit) as exit_info:
        step_main(["evaluate", f"--model={quantized_model_dir}", f"--adapter={adapter}",
                   f"--eval_data={prepared / 'eval.parquet'}", f"--report={tmp_path / 'report.html'}"])
    assert exit_info.value.code == 2

    second = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == resume_from
    assert summary["global_step"] == STEPS

    # The step counter continues where the checkpoint left off, in the same MLflow run (found by the KFP run id),
    # and no more than one checkpoint interval of work was lost.
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("kill-resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]]
    history = client.get_metric_history(summary["mlflow_run_id"], "train.loss")
    before = sorted(m.step for m in history if m.timestamp / 1000 < killed_at)
    after = sorted(m.step for m in history if m.timestamp / 1000 >= killed_at)
    assert before[:resume_from] == list(range(1, resume_from + 1))
    assert max(before) - resume_from <= SAVE_STEPS
    assert after == list(range(resume_from + 1, STEPS + 1))

    # A complete adapter: safetensors weights with LoRA tensors, its config, and the run's own record.
    assert {"adapter_config.json", "adapter_model.safetensors", "kubetune_adapter.json"} <= {
        p.name for p in adapter.iterdir()}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora_A" in key for key in weights.keys())  # noqa: SIM118 - safe_open has no __iter__
    assert json.loads((adapter / "kubetune_adapter.json").read_text())["metrics"]["global_step"] == STEPS
    assert json.loads(metadata_path(adapter).read_text())["mlflow_run_id"] == summary["mlflow_run_id"]


@pytest.mark.slow
def test_rerunning_a_killed_local_run_resumes_it(tmp_path):
    """`kubetune run --local`, killed during training, then the same command again: training resumes from the
    workdir's checkpoints and continues the same MLflow run, which ends FINISHED; the checkpoints are cleared."""
    from mlflow import MlflowClient

    workdir = tmp_path / "work"
    argv = [sys.executable, "-m", "kubetune.cli", "run", "--local", "--workdir", str(workdir), "--param",
            "max_steps=10", "--param", "save_steps=2", "--param", "max_generation_samples=2", "--param",
            "max_new_tokens=4"]
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        _wait_for(lambda: any(last_complete_checkpoint(str(d)) for d in workdir.glob("checkpoints/*")),
                  "a complete checkpoint", first, log)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    second = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    client = MlflowClient(summary["mlflow_tracking_uri"])
    [run] = client.search_runs([client.get_experiment_by_name("kubetune").experiment_id])
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.metrics["sft.resumed_from_step"] >= 2
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train.loss"))
    assert steps[-1] == 10 and set(range(1, 11)) <= set(steps)  # one history, both attempts
    assert not list(workdir.glob("checkpoints/*"))


@pytest.mark.slow
def test_kfp_local_retry_resumes_after_a_kill(quantized_model_dir, prepared, tmp_path, caplog):
    """The real train_lora component with set_retry in a kfp.local run: its first attempt's process is SIGKILLed
    from outside once a checkpoint is complete; kfp.local retries the task, which resumes from that checkpoint."""
    import psutil
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model
    from kubetune.components import train_lora

    root = tmp_path / "outputs"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    @dsl.pipeline(name="kubetune-retry-test")
    def retry_pipeline():
        model = dsl.importer(artifact_uri=str(quantized_model_dir), artifact_class=Model)
        data = dsl.importer(artifact_uri=str(prepared / "train.parquet"), artifact_class=Dataset,
                            metadata={"max_length": MAX_LENGTH})
        train_lora(
            model=model.output, train_data=data.output, lora_r=4, learning_rate=5e-3, max_steps=STEPS,
            save_steps=SAVE_STEPS, mlflow_tracking_uri=tracking, mlflow_experiment="retry",
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_retry(num_retries=1, backoff_duration="0s")

    killed: dict[str, object] = {}
    done = threading.Event()

    def _gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True

    def kill_first_attempt() -> None:
        """Wait for a complete checkpoint of the task (checkpoints go beside its adapter output), then SIGKILL the
        component's process: the python running kfp.dsl.executor_main (under kfp.local's ``sh``, which must be
        left for kfp.local to reap: its exit status is what kfp.local sees)."""
        while not done.is_set():
            for directory in root.glob("*/train-lora/adapter.checkpoints"):
                if last_complete_checkpoint(str(directory)):
                    for child in psutil.Process().children(recursive=True):
                        try:
                            if "kfp.dsl.executor_main" in child.cmdline():  # an argument of python, not of sh
                                child.kill()
                                killed["pid"] = child.pid
                        except psutil.Error:
                            continue
                    if "pid" in killed:
                        while not _gone(killed["pid"]):
                            time.sleep(0.05)
                        killed["resume_from"] = last_complete_checkpoint(str(directory))
                        return
            time.sleep(0.2)

    caplog.set_level(logging.INFO)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    killer = threading.Thread(target=kill_first_attempt, daemon=True)
    killer.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in OFFLINE.items():
                patch.setenv(name, value)
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            retry_pipeline()
    finally:
        done.set()
        killer.join(30)
    assert "pid" in killed, "the first attempt finished before a checkpoint could be seen"
    assert "failed (attempt 1/2)" in caplog.text  # kfp.local saw the kill and retried

    task_dir = next(root.glob("*/train-lora"))
    outputs = json.loads((task_dir / "executor_output.json").read_text())["artifacts"]
    metrics = outputs["metrics"]["artifacts"][0]["metadata"]
    expected = int(Path(str(killed["resume_from"])).name.removeprefix("checkpoint-"))
    assert metrics["resumed_from_step"] == expected >= SAVE_STEPS
    assert metrics["global_step"] == STEPS
    adapter = Path(outputs["adapter"]["artifacts"][0]["uri"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}


# -- no half-written results ----------------------------------------------------------------------------------
_DIE = "import os, signal\ndef die(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGKILL)\n"


def _run_dying(script: str, *args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _DIE + script, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_atomic_writers_killed_midway_leave_the_old_result_or_none(tmp_path):
    """SIGKILL inside atomic_file / atomic_dir, with bytes already written: the final name holds the previous
    complete result (or nothing), never the half-written one."""
    (tmp_path / "kept.json").write_text("old")
    (tmp_path / "kept_dir").mkdir()
    (tmp_path / "kept_dir" / "weights").write_text("old")
    (tmp_path / "kept_dir" / OWN_OUTPUT).write_text("")  # an earlier output of kubetune's, which it may replace
    _run_dying(
        "from pathlib import Path\nfrom kubetune.storage import atomic_dir, atomic_file\nimport sys\n"
        "target = Path(sys.argv[1])\n"
        "writer = atomic_dir if sys.argv[2] == 'dir' else atomic_file\n"
        "with writer(target) as staging:\n"
        "    path = Path(staging) / 'weights' if sys.argv[2] == 'dir' else Path(staging)\n"
        "    path.write_text('half')\n"
        "    die()\n",
        str(tmp_path / "kept.json"), "file", cwd=tmp_path)
    for name, kind in (("kept_dir", "dir"), ("new.json", "file"), ("new_dir", "dir")):
        _run_dying(
            "from pathlib import Path\nfrom kubetune.storage import atomic_dir, atomic_file\nimport sys\n"
            "writer = atomic_dir if sys.argv[2] == 'dir' else atomic_file\n"
            "with writer(sys.argv[1]) as staging:\n"
            "    path = Path(staging) / 'weights' if sys.argv[2] == 'dir' else Path(staging)\n"
            "    path.write_text('half')\n"
            "    die()\n",
            str(tmp_path / name), kind, cwd=tmp_path)
    assert (tmp_path / "kept.json").read_text() == "old"
    assert (tmp_path / "kept_dir" / "weights").read_text() == "old"
    assert not (tmp_path / "new.json").exists() and not (tmp_path / "new_dir").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name not in {"kept.json", "kept_dir"}]
    assert leftovers and all(is_partial(p) for p in leftovers)  # hidden staging names, which nothing reads


def test_killed_prep_leaves_no_dataset(tmp_path):
    """Prep killed while writing its parquet files: neither file exists, and the train step says to run prep."""
    out = tmp_path / "prep"
    _run_dying(
        "import sys\nimport kubetune.data.prepare as prepare\nfrom kubetune.config import DataConfig\n"
        "from kubetune.tiny import make_tokenizer\n"
        "real = prepare._write_parquet\n"
        "def dying(table, indices, path, chunk_rows=4096):\n"
        "    real(table, indices[:2], path, chunk_rows)\n"
        "    die()\n"
        "prepare._write_parquet = dying\n"
        "prepare.prepare_dataset(DataConfig(max_length=256, max_samples=40), make_tokenizer(), sys.argv[1], sys.argv[2])\n",
        str(out / "train.parquet"), str(out / "eval.parquet"), cwd=tmp_path)
    assert _finished_files(out) == []
    assert any(is_partial(p) for p in out.iterdir())  # bytes were written, under hidden names

    from kubetune.cli import main as step_main

    with pytest.raises(SystemExit) as exit_info:
        step_main(["train", f"--model={tmp_path}", f"--train_data={out / 'train.parquet'}",
                   f"--adapter={tmp_path / 'adapter'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_killed_quantize_leaves_no_model(tiny_model_dir, tmp_path, capsys):
    """Quantize killed after the model and tokenizer are saved but before the directory is moved into place: the
    model directory does not exist, and loading it says so with the fix."""
    from kubetune.errors import KubetuneError
    from kubetune.modeling import resolve_model_source

    target = tmp_path / "model"
    _run_dying(
        "import sys\nimport kubetune.modeling as modeling\nfrom kubetune.config import QuantConfig\n"
        "real = modeling.content_hash\n"
        "def dying(directory):\n"
        "    if '.partial-' in str(directory):\n"
        "        die()\n"
        "    return real(directory)\n"
        "modeling.content_hash = dying\n"
        "modeling.quantize_model(sys.argv[1], sys.argv[2], QuantConfig())\n",
        tiny_model_dir, str(target), cwd=tmp_path)
    assert not target.exists()
    staged = [p for p in tmp_path.iterdir() if is_partial(p)]
    assert staged and any(p.suffix == ".safetensors" for p in staged[0].iterdir())  # it got that far
    with pytest.raises(KubetuneError, match="does not exist"):
        resolve_model_source(str(target))


# -- MLflow outages -------------------------------------------------------------------------------------------
class RestartableServer:
    """A real ``mlflow server`` (sqlite backend) on a fixed port that can be stopped and started again."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server", "--host", "127.0.0.1",
                   "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.starts += 1
        with (self.root / f"server-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                            start_new_session=True)
        _wait_for(lambda: _healthy(self.uri), f"mlflow server at {self.uri}", self.process,
                  self.root / f"server-{self.starts}.log", timeout_s=SERVER_START_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@pytest.fixture
def server(tmp_path):
    server = RestartableServer(tmp_path / "mlflow-server")
    server.root.mkdir()
    yield server
    server.stop()


class Background:
    """Run ``action`` in a thread once ``condition`` holds; errors surface in :meth:`join`."""

    def __init__(self, condition: Callable[[], object], *actions: Callable[[], None]):
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(condition, actions), daemon=True)
        self.thread.start()

    def _run(self, condition, actions) -> None:
        try:
            while not condition():
                if self.done.wait(0.2):
                    return
            for action in actions:
                action()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self) -> None:
        self.done.set()
        self.thread.join(SERVER_START_TIMEOUT_S + 60)
        if self.error:
            raise self.error


def _train(model_dir: str, prepared: Path, tmp_path: Path, uri: str, run: str) -> dict:
    from kubetune.config import LoraSettings, TrainConfig
    from kubetune.steps import TrainJob, train
    from kubetune.tracking import Tracking

    return train(TrainJob(
        model_dir, str(prepared / "train.parquet"), str(tmp_path / "adapter"), lora=LoraSettings(lora_r=4),
        train=TrainConfig(max_steps=STEPS, save_steps=SAVE_STEPS, learning_rate=5e-3), max_length=MAX_LENGTH,
        checkpoint_dir=str(tmp_path / "checkpoints"), tracking=Tracking(uri, "outage", "", run, run),
        data_metadata={"max_length": MAX_LENGTH, "dataset": "kubetune://tcm-demo"},
    ))


def _quick_mlflow_failures(monkeypatch) -> None:
    """A refused connection fails at once instead of after the MLflow client's own retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _assert_backfilled(uri: str, result: dict) -> None:
    from mlflow import MlflowClient

    assert result["tracking_report"] == ""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train.loss")}
    assert steps == set(range(1, STEPS + 1))  # every step, those logged while the server was away included
    assert run.data.params["lora.lora_r"] == "4" and "sft.train_loss" in run.data.metrics
    assert "adapter" in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["kubetune.lora_r"] == "4"  # the lineage evaluation registers the adapter with


@pytest.mark.slow
def test_mlflow_down_before_training_and_back_within_the_step(quantized_model_dir, prepared, server, tmp_path,
                                                              monkeypatch, caplog):
    """No server when training starts; it comes back while the step delivers its queued calls at the end (finish
    waits up to two minutes): the run is created then and backfilled with everything."""
    _quick_mlflow_failures(monkeypatch)
    caplog.set_level(logging.WARNING)
    comeback = Background(lambda: (tmp_path / "adapter").is_dir(), server.start)
    result = _train(quantized_model_dir, prepared, tmp_path, server.uri, "down-before")
    comeback.join()
    assert "unreachable" in caplog.text  # said at the start, without stopping the step
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    _assert_backfilled(server.uri, result)


@pytest.mark.slow
def test_mlflow_down_during_training_and_back_within_the_step(quantized_model_dir, prepared, server, tmp_path,
                                                              monkeypatch, caplog):
    """The server goes away after the first checkpoint and comes back later in the step: nothing is lost."""
    _quick_mlflow_failures(monkeypatch)
    caplog.set_level(logging.WARNING)
    server.start()
    outage = Background(lambda: last_complete_checkpoint(str(tmp_path / "checkpoints")), server.stop, server.start)
    result = _train(quantized_model_dir, prepared, tmp_path, server.uri, "down-during")
    outage.join()
    assert server.starts == 2 and "queued for retry" in caplog.text  # calls did fail while it was away
    _assert_backfilled(server.uri, result)


@pytest.mark.slow
def test_mlflow_down_for_good_the_steps_finish_and_report_it(quantized_model_dir, prepared, server, tmp_path,
                                                             monkeypatch, caplog):
    """The server goes away during training and never comes back: training and evaluation both finish and write
    their adapter and report; each says at the end, in its result and in the log, what was not logged where."""
    from kubetune.config import EvalConfig
    from kubetune.steps import evaluate
    from kubetune.tracking import Tracker, Tracking

    _quick_mlflow_failures(monkeypatch)
    # The steps wait up to two minutes for a server that is coming back; this one never does.
    finish = Tracker.finish
    monkeypatch.setattr(Tracker, "finish", lambda self, *, timeout_s=60.0, **kw: finish(self, timeout_s=2, **kw))
    caplog.set_level(logging.WARNING)
    server.start()
    outage = Background(lambda: last_complete_checkpoint(str(tmp_path / "checkpoints")), server.stop)
    trained = _train(quantized_model_dir, prepared, tmp_path, server.uri, "down-for-good")
    outage.join()
    evaluated = evaluate(
        quantized_model_dir, str(tmp_path / "adapter"), str(prepared / "eval.parquet"), str(tmp_path / "report"),
        EvalConfig(probe_questions=["久咳不愈怎么治疗？"], max_new_tokens=4, max_generation_samples=2),
        tracking=Tracking(server.uri, "outage", trained["mlflow_run_id"], "down-for-good", "down-for-good"),
    )
    assert trained["global_step"] == STEPS and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "<html" in (tmp_path / "report").read_text(encoding="utf-8").lower()
    assert trained["mlflow_run_id"]  # opened before the outage; the report names what did not reach it
    for result in (trained, evaluated):
        report = result["tracking_report"]
        assert "MLflow tracking incomplete" in report and server.uri in report and "not delivered" in report
        assert report in caplog.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("MLflow tracking incomplete" in r.getMessage() for r in errors)
