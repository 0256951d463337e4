"""LoRA SFT with TRL on a (4-bit) base model: packed, per-sample-isolated, resumable.

Speed settings are decided once, from the hardware, by :func:`kubetune.speed_plan.plan_speed`; the plan is logged
so every run says what it did and why. :func:`sft_args` and :func:`peft_config` turn settings and plan into TRL's
and PEFT's configs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.config import ALL_LINEAR, LoraSettings, TrainConfig, to_dict
from kubetune.errors import KubetuneError
from kubetune.speed_plan import SpeedPlan, agree_across_ranks, init_distributed, plan_speed
from kubetune.storage import atomic_dir

log = logging.getLogger("kubetune")

ADAPTER_METADATA_FILE = "kubetune_adapter.json"
MetricsSink = Callable[[dict[str, float], int], None]
def linear_module_names(model) -> list[str]:
    """Leaf names of the model's linear layers (4-bit ones included), the candidates for LoRA targets."""
    import torch

    names: set[str] = set()
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, lora: LoraSettings) -> list[str] | str:
    """Fail with the candidate names when a requested LoRA target matches no module."""
    targets = lora.target_list()
    if targets == ALL_LINEAR:
        return targets
    candidates = linear_module_names(model)
    missing = [t for t in targets if t not in candidates]
    if missing:
        raise KubetuneError(
            f"target_modules {', '.join(missing)} match no linear layer of this model",
            f"use {ALL_LINEAR} or some of: {', '.join(candidates)}",
        )
    return targets


def _state_step(checkpoint: Path) -> int:
    """The step recorded in a checkpoint's trainer_state.json (written last), or -1 when it is torn or unreadable."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def last_complete_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest ``checkpoint-N`` that was fully written (a kill during a save leaves an incomplete one)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    candidates = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        required = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
        if suffix.isdigit() and all((path / name).is_file() for name in required) and _state_step(path) == int(suffix):
            candidates.append((int(suffix), path))
    return str(max(candidates)[1]) if candidates else None


def check_checkpoint_settings(checkpoint: str | None, lora: LoraSettings) -> None:
    """A checkpoint of other LoRA settings cannot be resumed (its tensors have other shapes): say so, rather than
    failing inside the trainer with a size mismatch."""
    if not checkpoint:
        return
    try:
        saved = json.loads((Path(checkpoint) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    differ = [f"{name}={saved.get(key)} there, {value} now" for name, key, value in
              (("lora_r", "r", lora.lora_r), ("lora_alpha", "lora_alpha", lora.lora_alpha))
              if saved.get(key) is not None and saved.get(key) != value]
    if differ:
        raise KubetuneError(
            f"the checkpoints in {Path(checkpoint).parent} belong to a run with other LoRA settings ({'; '.join(differ)})",
            "give this run a checkpoint_dir of its own, or resume with the settings those checkpoints were made with",
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _step_callback(sink: MetricsSink | None, started: list[float]):
    import torch
    from transformers import TrainerCallback

    class StepMetrics(TrainerCallback):
        """Adds throughput to every log and forwards it to the sink (MLflow), rank 0 only."""

        def __init__(self) -> None:
            self.last_time = None
            self.last_tokens = 0
            self.rows: list[dict[str, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            started[0] = time.time()
            self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                logs["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            now = time.time()
            tokens = state.num_input_tokens_seen
            if tokens and now > self.last_time and tokens > self.last_tokens:
                logs["tokens_per_second"] = (tokens - self.last_tokens) / (now - self.last_time)
            logs["tokens_seen"] = tokens
            self.last_time, self.last_tokens = now, tokens
            numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.rows.append({"step": state.global_step, **numeric})
            if sink is not None:
                sink(numeric, state.global_step)
            if state.max_steps > 0 and "loss" in numeric:  # progress with the time left (a line per log)
                done = max(state.global_step, 1)
                left = (now - started[0]) / done * max(state.max_steps - state.global_step, 0)
                log.info("training step %d/%d · loss %.4g · %s left", state.global_step, state.max_steps,
                         numeric["loss"], _duration(left))

    return StepMetrics()


def sft_args(train: TrainConfig, plan: SpeedPlan, *, max_length: int, checkpoint_dir: str, world: int = 1,
             backend: str | None = None):
    """TRL's SFTConfig for these settings and speed plan: completion-only loss on BFD-packed, padding-free
    batches; checkpoints every ``save_steps`` into ``checkpoint_dir``; no reporting (kubetune logs to MLflow)."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=checkpoint_dir,
        max_length=max_length,
        packing=train.packing,
        packing_strategy="bfd",
        padding_free=train.packing,
        completion_only_loss=True,
        per_device_train_batch_size=plan.per_device_batch,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps or -1,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=plan.optimizer,
        bf16=plan.bf16 and torch.cuda.is_available(),
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=plan.liger,
        activation_offloading=plan.activation_offloading,
        logging_steps=train.logging_steps,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        save_only_model=False,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False if world > 1 else None,  # LoRA on every targeted layer gets a gradient
        ddp_backend=backend,
        use_cpu=backend == "gloo",  # accelerate runs CPU ranks as DDP only when told it is on the CPU
        disable_tqdm=True,
    )


