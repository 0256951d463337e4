"""QLoRA SFT throughput: the seed recipe, kubetune's SFT defaults and Unsloth, on one GPU in one call.

Model: Qwen2.5-7B shape with random weights (throughput does not depend on the weights), nf4 + double quant,
LoRA r16 on q/k/v/o/gate/up/down, max length 2048, 4,000 samples with lognormal lengths (median 350, clipped to
32-2048). "Useful" tokens are non-padding tokens. The baseline (``seed``, also named ``baseline``) is the use
case's recipe in plain TRL (batch 2, grad-accum 4, padding, adamw_8bit, checkpointing); kubetune runs through
``kubetune.sft.train_lora`` itself. ``unsloth`` is the speed peer on the same shape and data: Unsloth with TRL's
padding-free packing (batch 4, grad-accum 2, its own checkpointing, adamw_8bit), in a process of its own with the
Unsloth wheel set in front on PYTHONPATH (Unsloth patches transformers, TRL and PEFT globally). The wheels come
from ``.whl-unsloth`` (``benchmarks/build_wheels.py``), installed into ``$KT_UNSLOTH_SITE`` (default
/tmp/site-unsloth) by ``benchmarks/device_setup.sh``.

    python benchmarks/sft_throughput.py [seed] [kubetune] [lean] [unsloth] [--steps 12] [--layers 28]

Prints one JSON line per configuration and a final summary line with ratios to the seed recipe and to Unsloth.
The same lines, with the GPU, date, versions and command, are appended to benchmarks/results.jsonl, and that file
is copied to ``$OUT/results.jsonl`` when ``OUT`` is set (the GPU call's files that come back).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 3584, 18944, 28, 4, 152064
H100_DENSE_BF16 = 989e12  # datasheet dense bf16 peak of an H100 SXM (the H200's is the same)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS_FILE = Path(__file__).resolve().parent / "results.jsonl"
UNSLOTH_TAG = "UNSLOTH_RESULT"  # the worker's result line


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
                          target_modules=LORA_TARGETS)
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
        lora = LoraSettings(lora_r=16, lora_alpha=16, target_modules=",".join(LORA_TARGETS))
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


class UnslothPeer:
    """Where the Unsloth wheel set is installed, and how long its process may take (set from the command line)."""

    site = os.environ.get("KT_UNSLOTH_SITE", "/tmp/site-unsloth")
    timeout_s = 480.0


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop a process and its children (the data-loading workers, which would keep its output open)."""
    try:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except Exception:  # gone already, or no psutil: the process itself still goes
        pass
    proc.kill()


def run_unsloth(bf16_dir: Path, steps: int) -> dict:
    """Unsloth on the same model, data and clock, in its own process (see ``unsloth_worker``): its output is
    streamed into this one's, prefixed with ``unsloth|``."""
    site = Path(UnslothPeer.site)
    if not (site / "unsloth").is_dir():
        raise RuntimeError(f"no Unsloth in {site}: carry .whl-unsloth and source benchmarks/device_setup.sh "
                           "(it installs the set there), or set KT_UNSLOTH_SITE")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--unsloth-worker", str(bf16_dir), "--steps", str(steps)]
    result = None
    # Unsloth writes its compiled cache into the working directory: a scratch one keeps the checkout clean.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(UnslothPeer.timeout_s, _kill_tree, (proc,))
        timer.start()
        try:
            for line in proc.stdout:
                print("unsloth|", line, end="", flush=True)
                if line.startswith(UNSLOTH_TAG):
                    result = json.loads(line[len(UNSLOTH_TAG):])
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                _kill_tree(proc)
    if result is None:
        why = f"was stopped after {UnslothPeer.timeout_s:.0f} s" if proc.returncode == -9 else f"exited {proc.returncode}"
        raise RuntimeError(f"the Unsloth process {why} without a result (its output is above, prefixed unsloth|)")
    return result


