"""Data-parallel SFT through the real launcher (torchrun, gloo) on the CPU with the tiny 4-bit model, plus the
launcher's plumbing: in-process single rank, process counts, environment, errors, the pipeline's process count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune import distributed, steps
from kubetune.config import LoraSettings, TrainConfig
from kubetune.errors import KubetuneError
from kubetune.steps import TrainJob
from kubetune.tracking import Tracking


@pytest.fixture(scope="module")
def prepared(prepare_sample):
    return prepare_sample(max_length=256, max_samples=64)


def _train(model_dir: str, train_path: str, root: Path, *, max_steps: int) -> dict:
    return steps.train(TrainJob(
        model_dir, train_path, str(root / "adapter"), nproc=2,
        lora=LoraSettings(lora_r=4, lora_alpha=8),
        train=TrainConfig(learning_rate=5e-3, max_steps=max_steps, save_steps=2, batch_tokens=512),
        max_length=256, checkpoint_dir=str(root / "ckpt"),
        tracking=Tracking(f"sqlite:///{root / 'mlflow.db'}", "ddp", registered_model="none"),
        model_metadata={"source": model_dir, "quant_quantization": "nf4"}, data_metadata={"max_length": 256},
    ))


@pytest.mark.slow
def test_two_gloo_ranks_write_one_adapter_and_log_once_then_resume(quantized_model_dir, prepared, tmp_path):
    from mlflow import MlflowClient
    from peft import PeftModel

    from kubetune.modeling import load_model
    from kubetune.sft import last_complete_checkpoint

    result = _train(quantized_model_dir, str(prepared / "train.parquet"), tmp_path, max_steps=3)
    assert result["global_step"] == 3 and result["mlflow_run_id"]
    adapter = tmp_path / "adapter"
    # one adapter, complete, nothing half-written beside it; every rank saved its RNG state in the checkpoint
    assert [p.name for p in tmp_path.iterdir() if (p / "adapter_config.json").is_file()] == ["adapter"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    checkpoint = Path(last_complete_checkpoint(str(tmp_path / "ckpt")))
    assert checkpoint.name == "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    PeftModel.from_pretrained(load_model(quantized_model_dir), str(adapter))

    # metrics logged once: one MLflow run, one train.loss point per optimizer step
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [run.info.run_id for run in runs] == [result["mlflow_run_id"]]
    assert [m.step for m in client.get_metric_history(result["mlflow_run_id"], "train.loss")] == [1, 2, 3]
    assert runs[0].data.metrics["sft.global_step"] == 3

    # a retry with a larger step budget resumes from the ranks' last checkpoint
    resumed = _train(quantized_model_dir, str(prepared / "train.parquet"), tmp_path, max_steps=4)
    assert resumed["resumed_from_step"] == 3 and resumed["global_step"] == 4


FAILING_WORKER = """
import os, time
from kubetune.distributed import record_errors
with record_errors():
    if os.environ["RANK"] == "1":
        raise RuntimeError("out of memory on rank 1")
    time.sleep(300)  # as if waiting in a collective for rank 1: torchrun must stop it
