"""LoRA SFT on the tiny 4-bit model on the CPU: a real TRL training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.config import LoraSettings, TrainConfig
from kubetune.errors import KubetuneError
from kubetune.sft import ADAPTER_METADATA_FILE, last_complete_checkpoint, train_lora
from kubetune.speed_plan import plan_speed


@pytest.fixture(scope="module")
def prepared(prepare_sample):
    return prepare_sample(max_length=256, max_samples=160)


def test_training_lowers_loss_and_writes_a_loadable_adapter(quantized_model_dir, prepared, tmp_path):
    from peft import PeftModel

    from kubetune.modeling import load_model

    seen: list[tuple[int, dict]] = []
    result = train_lora(
        quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "adapter"),
        lora=LoraSettings(lora_r=8, lora_alpha=16), train=TrainConfig(learning_rate=5e-3, max_steps=8, save_steps=4),
        max_length=256, checkpoint_dir=str(tmp_path / "ckpt"), metrics_sink=lambda m, step: seen.append((step, m)),
    )
    adapter = tmp_path / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", ADAPTER_METADATA_FILE} <= {
        p.name for p in adapter.iterdir()
    }
    meta = json.loads((adapter / ADAPTER_METADATA_FILE).read_text())
    assert meta["quantization"] == "nf4" and meta["lora"]["lora_r"] == 8
    assert result.metrics["global_step"] == 8
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert losses[-1] < losses[0]
    steps = [step for step, metrics in seen if "loss" in metrics]
    assert steps == list(range(1, 9))
    assert all("tokens_per_second" in m for step, m in seen if step > 1 and "loss" in m)
    assert last_complete_checkpoint(str(tmp_path / "ckpt")).endswith("checkpoint-8")
    PeftModel.from_pretrained(load_model(quantized_model_dir), str(adapter))


def test_training_resumes_from_the_last_complete_checkpoint(quantized_model_dir, prepared, tmp_path):
    common = dict(lora=LoraSettings(lora_r=4), max_length=256, checkpoint_dir=str(tmp_path / "ckpt"))
    train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "first"),
               train=TrainConfig(max_steps=4, save_steps=2), **common)
    # A checkpoint cut short by a kill lacks files: it must be skipped, not resumed from.
    broken = tmp_path / "ckpt" / "checkpoint-6"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{}")
    result = train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "second"),
                        train=TrainConfig(max_steps=6, save_steps=2), **common)
    assert result.resumed_from_step == 4
    assert result.metrics["global_step"] == 6
    assert min(row["step"] for row in result.history) > 4
    # The same checkpoints with another rank: one clear error before the model is loaded, not a size mismatch.
    with pytest.raises(KubetuneError, match=r"belong to a run with other LoRA settings \(lora_r=4 there, 8 now\)"):
        train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "third"),
                   train=TrainConfig(max_steps=8, save_steps=2), **{**common, "lora": LoraSettings(lora_r=8)})
    assert not (tmp_path / "third").exists()


def test_target_modules_matching_nothing_list_the_candidates(quantized_model_dir, prepared, tmp_path):
    with pytest.raises(KubetuneError, match="match no linear layer") as error:
        train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "adapter"),
                   lora=LoraSettings(target_modules="query,value"), train=TrainConfig(max_steps=1),
                   max_length=256, checkpoint_dir=str(tmp_path / "ckpt"))
    assert "q_proj" in str(error.value) and "down_proj" in str(error.value)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(lora_r=0), "lora_r=0 must be positive"),
        (dict(lora_dropout=1.5), "lora_dropout"),
    ],
)
def test_bad_lora_settings(settings, message):
    with pytest.raises(KubetuneError, match=message):
        LoraSettings(**settings).validate()


def test_bad_learning_rate():
    with pytest.raises(KubetuneError, match="learning_rate=0 must be positive"):
        TrainConfig(learning_rate=0).validate()


def test_speed_plan_on_a_7b_shape_without_and_with_a_small_gpu(monkeypatch):
    """The plan's memory logic, as a function of free memory (no GPU needed): a large GPU trains without
    checkpointing, a small one turns it on."""
    import torch
    from transformers import Qwen2Config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    shape = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28)
    big = plan_speed(TrainConfig(fused_kernels=False), 2048, shape, weights_bytes=6 << 30, free_bytes=79 << 30)
    small = plan_speed(TrainConfig(fused_kernels=False), 2048, shape, weights_bytes=6 << 30, free_bytes=16 << 30)
    lean = plan_speed(TrainConfig(lean=True, fused_kernels=False), 2048, shape, free_bytes=79 << 30)
    assert not big.gradient_checkpointing and big.batch_tokens >= 4096
    assert small.gradient_checkpointing
    assert lean.gradient_checkpointing and lean.activation_offloading and lean.optimizer == "adamw_8bit"
    assert lean.host_embedding and lean.batch_tokens == 8192 and not big.host_embedding
    assert not big.fused_lora and plan_speed(TrainConfig(), 2048, shape, free_bytes=79 << 30).fused_lora
    assert big.attention == small.attention == "kubetune_varlen"


def test_adapter_directory_is_absent_until_training_completes(quantized_model_dir, prepared, tmp_path):
    """A failing step leaves no adapter that a later step or cache could take as finished."""
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(tmp_path / "adapter"),
                   lora=LoraSettings(lora_r=4), train=TrainConfig(max_steps=3), max_length=256,
                   checkpoint_dir=str(tmp_path / "ckpt"), extra_callbacks=[Boom()])
    assert not Path(tmp_path / "adapter").exists()
    assert not list(tmp_path.glob(".adapter*"))
