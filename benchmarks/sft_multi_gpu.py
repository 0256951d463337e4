"""Data-parallel SFT scaling: kubetune's SFT step on 1 GPU and on N GPUs (DDP through torchrun), in one call.

Same model, data and clock as ``sft_throughput.py`` (Qwen2.5-7B shape, random weights, nf4 + double quant, LoRA r16
on q/k/v/o/gate/up/down, max length 2048, 4,000 lognormal-length samples; useful tokens/s from optimizer step 3 to
the end). Both runs go through ``kubetune.sft.train_lora`` with its hardware-derived defaults: the 1-GPU run in
one process, as the pipeline runs one GPU; the N-GPU run launched by ``kubetune.distributed.run_torchrun``, the
step's own launcher. Each rank keeps its own packed batch, so N GPUs process N times the tokens per optimizer step; useful tokens/s
counts every rank's tokens.

    source benchmarks/device_setup.sh && python3 benchmarks/sft_multi_gpu.py [--gpus 2] [--steps 12] [--layers 28]

The model is built once into --root (``--build`` does only that, e.g. in a first call on the same machine). Prints
one JSON line last: both throughputs, the scaling ratio (target >= 1.8x on 2 GPUs) and the plans; exits 1 when the
ratio misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SCALING_PER_GPU = 0.9  # 1.8x on 2 GPUs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 7B shape (default: %(default)s)")
    parser.add_argument("--root", default="/tmp/kubetune-bench", help="model cache directory (default: %(default)s)")
    parser.add_argument("--build", action="store_true",
                        help="only build the model (random 7B shape + its nf4 copy) into --root, then exit")
    # internal: one rank of a run
    parser.add_argument("--worker", default="", metavar="WORK_DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_data(path: Path) -> int:
    """The training rows of ``sft_throughput``, prepared as the SFT step reads them. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sft_throughput import sample_lengths, token_rows

    rows = token_rows(sample_lengths())
    pq.write_table(pa.table({"prompt": [""] * len(rows), "completion": [""] * len(rows), "input_ids": rows,
                             "completion_mask": [[1] * len(r) for r in rows], "length": [len(r) for r in rows]}), path)
    return len(rows)


def worker(work: Path, nf4_dir: str, steps: int) -> None:
    """One rank: the SFT step exactly as the pipeline runs it (as run_kubetune in sft_throughput); rank 0 reports."""
    import torch
    from sft_throughput import Clock

    from kubetune.config import LoraSettings, TrainConfig
    from kubetune.sft import train_lora

    clock = Clock()
    train = TrainConfig(max_steps=steps, save_steps=0, warmup_ratio=0.1)
    lora = LoraSettings(lora_r=16, lora_alpha=16, target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    # no CUDA call before train_lora: it binds this rank to its GPU first (a call here would open GPU 0)
    result = train_lora(nf4_dir, str(work / "train.parquet"), str(work / "adapter"), lora=lora, train=train,
                        max_length=2048, checkpoint_dir=str(work / "ckpt"), extra_callbacks=[clock.callback])
    peak = torch.cuda.max_memory_allocated() / 2**30
    peaks = torch.tensor([peak], device="cuda")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    if int(os.environ.get("RANK", "0")) == 0:
        plan = result.plan
        report = {"tokens_per_s": round(clock.tokens_per_s), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                  "gpu": torch.cuda.get_device_name(), "peak_gib_max_rank": round(float(peaks[0]), 2),
                  "global_step": result.metrics["global_step"], "attention": plan.attention,
                  "checkpointing": plan.gradient_checkpointing, "batch_tokens_per_gpu": plan.batch_tokens,
                  "optimizer": plan.optimizer, "liger": plan.liger, "plan": plan.reasons}
        (work / "result.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(nproc: int, args: argparse.Namespace, data: Path) -> dict:
    """One configuration in fresh processes: 1 GPU as the pipeline runs it (one process on GPU 0, no torchrun),
    more through the step's torchrun launcher."""
    from kubetune.distributed import child_env, run_torchrun

    with tempfile.TemporaryDirectory(prefix=f"kt-ddp{nproc}-") as tmp:
        work = Path(tmp)
        (work / "train.parquet").symlink_to(data)
        target = [__file__, f"--worker={work}", f"--root={args.root}", f"--steps={args.steps}", f"--layers={args.layers}"]
        started = time.time()
        try:
            if nproc == 1:  # a one-GPU pod sees one GPU
                subprocess.run([sys.executable, *target], env={**child_env(), "CUDA_VISIBLE_DEVICES": "0"}, check=True)
            else:
                run_torchrun(nproc, target, error_dir=work)
        except Exception as exc:  # one failing run must not hide the other's figures
            return {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "tokens_per_s": None}
        result = json.loads((work / "result.json").read_text())
        result["wall_s"] = round(time.time() - started, 1)
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sft_throughput import versions

    nf4_dir = str(Path(args.root) / f"q7b-{args.layers}-nf4")
    if args.build:  # in its own process, so the parent holds no CUDA context during the timed runs
        from sft_throughput import build_model

        build_model(Path(args.root), args.layers)
        return 0
    if args.worker:
        from kubetune.distributed import record_errors

        with record_errors():  # the launcher's message names the failing rank and its error
            worker(Path(args.worker), nf4_dir, args.steps)
        return 0

    from kubetune.distributed import visible_gpus

    gpus = visible_gpus()
    if gpus < args.gpus or args.gpus < 2:
        print(f"this benchmark needs --gpus >= 2 CUDA GPUs; {gpus} visible, --gpus {args.gpus}", file=sys.stderr)
        return 2
    subprocess.run([sys.executable, __file__, "--build", f"--root={args.root}", f"--layers={args.layers}"], check=True)
    with tempfile.TemporaryDirectory(prefix="kt-ddp-data-") as tmp:
        data = Path(tmp) / "train.parquet"
        rows = write_data(data)
        one = run(1, args, data)
        many = run(args.gpus, args, data)
    scaling = round(many["tokens_per_s"] / one["tokens_per_s"], 3) if one["tokens_per_s"] and many["tokens_per_s"] \
        else None
    target = round(TARGET_SCALING_PER_GPU * args.gpus, 2)
    summary = {
        "benchmark": "sft_multi_gpu", "date": time.strftime("%Y-%m-%d"), "gpu": one.get("gpu") or many.get("gpu"),
        "gpus": args.gpus, "layers": args.layers, "steps": args.steps, "rows": rows, **versions(),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE", ""),
        "one_gpu_tokens_per_s": one["tokens_per_s"], f"{args.gpus}_gpu_tokens_per_s": many["tokens_per_s"],
        "scaling": scaling, "target_scaling": target, "meets_target": bool(scaling and scaling >= target),
        "runs": {"1": one, str(args.gpus): many},
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["meets_target"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
