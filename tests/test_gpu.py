"""GPU checks, run on a CUDA machine with `pytest -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_varlen_kernel_isolates_packed_samples(tiny_model_dir):
    from test_packing_isolation import packed_vs_alone

    from kubetune import attention
    from kubetune.modeling import load_model

    attention.register()
    model = load_model(tiny_model_dir, attention=attention.NAME, compute_dtype="bfloat16").eval()
    assert next(model.parameters()).is_cuda
    # FlashAttention (packed) against SDPA (alone), both bf16: equal within bf16 rounding.
    assert packed_vs_alone(model, [17, 300, 2, 129, 64]) < 5e-2


def test_cpu_quantized_model_trains_and_evaluates_on_gpu(tiny_model_dir, tmp_path):
    """The pipeline's split: 4-bit conversion on a CPU node, training and evaluation on a GPU node."""
    from peft import PeftModel

    from kubetune.config import DataConfig, EvalConfig, LoraSettings, TrainConfig
    from kubetune.data import prepare_dataset
    from kubetune.evaluate import evaluate_adapter
    from kubetune.modeling import load_model, load_tokenizer
    from kubetune.sft import train_lora

    quantized = tmp_path / "nf4-from-cpu"
    code = (
        "import torch, json; from kubetune.modeling import quantize_model; from kubetune.config import QuantConfig;"
        f"assert not torch.cuda.is_available(); print(json.dumps(quantize_model({tiny_model_dir!r}, "
        f"{str(quantized)!r}, QuantConfig())))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["quantized_on"] == "cpu"

    tokenizer = load_tokenizer(str(quantized))
    data = DataConfig(max_length=256)
    prepare_dataset(data, tokenizer, str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet"))
    result = train_lora(str(quantized), str(tmp_path / "train.parquet"), str(tmp_path / "adapter"),
                        lora=LoraSettings(), train=TrainConfig(learning_rate=1e-2, num_epochs=2, save_steps=0),
                        max_length=256, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.plan.attention == "kubetune_varlen"
    assert result.metrics["global_step"] > 0
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert losses[-1] < losses[0]

    evaluation = evaluate_adapter(str(quantized), str(tmp_path / "adapter"), str(tmp_path / "eval.parquet"),
                                  str(tmp_path / "report.html"), EvalConfig(max_new_tokens=16, max_generation_samples=4))
    assert evaluation.metrics["tuned_eval_loss"] < evaluation.metrics["base_eval_loss"]
    base = load_model(str(quantized))
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