"""


@pytest.mark.slow
def test_one_failing_rank_fails_the_launch_with_its_error_and_stops_the_others(tmp_path):
    import time

    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    started = time.monotonic()
    with pytest.raises(KubetuneError, match=r"failed on rank 1 of 2: RuntimeError: out of memory on rank 1"):
        distributed.run_torchrun(2, [str(script)], error_dir=tmp_path)
    assert time.monotonic() - started < 240


def test_one_process_runs_in_this_process(monkeypatch):
    calls = []
    job = TrainJob("model", "train.parquet", "adapter", nproc=1, max_length=8)
    monkeypatch.setattr(steps, "train_here", lambda job: calls.append(job) or {"ok": 1})
    monkeypatch.setattr(distributed, "run_torchrun", lambda *a, **k: pytest.fail("nproc=1 must not launch torchrun"))
    assert steps.train(job) == {"ok": 1}
    assert calls == [job]


def test_under_torchrun_the_step_runs_as_its_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(steps, "train_here", lambda job: {"rank": 1})
    monkeypatch.setattr(distributed, "run_torchrun", lambda *a, **k: pytest.fail("torchrun inside torchrun"))
    assert steps.train(TrainJob("model", "train.parquet", "adapter", nproc=4)) == {"rank": 1}


def test_a_train_job_serialises_itself_for_the_ranks():
    job = TrainJob("model", "train.parquet", "adapter", lora=LoraSettings(lora_r=8, target_modules="q_proj,v_proj"),
                   train=TrainConfig(learning_rate=1e-3, lean=True), max_length=512, checkpoint_dir="ckpt",
                   tracking=Tracking("sqlite:///x.db", "exp", "run", "kfp-id", "kfp-name"),
                   model_metadata={"source": "m"}, data_metadata={"max_length": 512, "persona": "医师"}, nproc=2)
    assert TrainJob.from_json(job.to_json()) == job


def test_process_count_follows_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 0)
    assert distributed.resolve_nproc(0) == 1 and distributed.resolve_nproc(2) == 2  # gloo on the CPU
    assert distributed.runs_in_process(1) and not distributed.runs_in_process(2)
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 4)
    assert distributed.resolve_nproc(0) == 4 and distributed.resolve_nproc(2) == 2
    # one process on a 4-GPU node still goes through torchrun (the Trainer would use nn.DataParallel)
    assert not distributed.runs_in_process(1)
    with pytest.raises(KubetuneError, match="num_gpus=8 .* sees 4 GPU"):
        distributed.resolve_nproc(8)
    with pytest.raises(KubetuneError, match="negative"):
        distributed.resolve_nproc(-1)


def test_torchrun_command_and_environment():
    command = distributed.torchrun_command(2, ["-m", "kubetune.steps", "/tmp/work"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0"} <= set(command)
    assert command[-3:] == ["-m", "kubetune.steps", "/tmp/work"]
    env = distributed.child_env({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "OMP_NUM_THREADS": "4",
                                 "HF_TOKEN": "x"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["OMP_NUM_THREADS"] == "4" and env["HF_TOKEN"] == "x"


def test_a_killed_worker_is_reported(tmp_path):
    error = distributed._failure(2, -9, tmp_path)
    assert "no rank of 2 reported an error" in str(error) and "killed" in str(error)
    (tmp_path / "error-rank1.json").write_text(json.dumps({"rank": 1, "type": "KubetuneError", "message": "m",
                                                           "problem": "bad target", "fix": "use q_proj"}))
    error = distributed._failure(2, 1, tmp_path)
    assert (error.problem, error.fix) == ("rank 1 of 2 failed: bad target", "use q_proj")


def test_worker_entry_refuses_to_run_outside_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert steps.main(["/tmp/work"]) == 2


def test_step_command_takes_the_process_count():
    from kubetune.cli import build_parser

    common = ["train", "--model=m", "--train_data=t", "--adapter=a"]
    parser = build_parser()
    assert parser.parse_args(common).num_gpus == 0  # every visible GPU
    assert parser.parse_args([*common, "--nproc=2"]).num_gpus == 2
    # the component input's name, as the plain Argo Workflow passes it (a KFP number constant: 4.0)
    assert parser.parse_args([*common, "--num_gpus=4.0"]).num_gpus == 4


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_command_launches_and_only_rank_zero_writes(rank, tmp_path, monkeypatch, capsys):
    from kubetune.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "train.parquet").write_text("")
    calls = []
    result = {"mlflow_run_id": "r", "mlflow_run_url": "", "tracking_uri": "", "tracking_report": "", "global_step": 3}
    monkeypatch.setattr(steps, "train", lambda job: calls.append(job.nproc) or result)
    monkeypatch.setenv("RANK", rank)  # as under torchrun (e.g. a TrainJob's entrypoint)
    assert main(["train", f"--model={tmp_path / 'model'}", f"--train_data={tmp_path / 'train.parquet'}",
                 f"--adapter={tmp_path / 'adapter'}", "--max_length=256", "--nproc=2"]) == 0
    assert calls == [2]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("adapter"))
    printed = capsys.readouterr().out.strip()
    if rank == "0":
        assert written == ["adapter.metadata.json", "adapter.metrics.json", "adapter.training.html"]
        assert json.loads(printed.splitlines()[-1])["global_step"] == 3
    else:
        assert written == [] and not printed


@pytest.mark.parametrize(("gpu_count", "processes"), [(0, 1), (2, 2)])
def test_pipeline_accelerator_count_sets_the_process_count(gpu_count, processes, tmp_path):
    import yaml
    from kubetune.pipelines.finetune import PipelineOptions, compile_pipeline
    from kubetune.pipelines.placement import load_profile, override

    profile = override(load_profile("default"), gpu_count=gpu_count)
    path = compile_pipeline(str(tmp_path / "p.yaml"), PipelineOptions(profile=profile))
    documents = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    task = documents[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train-lora"]  # in the exit handler
    assert task["inputs"]["parameters"]["num_gpus"]["runtimeValue"]["constant"] == processes
    executor = documents[0]["deploymentSpec"]["executors"]["exec-train-lora"]["container"]
    assert executor["resources"]["accelerator"]["resourceCount"] == str(processes)
