"""QLoRA SFT throughput: the baseline recipe and kubetune's SFT defaults, in one process on one GPU.

Model: Qwen2.5-7B shape with random weights (throughput does not depend on the weights), nf4 + double quant,
LoRA r16 on q/k/v/o/gate/up/down, max length 2048, 4,000 samples with lognormal lengths (median 350, clipped to
32-2048). "Useful" tokens are non-padding tokens. The baseline is the use case's recipe in plain TRL (batch 2,
grad-accum 4, padding, adamw_8bit, checkpointing); kubetune runs through ``kubetune.sft.train_lora`` itself.

    python benchmarks/sft_throughput.py [baseline] [kubetune] [lean] [--steps 12] [--layers 28]

Prints one JSON line per configuration and a final summary line with ratios to the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 3584, 18944, 28, 4, 152064
H100_DENSE_BF16 = 989e12  # datasheet dense bf16 peak of an H100 SXM


def shape_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
                       tie_word_embeddings=False)


def build_model(root: Path, layers: int) -> tuple[Path, Path]:
    """bf16 random model with a word-level tokenizer, and its nf4 copy made by kubetune's quantize step."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from kubetune.config import QuantConfig
    from kubetune.modeling import quantize_model

    bf16_dir, nf4_dir = root / f"q7b-{layers}", root / f"q7b-{layers}-nf4"
    if not (bf16_dir / "config.json").exists():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(shape_config(layers), dtype=torch.bfloat16)
        model.save_pretrained(bf16_dir)
        del model
        vocab = {f"t{i}": i for i in range(VOCAB - 3)}
        vocab.update({"<|pad|>": VOCAB - 3, "<|endoftext|>": VOCAB - 2, "<|unk|>": VOCAB - 1})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                unk_token="<|unk|>").save_pretrained(bf16_dir)
        torch.cuda.empty_cache()
    if not (nf4_dir / "config.json").exists():
        quantize_model(str(bf16_dir), str(nf4_dir), QuantConfig(quantization="nf4", double_quant=True))
        torch.cuda.empty_cache()
    return bf16_dir, nf4_dir


def sample_lengths(n: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(350), 0.8, n).astype(int), 32, 2048)


def token_rows(lengths: np.ndarray, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(100, 150000, n).tolist() for n in lengths]


def flops_per_token(layers: int, lengths: np.ndarray) -> float:
    """4N (forward + input gradients; frozen base weights get no weight gradients) plus causal attention
    within each sample: 6 * layers * hidden * L^2 per sample of length L (forward and backward)."""
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS) * KV_HEADS + 3 * HIDDEN * INTERMEDIATE
    matmul_params = layers * per_layer + HIDDEN * VOCAB
    attention = 6 * layers * HIDDEN * float((lengths.astype(np.float64) ** 2).sum()) / float(lengths.sum())
    return 4 * matmul_params + attention


class Clock:
    """Useful tokens/s from optimizer step ``start`` to the end (skips warm-up and compilation)."""

    def __init__(self, start: int = 3):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == start:
                    torch.cuda.synchronize()
                    clock.t0, clock.tok0 = time.time(), state.num_input_tokens_seen

            def on_train_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                clock.tokens_per_s = (state.num_input_tokens_seen - clock.tok0) / (time.time() - clock.t0)

        self.callback = _Callback()
        self.tokens_per_s = float("nan")


class Profile:
    """With ``--profile``: the GPU kernels of optimizer steps 4 and 5 (after warm-up), printed by total time."""

    enabled = False

    def __init__(self):
        from transformers import TrainerCallback

        self.profiler = None
        outer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if outer.enabled and state.global_step == 3:
                    outer.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                        torch.profiler.ProfilerActivity.CUDA])
                    outer.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if outer.profiler is not None and state.global_step == 5:
                    torch.cuda.synchronize()
                    outer.profiler.__exit__(None, None, None)
                    table = outer.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                                                max_name_column_width=90)
                    print("PROFILE (2 optimizer steps)\n" + table, flush=True)
                    outer.profiler = None

        self.callback = _Callback()