def unsloth_worker(bf16_dir: Path, steps: int) -> int:
    """The Unsloth run, in the process ``run_unsloth`` starts: the bf16 model loaded in 4 bits (nf4 + double
    quant) by Unsloth, LoRA r16 on the same modules with Unsloth's gradient checkpointing, TRL's padding-free
    packing of the same rows, adamw_8bit, the same clock. Prints one ``UNSLOTH_RESULT {json}`` line."""
    # Unsloth first: it patches transformers, TRL and PEFT as they are imported.
    from unsloth import FastLanguageModel  # noqa: I001

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = FastLanguageModel.from_pretrained(str(bf16_dir), max_seq_length=2048, load_in_4bit=True,
                                                         dtype=torch.bfloat16, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    clock = Clock()
    rows = token_rows(sample_lengths())
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         packing=True, padding_free=True, optim="adamw_8bit", weight_decay=0.01, learning_rate=2e-4,
                         bf16=True, logging_steps=1, report_to="none", save_strategy="no",
                         include_num_input_tokens_seen="non_padding", max_length=2048, lr_scheduler_type="linear",
                         warmup_steps=2, dataset_num_proc=2, disable_tqdm=True)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args,
                             train_dataset=Dataset.from_dict({"input_ids": rows}), callbacks=[clock.callback])
        trainer.train()
    result = {"tokens_per_s": clock.tokens_per_s, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "attention": getattr(model.config, "_attn_implementation", None), "checkpointing": "unsloth",
              "batch": "4 x grad-accum 2, padding-free packing", "optimizer": "adamw_8bit",
              "versions": package_versions(UNSLOTH_PACKAGES)}
    print(UNSLOTH_TAG, json.dumps(result), flush=True)
    return 0


CONFIGS = {
    "seed": lambda bf16, nf4, rows, steps: run_baseline(bf16, rows, steps),
    "baseline": lambda bf16, nf4, rows, steps: run_baseline(bf16, rows, steps),
    "unsloth": lambda bf16, nf4, rows, steps: run_unsloth(bf16, steps),
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
    "lean_10k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, lean=True, batch_tokens=10240),
    "lean_12k": lambda bf16, nf4, rows, steps: run_kubetune(nf4, rows, steps, lean=True, batch_tokens=12288),
}


PROJECT_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
                    "liger-kernel", "triton", "kubetune")
UNSLOTH_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "triton",
                    "unsloth", "unsloth-zoo", "torchao", "cut-cross-entropy", "xformers")


def package_versions(names: tuple[str, ...]) -> dict:
    """Installed versions as this process sees them (the first on sys.path wins, as for imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def versions() -> dict:
    return package_versions(PROJECT_PACKAGES)


class Results:
    """Appends JSON lines to ``path`` (benchmarks/results.jsonl): each configuration's figures as soon as it ends,
    so a call cut short keeps what it measured, then the summary; every line carries the run's context (GPU, date,
    versions, command). With ``OUT`` set (the GPU machine's folder that comes back), the whole file is copied to
    ``$OUT/results.jsonl`` after each line."""

    def __init__(self, path: Path, context: dict):
        self.path, self.context = path, context

    def append(self, line: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({**self.context, **line}, default=str) + "\n")
        out = os.environ.get("OUT")
        if out and Path(out).is_dir() and Path(out).resolve() != self.path.parent.resolve():
            shutil.copyfile(self.path, Path(out) / self.path.name)


def wait_for(path: Path, timeout_s: float) -> dict:
    """Wait until ``path`` exists (another job on the same GPU, such as the GPU tests, has finished), so that it
    does not share the GPU with the timed runs; after ``timeout_s`` go on and say so in every result line."""
    start = time.time()
    while not path.exists() and time.time() - start < timeout_s:
        time.sleep(2)
    waited = {"waited_s": round(time.time() - start), "gpu_shared_with_other_job": not path.exists()}
    print("WAITED", json.dumps({"for": str(path), **waited}), flush=True)
    return waited


def _finite(x: float) -> float | None:
    return x if x == x else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # no argparse choices: an empty list would fail them (the Unsloth process names no configuration)
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        help=f"default: seed kubetune lean; any of {', '.join(sorted(CONFIGS))}")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--root", default="/tmp/kubetune-bench")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of steps 4-5 of kubetune runs")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="JSON lines file the results are appended to")
    parser.add_argument("--unsloth-site", default=UnslothPeer.site, help="where the .whl-unsloth set is installed")
    parser.add_argument("--unsloth-timeout", type=float, default=UnslothPeer.timeout_s,
                        help="seconds the Unsloth process may take")
    parser.add_argument("--wait-for", type=Path, help="after building the model, wait for this file before timing")
    parser.add_argument("--wait-timeout", type=float, default=300.0)
    parser.add_argument("--unsloth-worker", type=Path, help=argparse.SUPPRESS)  # the model dir, in that process
    args = parser.parse_args()
    if args.unsloth_worker:
        return unsloth_worker(args.unsloth_worker, args.steps)
    configs = args.configs or ["seed", "kubetune", "lean"]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {sorted(CONFIGS)}")
    Profile.enabled = args.profile
    UnslothPeer.site, UnslothPeer.timeout_s = args.unsloth_site, args.unsloth_timeout
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    bf16_dir, nf4_dir = build_model(Path(args.root), args.layers)
    lengths = sample_lengths()
    rows = token_rows(lengths)
    fpt = flops_per_token(args.layers, lengths)
    context = {
        "benchmark": "sft_throughput", "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
        "host_cpus": os.cpu_count(), "layers": args.layers, "steps": args.steps,
        "command": shlex.join(["python3", "benchmarks/sft_throughput.py", *sys.argv[1:]]),
        "launcher": os.environ.get("KT_BENCH_LAUNCHER", ""),
    }
    if args.wait_for:
        context.update(wait_for(args.wait_for, args.wait_timeout))
    project_versions = versions()
    log = Results(args.results, context)
    results = {}
    for name in configs:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            result = CONFIGS[name](bf16_dir, nf4_dir, rows, args.steps)
        except Exception as exc:  # one failing configuration must not hide the others' figures
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "tokens_per_s": float("nan")}
        # the Unsloth process measures its own peak (none if it failed); the others ran in this one
        result.setdefault("peak_gib", None if name == "unsloth" else round(torch.cuda.max_memory_allocated() / 2**30, 2))
        result.setdefault("versions", None if name == "unsloth" else project_versions)
        tps = _finite(result["tokens_per_s"])
        result.update(name=name, tokens_per_s=round(tps) if tps is not None else None,
                      mfu_pct=round(100 * tps * fpt / H100_DENSE_BF16, 1) if tps is not None else None)
        results[name] = result
        print("RESULT", json.dumps({k: v for k, v in result.items() if k != "versions"}), flush=True)
        log.append({"config": name, **{k: v for k, v in result.items() if k != "name"}})
    base_name = next((n for n in ("seed", "baseline") if n in results), None)
    base = (results.get(base_name) or {}).get("tokens_per_s")
    peer = (results.get("unsloth") or {}).get("tokens_per_s")

    def ratio(value, reference):
        return round(value / reference, 2) if value and reference else None

    summary = {
        "gpu": context["gpu"], "date": context["date"], "layers": args.layers, "steps": args.steps,
        "flops_per_token": fpt, "baseline": base_name, **project_versions,
        "unsloth_versions": (results.get("unsloth") or {}).get("versions"),
        "results": {n: {"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "mfu_pct": r["mfu_pct"],
                        "ratio_to_baseline": ratio(r["tokens_per_s"], base),
                        "ratio_to_unsloth": ratio(r["tokens_per_s"], peer), **({"error": r["error"]} if "error" in r else {})}
                    for n, r in results.items()},
        "over_unsloth": {n: ratio(r["tokens_per_s"], peer) for n, r in results.items() if n != "unsloth" and peer},
    }
    print("SUMMARY", json.dumps(summary), flush=True)
    log.append({"config": "SUMMARY", **{k: v for k, v in summary.items() if k not in context}})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
