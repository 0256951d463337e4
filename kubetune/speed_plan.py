"""The speed plan of an SFT run: attention kernel, checkpointing, packed batch size, optimizer and kernels,
decided once from the hardware (and agreed across the ranks of a data-parallel run). The plan is logged with
every run, with the reasons for each choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kubetune.config import TrainConfig
from kubetune.errors import KubetuneError

LEAN_BATCH_TOKENS = 8192  # 7.5 GiB peak for a 7B model on an H100 (benchmarks/RESULTS.md)

# Bytes of saved activations per token per decoder layer without checkpointing, in units of hidden and
# intermediate size (bf16, LoRA on all linear layers, Liger norms/SwiGLU). Calibrated on an H100 with the 7B
# shape: 8,192 packed tokens peaked at 43.7 GiB, i.e. about 162 KB per token and layer; this gives 171 KB.
_ACT_HIDDEN_FACTOR = 16
_ACT_INTERMEDIATE_FACTOR = 6


@dataclass
class SpeedPlan:
    """How a run uses the hardware; decided by :func:`plan_speed`."""

    attention: str
    gradient_checkpointing: bool
    batch_tokens: int
    per_device_batch: int
    optimizer: str
    liger: bool
    fused_lora: bool
    activation_offloading: bool
    host_embedding: bool
    bf16: bool
    reasons: list[str] = field(default_factory=list)


def _activation_bytes_per_token(model_config, checkpointing: bool) -> float:
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    per_layer = _ACT_HIDDEN_FACTOR * hidden + _ACT_INTERMEDIATE_FACTOR * inter
    if checkpointing:  # one layer input kept per layer, one layer's activations alive during recompute
        return 2 * hidden * layers + per_layer
    return per_layer * layers


def plan_speed(
    train: TrainConfig, max_length: int, model_config, *, weights_bytes: int = 0, free_bytes: int | None = None
) -> SpeedPlan:
    """Pick attention, checkpointing, packed batch size, optimizer and kernels for this hardware.

    Called before the model is loaded: ``weights_bytes`` (the size of its weights on disk) is subtracted from
    the free GPU memory.
    """
    import torch

    cuda = torch.cuda.is_available()
    reasons: list[str] = []
    attention = train.attention
    if attention == "auto":
        # Packed rows hold many short samples: varlen attention costs O(sum of L^2), a masked full-row kernel
        # O((sum of L)^2). On CUDA it is FlashAttention; on the CPU a per-sample SDPA loop.
        attention = "kubetune_varlen" if train.packing else "sdpa"
        reasons.append(f"attention={attention}")
    elif attention == "varlen":
        attention = "kubetune_varlen"
    if attention == "kubetune_varlen" and not train.packing:
        raise KubetuneError("attention=varlen needs packing=true", "enable packing or choose attention=sdpa")
    bf16 = (not cuda) or torch.cuda.is_bf16_supported()

    liger = False
    if train.fused_kernels and cuda:
        try:
            import liger_kernel  # noqa: F401

            liger = True
        except ImportError:
            reasons.append("fused kernels off: liger-kernel is not installed (pip install kubetune[fast])")

    offloading = False
    if train.lean:
        checkpointing = train.gradient_checkpointing != "off"
        # Checkpointed layer inputs go to pinned CPU memory, so a larger packed batch fits in a few GiB.
        offloading = cuda and checkpointing
        batch_tokens = train.batch_tokens or (LEAN_BATCH_TOKENS if cuda else 2 * max_length)
        optimizer = "adamw_8bit" if train.optimizer == "auto" and cuda else train.optimizer
        if optimizer == "auto":
            optimizer = "adamw_torch"
        reasons.append(
            "lean mode: checkpointing with CPU offload of checkpoints, input embedding in host memory, 8-bit optimizer"
        )
    else:
        optimizer = train.optimizer
        if optimizer == "auto":
            optimizer = "adamw_torch_fused" if cuda else "adamw_torch"
        if cuda:
            if free_bytes is None:
                free_bytes = torch.cuda.mem_get_info()[0]
            # Leave room for allocator fragmentation, LoRA weights, optimizer state and dequantized weights.
            budget = 0.85 * (free_bytes - weights_bytes) - 2.0 * 2**30
            no_ckpt = _activation_bytes_per_token(model_config, checkpointing=False)
            fits = int(budget // no_ckpt)
            if train.gradient_checkpointing == "on":
                checkpointing = True
            elif train.gradient_checkpointing == "off":
                checkpointing = False
            else:
                checkpointing = fits < max_length
                reasons.append(
                    f"checkpointing {'on' if checkpointing else 'off'}: {free_bytes / 2**30:.1f} GiB free holds "
                    f"{max(fits, 0)} tokens of activations without it"
                )
            if train.batch_tokens:
                batch_tokens = train.batch_tokens
            else:
                per_token = _activation_bytes_per_token(model_config, checkpointing)
                batch_tokens = max(max_length, min(int(budget // per_token), 16 * max_length, 32768))
                reasons.append(f"batch_tokens={batch_tokens} sized from free GPU memory")
        else:
            checkpointing = train.gradient_checkpointing == "on"
            batch_tokens = train.batch_tokens or 8 * max_length
    # Packed rows hold up to max_length tokens each (unpacked rows are padded to it): rows per micro-batch.
    per_device_batch = max(1, batch_tokens // max_length)
    return SpeedPlan(
        attention=attention,
        gradient_checkpointing=checkpointing,
        batch_tokens=per_device_batch * max_length,
        per_device_batch=per_device_batch,
        optimizer=optimizer,
        liger=liger,
        fused_lora=train.fused_kernels,
        activation_offloading=offloading,
        host_embedding=train.lean and cuda,
        bf16=bf16,
        reasons=reasons,
    )


def init_distributed(world: int) -> str | None:
    """Under torchrun (``world`` > 1): bind this rank to its GPU (``LOCAL_RANK``) and join the process group (NCCL
    on CUDA, gloo on the CPU) before the plan is made, so free memory is read on this rank's own GPU and the ranks
    can agree on one plan. Returns the backend, or None for a single process."""
    if world <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():  # the trainer (accelerate) then uses this group
        dist.init_process_group(
            backend, timeout=timedelta(minutes=30),
            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if cuda else {}),
        )
    return backend


def agree_across_ranks(plan: SpeedPlan) -> SpeedPlan:
    """One plan for every rank: DDP needs the same number of batches per rank, so all take the smallest packed
    batch any rank's free memory allows, and checkpointing if any rank needs it (a smaller batch with
    checkpointing fits wherever the larger one without it did)."""
    import torch.distributed as dist

    from kubetune.distributed import max_across_ranks

    smallest_batch, checkpointing = max_across_ranks([-plan.per_device_batch, int(plan.gradient_checkpointing)])
    per_device_batch, checkpointing = -smallest_batch, bool(checkpointing)
    if (per_device_batch, checkpointing) != (plan.per_device_batch, plan.gradient_checkpointing):
        plan.reasons.append(
            f"{dist.get_world_size()} ranks agreed on per_device_batch={per_device_batch}, checkpointing "
            f"{'on' if checkpointing else 'off'} (rank {dist.get_rank()} alone planned {plan.per_device_batch}, "
            f"{'on' if plan.gradient_checkpointing else 'off'})"
        )
        plan.batch_tokens = plan.batch_tokens // plan.per_device_batch * per_device_batch
        plan.per_device_batch, plan.gradient_checkpointing = per_device_batch, checkpointing
    return plan
