"""SIGTERM during SFT, as when a pod is preempted: a real training process saves checkpoint-N at the next step,
exits 143 without an adapter, and a rerun resumes from N; under torchrun every rank stops after the same step.
Plus the pieces on their own: ranks agreeing on the stop step, the handler's lifetime, and DataLoader workers
(none on the CPU) leaving the signalled process group."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune.preemption import StopOnSignal, exit_status, leave_process_group
from kubetune.sft import last_complete_checkpoint

STEPS_BEFORE_SIGNAL = 3
DEADLINE_S = 900  # generous: the machine running the tests may be busy


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _train(model: str, data: Path, root: Path, max_steps: int) -> list[str]:
    # save_steps far beyond the run: any checkpoint there is the one the signal made.
    return [sys.executable, "-m", "kubetune.cli", "train", f"--model={model}", f"--train_data={data}",
            f"--adapter={root / 'adapter'}", f"--checkpoint_dir={root / 'ckpt'}", f"--max_steps={max_steps}",
            "--save_steps=100000", "--max_length=256", "--lora_r=4", "--lora_alpha=8", "--batch_tokens=512",
            f"--mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}"]


def _signal_after_steps(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``command``, send it SIGTERM once it has done a few optimizer steps (the trainer prints one log dict per
    step), and return its exit status and output."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # on a thread, so the wait has a deadline
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output, steps, signalled, deadline = [], 0, False, time.monotonic() + DEADLINE_S
    try:
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
            output.append(line)
            steps += line.startswith("{'loss'")
            if steps == STEPS_BEFORE_SIGNAL and not signalled:
                process.send_signal(signal.SIGTERM)  # once, as the kubelet does
                signalled = True
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        process.kill()
    log = "".join(output)
    assert steps >= STEPS_BEFORE_SIGNAL, log[-4000:]
    return code, log


def _signal_checkpoint(checkpoint_dir: Path) -> tuple[Path, int]:
    """The one checkpoint there (save_steps lies beyond the run: the signal made it), checked complete."""
    checkpoint = Path(last_complete_checkpoint(str(checkpoint_dir)))
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert step >= STEPS_BEFORE_SIGNAL
    assert [p.name for p in checkpoint_dir.glob("checkpoint-*")] == [checkpoint.name]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    return checkpoint, step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_a_rerun_resumes(quantized_model_dir, prepare_sample, tmp_path):
    data = prepare_sample(max_length=256, max_samples=64) / "train.parquet"
    code, log = _signal_after_steps(_train(quantized_model_dir, data, tmp_path, max_steps=100000), tmp_path)
    assert code == exit_status(signal.SIGTERM) == 143, log[-4000:]
    checkpoint, step = _signal_checkpoint(tmp_path / "ckpt")
    assert (checkpoint / "rng_state.pth").is_file()
    assert f"kubetune: stopped by SIGTERM after saving {checkpoint}" in log
    assert not (tmp_path / "adapter").exists()  # a stopped run leaves no adapter to be taken as finished

    rerun = subprocess.run(_train(quantized_model_dir, data, tmp_path, max_steps=step + 2), cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    metrics = json.loads((tmp_path / "adapter.metrics.json").read_text())
    assert metrics["resumed_from_step"] == step and metrics["global_step"] == step + 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(quantized_model_dir, prepare_sample, tmp_path):
    """Two gloo ranks: SIGTERM reaches the step's launcher, which passes it to torchrun, which passes it to the
    ranks. They agree on one step, rank 0 saves it with both ranks' RNG states, and nothing hangs."""
    data = prepare_sample(max_length=256, max_samples=64) / "train.parquet"
    command = [*_train(quantized_model_dir, data, tmp_path, max_steps=100000), "--num_gpus=2"]
    code, log = _signal_after_steps(command, tmp_path)
    assert code != 0, log[-4000:]
    checkpoint, step = _signal_checkpoint(tmp_path / "ckpt")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    for rank in (0, 1):
        assert f"rank{rank} WARNING kubetune: SIGTERM received: saving checkpoint-{step}, then stopping" in log
    assert not (tmp_path / "adapter").exists()


_RANK = """
import json, os, signal
from types import SimpleNamespace

import torch.distributed as dist
from transformers import TrainerControl

from kubetune.preemption import StopOnSignal

dist.init_process_group("gloo")
stop, control = StopOnSignal(), TrainerControl()
with stop:
    if dist.get_rank() == 1:  # only rank 1 gets the signal
        os.kill(os.getpid(), signal.SIGTERM)
    stop.on_step_end(None, SimpleNamespace(global_step=5, max_steps=100), control)
print(json.dumps({"received": stop.received, "stopped_by": stop.stopped_by, "save": control.should_save,
                  "stop": control.should_training_stop}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_stop_after_the_same_step_when_one_got_the_signal(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                   "WORLD_SIZE": "2"})
             for rank in (0, 1)]
    try:
        results = [json.loads(rank.communicate(timeout=300)[0].strip().splitlines()[-1]) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [r["received"] for r in results] == [0, signal.SIGTERM]
    assert all(r == {**r, "stopped_by": signal.SIGTERM, "save": True, "stop": True} for r in results)


def test_the_handler_lives_only_while_training_and_spares_the_last_step():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat changes nothing
        last = SimpleNamespace(should_save=False, should_training_stop=False)
        stop.on_step_end(None, SimpleNamespace(global_step=8, max_steps=8), last)
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C after the signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == signal.SIGTERM and not stop.stopped_by
    assert not last.should_save and not last.should_training_stop  # the adapter is complete: finish the step
    assert signal.getsignal(signal.SIGTERM) is previous


def _mark_init(worker_id: int) -> None:
    os.environ["KUBETUNE_TEST_WORKER_INIT"] = str(worker_id)


class _Groups:
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> list[int]:
        return [os.getpid(), os.getpgid(0), int(os.environ.get("KUBETUNE_TEST_WORKER_INIT", "-1"))]


def test_data_workers_leave_the_process_group_a_pod_signal_reaches():
    """The worker init the callback installs: a group-wide SIGTERM (Argo's executor, torchrun) no longer kills the
    workers under the trainer; the trainer's own worker init still runs."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Groups(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=_mark_init)
    StopOnSignal().on_train_begin(None, None, None, train_dataloader=loader)
    assert loader.worker_init_fn.func is leave_process_group
    for pid, group, init in loader:
        assert pid != os.getpid() and group == pid != os.getpgid(0)
        assert init == 0
