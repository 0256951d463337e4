"""The fused LoRA update computes what PEFT computes: outputs and every gradient, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from kubetune.fused_lora import fuse_lora_layers


def _peft_model(model_dir: str, dtype: str):
    from peft import LoraConfig, get_peft_model

    from kubetune.modeling import load_model

    torch.manual_seed(0)
    model = load_model(model_dir, compute_dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    for param in model.parameters():  # adapters in the compute dtype, as the SFT trainer keeps them
        if param.requires_grad:
            param.data = param.data.to(getattr(torch, dtype))
    return model


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), grads


def _forbid_peft_forward(monkeypatch):
    """Make PEFT's own LoRA forward fail, so a test proves the fused path ran."""
    from peft.tuners.lora import bnb, layer

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"PEFT's forward ran for {type(self).__name__}")

    for cls in (layer.Linear, bnb.Linear4bit):
        monkeypatch.setattr(cls, "forward", refuse)


@pytest.mark.parametrize(
    ("which", "dtype", "tolerance"),
    [
        ("tiny_model_dir", "float32", 1e-4),
        # bf16 rounds the update once instead of three times: equal to PEFT within bf16 resolution
        ("quantized_model_dir", "bfloat16", 3e-2),
    ],
)
def test_fused_update_matches_peft_outputs_and_gradients(which, dtype, tolerance, request, monkeypatch):
    model = _peft_model(request.getfixturevalue(which), dtype)
    ids = torch.randint(10, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    reference_logits, reference_grads = _logits_and_grads(model, ids)

    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert fuse_lora_layers(model) == len(lora_layers) > 0
    _forbid_peft_forward(monkeypatch)
    logits, grads = _logits_and_grads(model, ids)

    torch.testing.assert_close(logits, reference_logits, rtol=tolerance, atol=tolerance)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        scale = reference_grads[name].abs().max().item()
        torch.testing.assert_close(grad, reference_grads[name], rtol=tolerance, atol=tolerance * scale, msg=name)


def test_fused_layers_keep_peft_behaviour_when_adapters_are_disabled(tiny_model_dir):
    model = _peft_model(tiny_model_dir, "float32")
    ids = torch.randint(10, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    fuse_lora_layers(model)
    with torch.no_grad():
        tuned_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
    assert not torch.allclose(tuned_logits, base_logits)  # the (randomly initialised) adapter is really applied
