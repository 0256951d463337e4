"""LoRA layers whose adapter update is one fused epilogue on the base layer's output.

PEFT computes ``result.clone() + lora_B(lora_A(x)) * scaling`` for a 4-bit base layer (``result + ...`` for a
plain one): the clone, the adapter output, its scaling and the sum each read or write a full ``tokens × out``
tensor, eight passes over memory for every targeted linear layer (seven per decoder layer; gate/up outputs are
18,944 wide on a 7B model). Here ``result + scaling * h @ lora_B.T`` (``h = lora_A(x)``, rank-wide) is one
kernel that reads ``result`` once and writes the sum once: a Triton kernel on CUDA (cuBLAS's addmm runs this
rank-16 product at a quarter of memory bandwidth), ``torch.addmm`` elsewhere. Only the memory traffic changes; the
arithmetic is the same, accumulated in fp32 and rounded once instead of three times.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
import torch.nn.functional as F

# Ranks the kernel's register tiles are sized for (tested up to 64 on an H100); larger ranks use addmm.
MAX_KERNEL_RANK = 64


@functools.cache
def _triton_kernel():
    """The epilogue kernel, compiled on first use; None where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def lora_epilogue(c_ptr, h_ptr, b_ptr, out_ptr, M, N, R, scaling,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        # out[m, n] = c[m, n] + scaling * sum_r h[m, r] * b[n, r]; all row-major and contiguous
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        update = tl.dot(h, b)
        tile = rm[:, None].to(tl.int64) * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        c = tl.load(c_ptr + tile, mask=mask, other=0.0)
        out = c.to(tl.float32) + scaling * update
        tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=mask)

    def launch(c: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        (m, n), r = c.shape, h.shape[1]
        out = torch.empty_like(c)
        grid = (triton.cdiv(m, 128), triton.cdiv(n, 128))
        lora_epilogue[grid](c, h, b, out, m, n, r, scaling, BLOCK_M=128, BLOCK_N=128,
                            BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=8)
        return out

    return launch


class _LoraEpilogue(torch.autograd.Function):
    """``result + scaling * h @ b.T`` in one Triton kernel; the backward is two rank-wide GEMMs."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.save_for_backward(h, b)
        ctx.scaling = scaling
        return _triton_kernel()(result, h, b, scaling)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = (grad @ b).mul_(ctx.scaling)
        grad_b = (grad.t() @ h).mul_(ctx.scaling)
        return grad, grad_h, grad_b, None


def lora_epilogue(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling * h @ b.T`` for 2-D ``result [tokens, out]``, ``h [tokens, r]``, ``b [out, r]``."""
    if (
        result.is_cuda
        and result.dtype in (torch.bfloat16, torch.float16)
        and result.dtype == h.dtype == b.dtype
        and result.is_contiguous() and h.is_contiguous() and b.is_contiguous()
        and h.shape[1] <= MAX_KERNEL_RANK
        and _triton_kernel() is not None
    ):
        return _LoraEpilogue.apply(result, h, b, scaling)
    return torch.addmm(result, h, b.t(), alpha=scaling)


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
    # The epilogue takes one dtype, the base output's (under autocast the adapter may be stored in another).
    h, b = F.linear(self.lora_dropout[name](x), a).to(result.dtype), b.to(result.dtype)
    out = lora_epilogue(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b, self.scaling[name])
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