def peft_config(lora: LoraSettings, targets: list[str] | str):
    """PEFT's LoraConfig for a causal LM; ``targets`` as :func:`check_target_modules` resolved them."""
    from peft import LoraConfig

    return LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


@dataclass
class TrainResult:
    adapter_dir: str
    metrics: dict[str, float]
    plan: SpeedPlan
    resumed_from_step: int
    history: list[dict[str, float]]


def train_lora(
    model_dir: str,
    train_path: str,
    adapter_dir: str,
    *,
    lora: LoraSettings,
    train: TrainConfig,
    max_length: int,
    checkpoint_dir: str,
    metrics_sink: MetricsSink | None = None,
    extra_callbacks: list | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the prepared dataset and save it (safetensors) with the tokenizer.

    Checkpoints go to ``checkpoint_dir``; when a complete checkpoint is there, training resumes from it.
    The adapter directory appears only once it is complete. SIGTERM or Ctrl-C during training saves a checkpoint
    and raises :class:`kubetune.preemption.StoppedBySignal` (the process exits 143 or 130).
    """
    import torch
    from transformers import AutoConfig
    from trl import SFTTrainer

    from kubetune import attention as varlen
    from kubetune.data import load_prepared
    from kubetune.fused_lora import fuse_lora_layers
    from kubetune.host_embedding import embed_on_host
    from kubetune.modeling import load_model, load_tokenizer, read_model_metadata
    from kubetune.preemption import StopOnSignal

    lora.validate()
    train.validate()
    check_checkpoint_settings(last_complete_checkpoint(checkpoint_dir), lora)  # before the model is loaded
    model_meta = read_model_metadata(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=train.trust_remote_code)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = init_distributed(world)
    weights_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=train.trust_remote_code)
    plan = agree_across_ranks(plan_speed(train, max_length, model_config, weights_bytes=weights_bytes))
    if plan.attention == varlen.NAME:
        varlen.register()
    model = load_model(model_dir, attention=plan.attention, trust_remote_code=train.trust_remote_code)
    model.config.use_cache = False
    if plan.host_embedding:
        embed_on_host(model)
    targets = check_target_modules(model, lora)
    dataset = load_prepared(train_path).select_columns(["input_ids", "completion_mask"])

    args = sft_args(train, plan, max_length=max_length, checkpoint_dir=checkpoint_dir, world=world, backend=backend)
    peft = peft_config(lora, targets)
    started = [time.time()]
    step_metrics = _step_callback(metrics_sink, started)
    stop = StopOnSignal()  # SIGTERM (a preempted pod): save checkpoint-N, stop, exit 143; the retry resumes
    # Rank 0 tokenizes and packs first; the other ranks then read its datasets cache instead of racing to write it.
    with args.main_process_first(local=True, desc="packing the training set"):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[step_metrics, stop, *(extra_callbacks or [])],
        )
    if plan.fused_lora:
        fuse_lora_layers(trainer.model)
    resume = last_complete_checkpoint(checkpoint_dir)
    resumed_from_step = int(resume.rsplit("-", 1)[-1]) if resume else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with stop:
        output = trainer.train(resume_from_checkpoint=resume)
        stop.raise_if_stopped(trainer)  # no adapter from a stopped run: the step must not look finished
    elapsed = time.time() - started[0]
    state = trainer.state
    metrics = {
        "train_loss": float(output.training_loss),
        "train_runtime_s": round(elapsed, 2),
        "global_step": state.global_step,
        "epochs": float(state.epoch or 0),
        "tokens_seen": float(state.num_input_tokens_seen),
        "tokens_per_second": float(state.num_input_tokens_seen) / max(elapsed, 1e-9),
        "resumed_from_step": resumed_from_step,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    losses = [row["loss"] for row in step_metrics.rows if "loss" in row]
    if losses:
        metrics["first_logged_loss"], metrics["final_logged_loss"] = losses[0], losses[-1]
    if torch.cuda.is_available():
        metrics["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)

    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as staging:
            trainer.model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (Path(staging) / ADAPTER_METADATA_FILE).write_text(
                json.dumps(
                    {
                        "base_model": model_meta.get("source", model_dir),
                        "base_model_revision": model_meta.get("revision", ""),
                        "base_model_sha256": model_meta.get("source_sha256", ""),
                        "quantization": model_meta.get("quant_quantization", "unknown"),
                        "double_quant": model_meta.get("quant_double_quant", False),
                        "lora": to_dict(lora),
                        "train": to_dict(train),
                        "max_length": max_length,
                        "speed_plan": asdict(plan),
                        "metrics": metrics,
                    },
                    indent=2,
                    default=str,
                )
            )
    # The other ranks return once the adapter is complete, so the step's processes end together.
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        plan=plan,
        resumed_from_step=resumed_from_step,
        history=step_metrics.rows,
    )
