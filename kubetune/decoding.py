"""Batched decoding with a preallocated KV cache whose step is replayed as a CUDA graph.

Why: a 7B decode step for 64 sequences reads ~15 GB of weights, ~3 ms on an H200, but transformers' ``generate``
launches every kernel from Python and checks its stopping criteria with a device sync each step (~37 ms a step
eager). Here the whole model step (embedding, layers, static-cache writes, head) is captured once per batch and
replayed; between replays only the token choice runs (a few small kernels), and the loop looks at the device for
finished rows every :data:`CHECK_EVERY` steps. On the CPU the same loop runs eagerly (tests).

The model must take a transformers ``StaticCache`` and a prepared 4D boolean attention mask (every decoder-only
model of transformers 5 does), have no sliding-window layers (the mask here is causal over the whole cache), and
hold plain weights (see :mod:`kubetune.plain_weights`): the 4-bit kernels are not captured.

Plain copies attend with :func:`decode_attention_forward` (``kubetune_decode``): transformers' SDPA path copies the
whole KV cache once per query head when a mask is given (grouped-query models share a key/value head among several
query heads), which for 64 rows of a 7B model's 768-token cache is ~40 GB of copies a step, more than the weights.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between looks at whether every row has ended (each look is a device sync)
WARMUP_STEPS = 2  # eager steps before the capture (cuBLAS and allocator settle; they are real steps, not thrown away)


DECODE_ATTENTION = "kubetune_decode"


def decode_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, except for one query token per row (a decode step): there the query heads sharing a key/value head
    are multiplied against it in one batched matmul, reading the cache once. Shapes as transformers' attention
    functions take and return them (``[rows, heads, tokens, dim]`` in, ``[rows, tokens, heads, dim]`` out)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    if tokens != 1 or kwargs.get("softcap") or kwargs.get("s_aux") is not None or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]  # [rows, 1, 1, keys]: broadcast over the head groups
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    output = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [rows, kv_heads, group, dim]
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def register_decode_attention() -> str:
    """Register :func:`decode_attention_forward` and its mask (SDPA's) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    return DECODE_ATTENTION


def _cache_keyword(model) -> str:
    """The forward argument that takes the cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _pick(logits, sampling, seen, generator):
    """The next token per row from the last position's scores: greedy, or sampled with temperature and top-p; the
    repetition penalty divides positive (multiplies negative) scores of tokens already in the row."""
    import torch

    scores = logits.float()
    if seen is not None:
        penalized = torch.where(scores > 0, scores / sampling.repetition_penalty, scores * sampling.repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if sampling.temperature <= 0:
        return scores.argmax(-1)
    scores = scores / sampling.temperature
    if sampling.top_p < 1:
        ordered, order = scores.sort(-1, descending=True)
        probabilities = ordered.softmax(-1)
        drop = probabilities.cumsum(-1) - probabilities >= sampling.top_p  # keep the smallest set reaching top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def decode(
    model,
    ids,
    attention,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    sampling,
    min_new_tokens: int = 0,
):
    """New tokens ``[rows, max_new_tokens]`` for left-padded ``ids``/``attention`` (``[rows, width]``, on the model's
    device), ``pad_id`` after a row's EOS; the loop may stop early once every row has ended."""
    import torch
    from transformers import StaticCache

    rows, width = ids.shape
    device = ids.device
    if "sliding_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or ()):
        raise ValueError("the model has sliding-window layers, which this loop's full causal mask would not limit")
    total = width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    cache_kw = {_cache_keyword(model): cache}
    valid = torch.zeros(rows, total, dtype=torch.bool, device=device)  # which cache slots a query may attend to
    valid[:, :width] = attention.bool()
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    eos = torch.tensor(list(eos_ids), device=device)
    seen = None
    if sampling.repetition_penalty != 1:
        seen = torch.zeros(rows, model.config.get_text_config().vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, attention.bool())

    # Prefill, eager: causal within the prompt, padding masked; a padding query sees itself (no empty softmax row).
    causal = torch.ones(width, total, dtype=torch.bool, device=device).tril()
    prefill_mask = (causal[None] & valid[:, None, :]) | torch.eye(width, total, dtype=torch.bool, device=device)[None]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=prefill_mask[:, None], position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache_kw)
        logits = out.logits[:, -1]
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        step_ids = torch.empty(rows, 1, dtype=torch.long, device=device)
        step_positions = positions[:, -1:].clone()
        slot = torch.full((1,), width, dtype=torch.long, device=device)  # the cache slot the next token goes to
        mask = valid[:, None, None, :]  # a view: the step reads the slots marked so far

        def step():
            return model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                         **cache_kw).logits

        graph = None
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits = logits.index_fill(-1, eos, float("-inf"))
            chosen = _pick(logits, sampling, seen, generator)
            chosen = torch.where(finished, pad_id, chosen)
            tokens[:, t] = chosen
            finished |= torch.isin(chosen, eos)
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            if t == max_new_tokens - 1 or (t % CHECK_EVERY == CHECK_EVERY - 1 and bool(finished.all())):
                break
            step_ids.copy_(chosen[:, None])
            step_positions.add_(1)
            valid.index_fill_(1, slot, True)
            if graph is None and device.type == "cuda" and t >= WARMUP_STEPS:
                graph, graph_logits = _capture(step)
            if graph is not None:
                graph.replay()
                logits = graph_logits[:, -1]
            else:
                logits = _eager(step, device)[:, -1]
            slot.add_(1)
    return tokens


def _eager(step, device):
    """One step run eagerly; on CUDA on a side stream, as a step that is captured later must first run (its
    libraries set up per stream)."""
    import torch

    if device.type != "cuda":
        return step()
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        output = step()
    main.wait_stream(side)
    return output


def _capture(step):
    """(CUDA graph of ``step``, its output buffer). Capturing runs nothing: the replay right after is the step."""
    import torch

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output
