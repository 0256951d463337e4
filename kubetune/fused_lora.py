"""LoRA layers whose adapter update is one GEMM epilogue on the base layer's output.

PEFT computes ``result.clone() + lora_B(lora_A(x)) * scaling`` for a 4-bit base layer (``result + ...`` for a
plain one): the clone, the adapter output, its scaling and the sum each read or write a full ``tokens × out``
tensor, eight passes over memory for every targeted linear layer (seven per decoder layer; gate/up outputs are
18,944 wide on a 7B model). ``torch.addmm(result, lora_A(x), lora_B.T, alpha=scaling)`` does the same sum inside
the adapter's GEMM: two passes forward, and the backward needs no scaling pass either. Only the memory traffic
changes; the arithmetic is the same, accumulated in fp32 and rounded once instead of three times.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# PEFT LoRA layers whose forward is ``base_layer(x)`` plus the adapter update (bf16/fp32 and bitsandbytes bases).
_FUSABLE = {"Linear", "Linear4bit", "Linear8bitLt"}


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    if self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)  # adapter mixing, DoRA, merged weights: PEFT's path
    name = active[0]
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if not torch.is_autocast_enabled(x.device.type) and not x.dtype == a.dtype == b.dtype:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT casts between dtypes; keep its rules
    result = self.base_layer(x)
    h = F.linear(self.lora_dropout[name](x), a)
    if result.dtype != h.dtype:  # e.g. a bitsandbytes layer outside autocast
        return type(self).forward(self, x, *args, **kwargs)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every plain LoRA linear layer of ``model`` through the fused update; returns how many were routed.

    The layer keeps PEFT's own forward for anything else (several active adapters, DoRA, merged or disabled
    adapters), so saving, loading and merging the adapter are unchanged."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ in _FUSABLE:
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
