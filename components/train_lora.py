"""LoRA SFT component (GPU)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output
from kubetune.containers.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_lora(
    model: Input[Model],
    train_data: Input[Dataset],
    adapter: Output[Model],
    metrics: Output[Metrics],
    training_report: Output[HTML],
    mlflow_store: Output[Artifact],
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str = "all-linear",
    learning_rate: float = 2e-4,
    lr_scheduler: str = "cosine",
    warmup_ratio: float = 0.03,
    num_epochs: float = 1.0,
    max_steps: int = 0,
    batch_tokens: int = 0,
    gradient_accumulation: int = 1,
    lean: bool = False,
    save_steps: int = 50,
    seed: int = 42,
    checkpoint_dir: str = "",
    checkpoint_root: str = "",
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "kubetune",
    mlflow_required: bool = True,
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    num_gpus: int = 1,
    trust_remote_code: bool = False,
) -> NamedTuple("TrainOutputs", mlflow_run_id=str):
    """Train a LoRA adapter with TRL's SFTTrainer on the 4-bit model: loss on completions only, packed batches
    in which each sample attends only to itself, checkpoints that a retry resumes from, data-parallel over
    num_gpus GPUs. Logs parameters, dataset statistics, per-step metrics and the adapter to MLflow.

    Args:
        model: The 4-bit base model from quantize_model.
        train_data: Prepared training rows from prepare_dataset.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        target_modules: Comma-separated module names to adapt, or all-linear for every linear layer but the
            output head.
        learning_rate: Peak learning rate.
        lr_scheduler: Learning-rate schedule (linear, cosine, constant, ...).
        warmup_ratio: Fraction of steps spent warming up.
        num_epochs: Epochs over the training set (ignored when max_steps > 0).
        max_steps: Stop after this many optimizer steps (0 = run num_epochs).
        batch_tokens: Tokens per packed micro-batch (0 = auto: sized from free GPU memory, 8x max_length on
            the CPU).
        gradient_accumulation: Micro-batches per optimizer step.
        lean: Lean mode for small GPUs: checkpointing with CPU offload, input embedding in host memory,
            8,192-token packed batches, 8-bit optimizer.
        save_steps: Checkpoint every N optimizer steps (0 = only at the end).
        seed: Seed for sampling, the train/eval split and training.
        checkpoint_dir: Where SFT checkpoints go; a retried step resumes from the last one. Empty =
            /cache/checkpoints/<run id> when a cache volume is mounted, else beside the output (lost with the
            pod).
        checkpoint_root: Volume directory (survives pod restarts) for per-run checkpoints; empty = beside the
            output.
        mlflow_tracking_uri: MLflow tracking URI; empty = MLFLOW_TRACKING_URI of the pod, else a local sqlite
            store.
        mlflow_experiment: MLflow experiment name.
        mlflow_required: On a cluster, stop the SFT and evaluation steps at start when they have no MLflow
            tracking server; false keeps their records in their mlflow_store output instead, to load later
            with `kubetune mlflow-import`.
        kfp_run_id: The KFP run id, tagged on the MLflow run.
        kfp_run_name: The KFP run name, used as the MLflow run name.
        num_gpus: Data-parallel processes, one per GPU (torchrun, DDP); set it to the step's accelerator
            count.
        trust_remote_code: Allow model and tokenizer code from the hub.

    Returns:
        adapter: The LoRA adapter (safetensors) and tokenizer; metadata holds the MLflow run id.
        metrics: Training metrics (loss, tokens/s, ...), shown on the Kubeflow run page.
        training_report: Loss, learning rate and tokens/s by step, the speed plan and the MLflow link, shown on
            the Kubeflow run page.
        mlflow_store: The MLflow store when there was no tracking server (mlflow_required=false), else a note
            naming the server.
        mlflow_run_id: The MLflow run that the evaluation logs into as well.
    """
    from collections import namedtuple

    from kubetune import steps
    from kubetune.config import LoraSettings, TrainConfig
    from kubetune.errors import clear_errors
    from kubetune.tracking import Tracking

    with clear_errors():
        result = steps.train(steps.TrainJob(
            model.path, train_data.path, adapter.path,
            lora=LoraSettings(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=target_modules),
            train=TrainConfig(
                learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
                num_epochs=num_epochs, max_steps=max_steps, batch_tokens=batch_tokens,
                gradient_accumulation=gradient_accumulation, lean=lean, save_steps=save_steps, seed=seed,
                trust_remote_code=trust_remote_code,
            ),
            max_length=steps.prepared_max_length(train_data.metadata),
            checkpoint_dir=steps.checkpoint_location(checkpoint_dir, checkpoint_root, kfp_run_id, adapter.path),
            tracking=Tracking(mlflow_tracking_uri, mlflow_experiment, "", kfp_run_id, kfp_run_name,
                              required=mlflow_required, store_dir=mlflow_store.path),
            model_metadata=dict(model.metadata),
            data_metadata=dict(train_data.metadata),
            nproc=num_gpus,
        ))
    for name, value in steps.numbers(result).items():
        metrics.log_metric(name, value)
    adapter.metadata.update(steps.adapter_metadata(result, model.metadata, mlflow_experiment))
    steps.write_training_page(result, training_report.path)
    if result["tracking_report"]:
        print(result["tracking_report"], flush=True)
    return namedtuple("TrainOutputs", ["mlflow_run_id"])(result["mlflow_run_id"])
