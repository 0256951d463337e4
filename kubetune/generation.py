"""Batched greedy generation with a KV cache: the answers evaluation compares, base and tuned."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune.errors import KubetuneError

GPU_GENERATION_BATCH = 64
CPU_GENERATION_BATCH = 16


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def model_device(model):
    return model.get_input_embeddings().weight.device


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class GenerationStats:
    """What one :func:`generate_answers` call did."""

    prompts: int
    batches: int
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_token_ids(input_ids: Sequence[int], completion_mask: Sequence[int]) -> list[int]:
    """The prompt part of a prepared row: exactly the tokens the model saw in training before the answer."""
    for position, flag in enumerate(completion_mask):
        if flag:
            return list(input_ids[:position])
    return list(input_ids)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a templated prompt; no second BOS when the template already wrote one."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 0,
    *,
    min_new_tokens: int = 0,
) -> tuple[list[str], GenerationStats]:
    """Greedy answers for ``prompts`` (text or token ids), in their order, generated in left-padded batches.

    Prompts are sorted by length before batching so a batch holds similar lengths (little padding); each batch
    is one ``generate`` call with the KV cache. Only new tokens are decoded, up to the first EOS, without special
    tokens. ``min_new_tokens`` exists for benchmarks, where random weights must produce equal lengths.
    """
    import torch
    from transformers import GenerationConfig

    encoded = [encode_prompt(tokenizer, p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise KubetuneError(f"prompts {empty[:10]} are empty after tokenization", "drop empty prompts")
    batch_size = batch_size or (GPU_GENERATION_BATCH if cuda_available() else CPU_GENERATION_BATCH)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # Explicit greedy settings win over a hub generation_config that samples (R1 distills ship temperature 0.6).
    generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        use_cache=True,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [""] * len(encoded)
    generated = batches = 0
    was_training = model.training
    model.eval()
    synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                n = len(encoded[index])
                ids[row, width - n :] = torch.tensor(encoded[index], dtype=torch.long)
                attention[row, width - n :] = 1
            output = model.generate(
                input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=generation_config
            )
            batches += 1
            for row, index in enumerate(batch):
                new = output[row, width:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                answer = new if stop is None else new[:stop]
                generated += len(new) if stop is None else stop + 1  # the EOS was generated too
                answers[index] = tokenizer.decode(answer, skip_special_tokens=True)
    synchronize()
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    return answers, GenerationStats(len(encoded), batches, generated, seconds)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning trace, final answer) of a generated answer. Reasoning models (DeepSeek-R1 and its distills) write
    ``<think>…</think>`` before the answer, and their chat templates often open ``<think>`` in the prompt: what
    follows the last ``</think>`` is the answer. An answer that opened ``<think>`` and never closed it ran out of
    tokens while thinking, and has no final answer. Text without the tags is all answer."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        trace = text[:close]
        return trace.split(THINK_OPEN, 1)[-1].strip(), text[close + len(THINK_CLOSE):].strip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN):].strip(), ""
    return "", text.strip()
