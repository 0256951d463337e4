"""Variable-length ("varlen") attention for packed batches, registered with transformers as ``kubetune_varlen``.

A padding-free packed batch is one row of concatenated samples; each sample must attend only to itself. On CUDA
this calls PyTorch's FlashAttention varlen kernel with the sequence boundaries (``cu_seq_lens``) that TRL's
collator computes on the CPU, so no mask is built and no padding is computed. Elsewhere it runs causal SDPA
segment by segment: slower, but the same function, so CPU tests check the exact semantics used on the GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "kubetune_varlen"


def _boundaries(position_ids: torch.Tensor | None, length: int, device) -> tuple[torch.Tensor, int]:
    """Sequence starts from position ids that restart at 0 for every packed sample."""
    if position_ids is None:
        return torch.tensor([0, length], dtype=torch.int32, device=device), length
    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([length], device=starts.device)]).to(torch.int32).to(device)
    return cu, int(cu.diff().max())


@functools.cache
def _varlen_kwargs() -> frozenset[str]:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _cuda_varlen(q, k, v, cu, max_len: int, scaling: float | None) -> torch.Tensor:
    """PyTorch's FlashAttention varlen kernel; its keyword names changed across releases (2.9 → 2.13)."""
    from torch.nn.attention.varlen import varlen_attn

    names = _varlen_kwargs()
    kwargs: dict = {"scale": scaling}
    kwargs.update({"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True})
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:  # older kernels want as many key/value heads as query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over packed samples. Inputs are ``[batch, heads, tokens, head_dim]``; returns
    ``[batch, tokens, heads, head_dim]`` like transformers' other attention functions."""
    batch, _, tokens, _ = query.shape
    if attention_mask is not None:
        raise ValueError(
            f"{NAME} attention serves padding-free packed batches; load the model with attn_implementation='sdpa' "
            "for padded batches and generation"
        )
    if batch != 1:
        # Unpadded rows of equal length: each row is one causal sequence.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = cu.to(device=query.device, dtype=torch.int32)
        max_len = int(kwargs.get("max_length_q") or cu.diff().max())
    else:
        cu, max_len = _boundaries(kwargs.get("position_ids"), tokens, query.device)

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    if query.is_cuda:
        out = _cuda_varlen(q, k, v, cu, max_len, scaling)
    else:
        out = torch.empty_like(q)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            segment = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                k[start:end].transpose(0, 1),
                v[start:end].transpose(0, 1),
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
            )
            out[start:end] = segment.transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the kernel and its (empty) mask with transformers; returns the attn_implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # Like FlashAttention, the kernel needs no mask tensor: boundaries come from cu_seq_lens / position_ids.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME
