"""Batched greedy generation with a KV cache: the answers evaluation compares, base and tuned."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune.decoding import decode
from kubetune.errors import KubetuneError

log = logging.getLogger(__name__)

GPU_GENERATION_BATCH = 64
CPU_GENERATION_BATCH = 16


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def has_4bit_weights(model) -> bool:
    return any(hasattr(parameter, "quant_state") for parameter in model.parameters())


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


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy (temperature 0, the default: reproducible comparisons) or sampled."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generation_kwargs(self) -> dict:
        kwargs: dict = {"repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        # explicit greedy settings win over a hub generation_config that samples (R1 distills ship temperature 0.6)
        return {**kwargs, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


GREEDY = Sampling()


def generate_answers(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
                     batch_size: int = 0, **options) -> tuple[list[str], GenerationStats]:
    """Answers for ``prompts`` (text or token ids), in their order, decoded without special tokens, up to the
    first EOS; ``options`` as :func:`generate_ids` takes them."""
    outputs, stats = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, **options)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs], stats


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 0,
    *,
    min_new_tokens: int = 0,
    sampling: Sampling = GREEDY,
    engine: str = "auto",
) -> tuple[list[tuple[list[int], bool]], GenerationStats]:
    """New token ids for ``prompts`` (text or token ids), in their order: per prompt, the tokens before the EOS
    and whether an EOS ended it.

    Prompts are sorted by length before batching so a batch holds similar lengths (little padding), left-padded.
    ``min_new_tokens`` exists for benchmarks, where random weights must produce equal lengths. ``engine``:
    ``static`` decodes with :func:`kubetune.decoding.decode` (static KV cache, the step replayed as a CUDA graph on
    a GPU), ``generate`` with transformers' ``generate``; ``auto`` takes ``static`` for a model with plain weights
    on a GPU, ``generate`` otherwise.
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
    generation_config = GenerationConfig(
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        use_cache=True,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **sampling.generation_kwargs(),
    )
    device = model_device(model)
    static = engine == "static" or (engine == "auto" and device.type == "cuda" and not has_4bit_weights(model))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[tuple[list[int], bool]] = [([], False)] * len(encoded)
    generated = batches = 0
    was_training = model.training
    model.eval()
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
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
            ids, attention = ids.to(device), attention.to(device)
            new_tokens = None
            if static:
                try:
                    new_tokens = decode(model, ids, attention, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                                        sampling=sampling, min_new_tokens=min_new_tokens)
                except Exception as exc:  # noqa: BLE001 - an architecture the static loop does not fit: generate
                    log.warning("static-cache decoding failed (%s: %s); using transformers' generate",
                                type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                    static = False
            if new_tokens is None:
                new_tokens = model.generate(input_ids=ids, attention_mask=attention,
                                            generation_config=generation_config)[:, width:]
            batches += 1
            for row, index in enumerate(batch):
                new = new_tokens[row].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                generated += len(new) if stop is None else stop + 1  # the EOS was generated too
                outputs[index] = (new, False) if stop is None else (new[:stop], True)
    synchronize()
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    return outputs, GenerationStats(len(encoded), batches, generated, seconds)


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


def writes_reasoning(tokenizer) -> bool:
    """Whether the model writes a ``<think>`` trace before its answer (DeepSeek-R1 and its distills, QwQ, Qwen3):
    its chat template or its vocabulary knows the closing tag."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    return THINK_CLOSE in template or THINK_CLOSE in tokenizer.get_vocab()


FORCED_CLOSE = f"\n{THINK_CLOSE}\n\n"


def generate_reasoned_answers(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    thinking_budget: int,
    max_new_tokens: int,
    batch_size: int = 0,
    sampling: Sampling = GREEDY,
    engine: str = "auto",
) -> tuple[list[str], list[bool], GenerationStats]:
    """Answers of a reasoning model, each with a final answer: up to ``thinking_budget`` tokens first; an answer
    that has not ended by then continues for ``max_new_tokens`` more, after ``</think>`` is written for it when it
    was still thinking (so it must answer). Returns the texts, which answers were cut short that way, and the
    stats of both rounds together."""
    encoded = [encode_prompt(tokenizer, p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    first, stats = generate_ids(model, tokenizer, encoded, thinking_budget, batch_size, sampling=sampling,
                                engine=engine)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in first]
    forced = [not ended and THINK_CLOSE not in text for (_, ended), text in zip(first, texts, strict=True)]
    going_on = [i for i, (_, ended) in enumerate(first) if not ended]
    if not going_on:
        return texts, forced, stats
    close_ids = tokenizer(FORCED_CLOSE, add_special_tokens=False)["input_ids"]
    continued = [encoded[i] + first[i][0] + (close_ids if forced[i] else []) for i in going_on]
    second, more = generate_ids(model, tokenizer, continued, max_new_tokens, batch_size, sampling=sampling,
                                engine=engine)
    for k, (i, (ids, _)) in enumerate(zip(going_on, second, strict=True)):  # decoded whole: a character may span
        texts[i] = tokenizer.decode(continued[k][len(encoded[i]):] + ids, skip_special_tokens=True)  # both rounds
    return texts, forced, GenerationStats(stats.prompts, stats.batches + more.batches,
                                          stats.generated_tokens + more.generated_tokens, stats.seconds + more.seconds)