def run_baseline(bf16_dir: Path, rows: list[list[int]], steps: int) -> dict:
    """The use case's recipe in plain TRL: batch 2, grad-accum 4, padding, adamw_8bit, checkpointing."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(
        bf16_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         optim="adamw_8bit", weight_decay=0.01, learning_rate=2e-4, bf16=True, logging_steps=1,
                         report_to="none", save_strategy="no", include_num_input_tokens_seen="non_padding",
                         max_length=2048, lr_scheduler_type="linear", warmup_steps=2, dataloader_num_workers=2,
                         gradient_checkpointing=True, disable_tqdm=True)
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                             peft_config=lora, callbacks=[clock.callback])
        trainer.train()
    del trainer, model
    return {"tokens_per_s": clock.tokens_per_s}


def run_kubetune(nf4_dir: Path, rows: list[list[int]], steps: int, **overrides) -> dict:
    """kubetune's SFT step exactly as the pipeline runs it, with its hardware-derived defaults."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kubetune.config import LoraSettings, TrainConfig
    from kubetune.sft import train_lora

    clock = Clock()
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "train.parquet"
        pq.write_table(pa.table({"prompt": [""] * len(rows), "completion": [""] * len(rows), "input_ids": rows,
                                 "completion_mask": [[1] * len(r) for r in rows],
                                 "length": [len(r) for r in rows]}), data)
        train = TrainConfig(max_steps=steps, save_steps=0, warmup_ratio=0.1, **overrides)
        lora = LoraSettings(lora_r=16, lora_alpha=16, target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
        result = train_lora(str(nf4_dir), str(data), str(Path(work) / "adapter"), lora=lora, train=train,
                            max_length=2048, checkpoint_dir=str(Path(work) / "ckpt"), extra_callbacks=[clock.callback, Profile().callback])
    plan = result.plan
    return {"tokens_per_s": clock.tokens_per_s, "attention": plan.attention, "checkpointing": plan.gradient_checkpointing,
            "batch_tokens": plan.batch_tokens, "optimizer": plan.optimizer, "liger": plan.liger,
            "offloading": plan.activation_offloading, "fused_lora": plan.fused_lora,
            "host_embedding": plan.host_embedding, "plan": plan.reasons}


def run_ablation(nf4_dir: Path, rows: list[list[int]], steps: int, **replaced) -> dict:
    """kubetune's defaults with pieces of ``kubetune.fused_lora`` replaced, to measure what each one gives."""
    from unittest.mock import patch

    import kubetune.fused_lora

    with patch.multiple(kubetune.fused_lora, **replaced):
        return run_kubetune(nf4_dir, rows, steps)


CONFIGS = {
    "baseline": lambda bf16, nf4, rows, steps: run_baseline(bf16, rows, steps),
    "kubetune": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps),
    "lean": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, lean=True),
    # PEFT's own LoRA forward instead of the fused update
    "kubetune_unfused": lambda bf16, nf4, rows, steps: run_ablation(nf4, rows, steps, fuse_lora_layers=lambda model: 0),
    # the fused update through cuBLAS addmm instead of the Triton kernel
    "kubetune_addmm": lambda bf16, nf4, rows, steps: run_ablation(nf4, rows, steps, _triton_kernel=lambda: None),
    "kubetune_log10": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, logging_steps=10),
    "kubetune_flex": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, attention="flex_attention"),
    "kubetune_sdpa": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, attention="sdpa"),
    "kubetune_gc": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, gradient_checkpointing="on"),
    "kubetune_noliger": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, fused_kernels=False),
    "kubetune_8k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, batch_tokens=8192),
    "kubetune_16k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, batch_tokens=16384),
    "lean_4k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, lean=True, batch_tokens=4096),
    "lean_8k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, lean=True, batch_tokens=8192),
}


def versions() -> dict:
    import peft
    import transformers
    import trl

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "trl": trl.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("bitsandbytes", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["baseline", "kubetune", "lean"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--root", default="/tmp/kubetune-bench")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of steps 4-5 of kubetune runs")
    args = parser.parse_args()
    Profile.enabled = args.profile
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    bf16_dir, nf4_dir = build_model(Path(args.root), args.layers)
    lengths = sample_lengths()
    rows = token_rows(lengths)
    fpt = flops_per_token(args.layers, lengths)
    results = {}
    for name in args.configs:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            result = CONFIGS[name](bf16_dir, nf4_dir, rows, args.steps)
        except Exception as exc:  # one failing configuration must not hide the others' figures
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "tokens_per_s": float("nan")}
        result.update(name=name, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      mfu_pct=round(100 * result["tokens_per_s"] * fpt / H100_DENSE_BF16, 1))
        result["tokens_per_s"] = round(result["tokens_per_s"])  if result["tokens_per_s"] == result["tokens_per_s"] else None
        results[name] = result
        print("RESULT", json.dumps(result), flush=True)
    base = (results.get("baseline") or {}).get("tokens_per_s")
    summary = {
        "gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "layers": args.layers,
        "steps": args.steps, "flops_per_token": fpt, **versions(),
        "results": {n: {"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "mfu_pct": r["mfu_pct"],
                        "ratio_to_baseline": round(r["tokens_per_s"] / base, 2) if base and r["tokens_per_s"] else None}
                    for n, r in results.items()},
    }
    print("SUMMARY", json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
