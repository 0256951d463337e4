"""Speed must not change what is learned: in a packed padding-free batch, each sample's logits equal those of the
same sample run alone. Checked with the attention the SFT defaults use (kubetune_varlen), on CPU here and on the
GPU in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kubetune import attention
from kubetune.config import TrainConfig
from kubetune.modeling import load_model
from kubetune.speed_plan import plan_speed


def packed_vs_alone(model, lengths: list[int], seed: int = 0) -> float:
    """Largest absolute logit difference between packed and one-by-one forward passes."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    samples = [torch.randint(5, model.config.vocab_size - 5, (n,), generator=generator) for n in lengths]
    ids = torch.cat(samples).unsqueeze(0).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    worst = 0.0
    with torch.inference_mode():
        packed = model(input_ids=ids, position_ids=positions).logits[0].float()
        model.set_attn_implementation("sdpa")
        try:
            start = 0
            for sample in samples:
                alone = model(input_ids=sample.unsqueeze(0).to(device)).logits[0].float()
                worst = max(worst, (packed[start : start + len(sample)] - alone).abs().max().item())
                start += len(sample)
        finally:
            model.set_attn_implementation(attention.NAME)
    return worst


@pytest.fixture(scope="module")
def varlen_model(tiny_model_dir):
    attention.register()
    model = load_model(tiny_model_dir, attention=attention.NAME, compute_dtype="float32")
    return model.float().eval()


def test_defaults_use_varlen_attention_when_packing():
    from transformers import Qwen2Config

    plan = plan_speed(TrainConfig(), 512, Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    assert plan.attention == attention.NAME


def test_packed_logits_equal_single_sample_logits(varlen_model):
    assert packed_vs_alone(varlen_model, [7, 31, 1, 64, 12]) < 1e-4


def test_packing_without_isolation_would_differ(varlen_model):
    """Control: the same tokens as one causal sequence (no per-sample positions) give different logits, so the
    equality above is not vacuous."""
    lengths = [20, 20]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, varlen_model.config.vocab_size - 5, (1, sum(lengths)), generator=generator)
    with torch.inference_mode():
        varlen_model.set_attn_implementation("sdpa")
        try:
            joined = varlen_model(input_ids=ids).logits[0, 20:]
            alone = varlen_model(input_ids=ids[:, 20:]).logits[0]
        finally:
            varlen_model.set_attn_implementation(attention.NAME)
    assert (joined - alone).abs().max().item() > 1e-3


def test_four_bit_packed_logits_equal_single_sample_logits(quantized_model_dir):
    """The 4-bit model keeps embeddings and norms in bf16: equal within bf16 rounding."""
    attention.register()
    model = load_model(quantized_model_dir, attention=attention.NAME, compute_dtype="float32").eval()
    assert packed_vs_alone(model, [9, 40, 3, 25]) < 2e-2
