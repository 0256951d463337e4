"""Base-vs-tuned evaluation: held-out loss/perplexity, batched greedy answers, chrF, and an HTML report.

The base model is loaded once and the adapter attached on top; "base" numbers come from the same weights with
the adapter switched off (``disable_adapter``), so a 7B model is held in GPU memory once, not twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import capability
from kubetune.config import EvalConfig
from kubetune.data import load_prepared
from kubetune.errors import KubetuneError
from kubetune.generation import (
    GenerationStats,
    Sampling,
    cuda_available,
    generate_answers,
    generate_reasoned_answers,
    model_device,
    prompt_token_ids,
    split_reasoning,
    writes_reasoning,
)
from kubetune.modeling import load_model, load_tokenizer
from kubetune.plain_weights import fits_in_memory, plain_copy
from kubetune.report import render_report
from kubetune.secrets import redact, secret_values
from kubetune.storage import atomic_file
from kubetune.tiny import TINY_NOTE, is_tiny_random

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EVAL_COLUMNS = ("prompt", "completion", "input_ids", "completion_mask")
# Auto sizes: loss batches in tokens (padded), generation batches in prompts.
GPU_EVAL_BATCH_TOKENS = 16384
CPU_EVAL_BATCH_TOKENS = 4096
# Rows of hidden states turned into logits at once: bounds the vocab-sized float32 buffer (152k vocab → 2.5 GB).
_LOGIT_CHUNK = 4096


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, str]]
    report_path: str
    model: Any = None
    """The evaluated model (the 4-bit base with the adapter), for logging it as an MLflow model."""
    tokenizer: Any = None


def check_adapter_dir(adapter_dir: str) -> None:
    """Fail with the fix when ``adapter_dir`` is not a saved PEFT adapter."""
    path = Path(adapter_dir)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else []
        where = f"found: {', '.join(found) or 'nothing'}" if path.is_dir() else "the directory does not exist"
        raise KubetuneError(
            f"adapter directory {adapter_dir} has no {' / '.join(missing)} ({where})",
            "point adapter_dir at the directory the training step wrote (PEFT save_pretrained with safetensors)",
        )
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KubetuneError(f"{path / 'adapter_config.json'} is not valid JSON ({exc})",
                            "restore the adapter from the training step's output (or its MLflow run)") from None


def load_eval_rows(eval_path: str):
    """The prepared held-out set (a datasets.Dataset), checked for the columns evaluation needs."""
    if not Path(eval_path).exists():
        raise KubetuneError(f"prepared dataset {eval_path} does not exist", "pass a parquet the prepare step wrote")
    dataset = load_prepared(eval_path)
    missing = [c for c in EVAL_COLUMNS if c not in dataset.column_names]
    if missing:
        raise KubetuneError(
            f"prepared dataset {eval_path} lacks columns {', '.join(missing)} (has {', '.join(dataset.column_names)})",
            "pass a split written by the prepare step (prompt, completion, input_ids, completion_mask)",
        )
    if len(dataset) == 0:
        raise KubetuneError(f"prepared dataset {eval_path} has no rows", "raise eval_fraction or use a larger dataset")
    return dataset


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Row indices grouped so each padded batch (rows x longest row) fits ``batch_tokens``.

    Rows are sorted longest first, so neighbours have similar lengths and little padding is computed; a row
    longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _scoring_parts(model):
    """The decoder stack and output head, so logits are computed only at completion positions.

    A full forward would build [tokens, vocab] logits for every prompt token too (5 GB at 16k tokens and a
    152k vocabulary); LoRA layers live inside these modules, so the adapter (or disable_adapter) still applies.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or decoder is base or head is None or getattr(base.config, "logit_scale", None):
        return None
    return decoder, head, getattr(base.config, "final_logit_softcapping", None)


def completion_loss(
    model,
    input_ids: Sequence[Sequence[int]],
    completion_masks: Sequence[Sequence[int]],
    batch_tokens: int,
    pad_token_id: int,
) -> tuple[float, int]:
    """Summed cross-entropy over completion tokens and their count, batched by padded-token budget.

    Token t is scored from position t-1 when ``completion_mask[t] == 1`` (the first token has no context).
    Right padding: real tokens never attend to the pads after them, so padding does not change the result.
    """
    import torch
    import torch.nn.functional as F

    device = model_device(model)
    parts = _scoring_parts(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in token_batches([len(ids) for ids in input_ids], batch_tokens):
            width = max(len(input_ids[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, index in enumerate(batch):
                n = len(input_ids[index])
                ids[row, :n] = torch.tensor(input_ids[index], dtype=torch.long)
                attention[row, :n] = 1
                scored[row, :n] = torch.tensor(completion_masks[index], dtype=torch.bool)
            ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
            targets_mask = scored[:, 1:]
            targets = ids[:, 1:][targets_mask]
            if targets.numel() == 0:
                continue
            if parts is None:
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                hidden, head, softcap = logits[:, :-1][targets_mask], None, None
            else:
                decoder, head, softcap = parts
                states = decoder(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
                hidden = states[:, :-1][targets_mask]
            for start in range(0, hidden.shape[0], _LOGIT_CHUNK):
                chunk = hidden[start : start + _LOGIT_CHUNK]
                logits = (head(chunk) if head is not None else chunk).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                total += F.cross_entropy(logits, targets[start : start + _LOGIT_CHUNK], reduction="sum").item()
            count += int(targets.numel())
    return total, count


def chrf_score(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character n-gram F-score, 0-100): no word segmentation, so it works for Chinese too."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def _traces(traces: dict[str, list[str]], k: int) -> dict[str, str]:
    """The reasoning traces of answer ``k`` that exist, as report row fields (``base_trace``, ``tuned_trace``)."""
    return {f"{name}_trace": traces[name][k] for name in ("base", "tuned") if traces[name][k]}


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _training_rows(train_path: str, count: int) -> list[tuple[str, list[int], str, str]]:
    """``count`` rows of the prepared training set, spread over it: (prompt, prompt ids, reference, "training")."""
    if not train_path or count <= 0:
        return []
    data = load_eval_rows(train_path)
    picked = sorted({round(k * (len(data) - 1) / max(count - 1, 1)) for k in range(min(count, len(data)))})
    return [(data[i]["prompt"], prompt_token_ids(data[i]["input_ids"], data[i]["completion_mask"]),
             data[i]["completion"], "training") for i in picked]


def _sampling(config: EvalConfig) -> Sampling:
    return Sampling(config.temperature, config.top_p, config.repetition_penalty, config.seed)


def generation_settings(config: EvalConfig, *, reasoning: bool) -> dict[str, Any]:
    """The generation settings a served tuned model should use to answer as it did here (MLflow model metadata):
    a reasoning model's token cap covers its thinking too."""
    sampling = _sampling(config)
    kwargs = {k: v for k, v in sampling.generation_kwargs().items() if k != "top_k"}
    return {"max_new_tokens": config.max_new_tokens + (config.thinking_budget if reasoning else 0), **kwargs}


def _generate(model, tokenizer, prompts, config: EvalConfig, *, tuned: bool,
              reasoning: bool) -> tuple[list[str], list[bool], GenerationStats, list[str]]:
    """Answers of the base model (``tuned`` False) or the tuned one: (texts, which were made to stop thinking,
    stats, how they were made). Generated on a plain copy of the weights (:mod:`kubetune.plain_weights`) when
    ``config.fast_generation`` and it fits in memory, else on the 4-bit model itself."""
    import torch

    sampling = _sampling(config)
    how = [f"temperature={config.temperature}, top_p={config.top_p}" if config.temperature > 0 else "greedy"]
    plain = None
    if config.fast_generation:
        fits, why = fits_in_memory(model)
        plain = plain_copy(model, adapter=tuned) if fits else None
        how.append("4-bit weights dequantized once" if plain is not None else f"4-bit weights ({why or 'layout'})")
    target = plain if plain is not None else model
    try:
        with model.disable_adapter() if plain is None and not tuned else nullcontext():
            if reasoning:
                how.append(f"thinking_budget={config.thinking_budget} then max_new_tokens={config.max_new_tokens}")
                texts, forced, stats = generate_reasoned_answers(
                    target, tokenizer, prompts, thinking_budget=config.thinking_budget,
                    max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size, sampling=sampling)
            else:
                how.append(f"max_new_tokens={config.max_new_tokens}")
                texts, stats = generate_answers(target, tokenizer, prompts, config.max_new_tokens,
                                                config.generation_batch_size, sampling=sampling)
                forced = [False] * len(texts)
    finally:
        del target, plain
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return texts, forced, stats, how + ["KV cache, left-padded batches"]


def evaluate_adapter(
    model_dir: str,
    adapter_dir: str,
    eval_path: str,
    report_path: str,
    config: EvalConfig,
    *,
    probe_prompts: Sequence[tuple[str, str]] = (),
    train_path: str = "",
    trust_remote_code: bool = False,
    title: str = "kubetune evaluation",
) -> EvalResult:
    """Compare the base model with base + LoRA adapter on the held-out set and on probe questions.

    ``probe_prompts`` are (question as the user wrote it, templated prompt) pairs; with ``train_path`` (the
    prepared training set), ``config.train_probe_samples`` of its rows are answered too, beside their references.
    Writes a self-contained
    HTML report to ``report_path`` (atomically) and returns metrics prefixed ``base_`` / ``tuned_``.
    """
    import torch
    from peft import PeftModel


    config.validate()
    check_adapter_dir(adapter_dir)
    dataset = load_eval_rows(eval_path)
    questions = capability.load_questions(config.capability_check) if config.capability_check else []
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, attention="sdpa", trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise KubetuneError(
            f"adapter {adapter_dir} does not fit base model {model_dir}: {str(exc).splitlines()[0][:300]}",
            "evaluate the adapter against the base model it was trained on",
        ) from exc
    model.eval()

    input_ids = dataset["input_ids"]
    masks = dataset["completion_mask"]
    batch_tokens = config.eval_batch_tokens or (GPU_EVAL_BATCH_TOKENS if cuda_available() else CPU_EVAL_BATCH_TOKENS)
    limit = config.max_generation_samples or len(dataset)
    generated_rows = list(range(min(limit, len(dataset))))
    trained = _training_rows(train_path, config.train_probe_samples)
    # answered in one pass, in this order: held-out rows, training rows, probe questions
    scored = [(dataset[i]["prompt"], prompt_token_ids(input_ids[i], masks[i]), dataset[i]["completion"], "held-out")
              for i in generated_rows] + trained
    prompts: list[str | list[int]] = [ids for _, ids, _, _ in scored] + [templated for _, templated in probe_prompts]
    references = [dataset[i]["completion"] for i in generated_rows]

    pad_id = tokenizer.pad_token_id
    metrics: dict[str, float] = {"eval_rows": float(len(dataset))}
    answers: dict[str, list[str]] = {}
    traces: dict[str, list[str]] = {}
    tokens = seconds = 0.0
    reasoning = config.reasoning == "on" or (config.reasoning == "auto" and writes_reasoning(tokenizer))
    metrics["reasoning"] = float(reasoning)
    how: list[str] = []
    for name in ("base", "tuned"):
        # The same weights serve both: the adapter is bypassed for "base".
        with model.disable_adapter() if name == "base" else nullcontext():
            total, count = completion_loss(model, input_ids, masks, batch_tokens, pad_id)
            if questions:
                metrics[f"{name}_capability_accuracy"] = capability.accuracy(model, tokenizer, questions)
        generated, forced, stats, how = _generate(model, tokenizer, prompts, config, tuned=name == "tuned",
                                                  reasoning=reasoning)
        metrics[f"{name}_forced_answers"] = float(sum(forced))
        # a reasoning model's <think> trace is kept apart: the final answer is what is scored and compared
        parts = [split_reasoning(text) for text in generated]
        traces[name], answers[name] = [trace for trace, _ in parts], [answer for _, answer in parts]
        loss = total / count if count else math.nan
        metrics[f"{name}_eval_loss"] = loss
        metrics[f"{name}_perplexity"] = _perplexity(loss)
        metrics[f"{name}_chrf"] = chrf_score(answers[name][: len(generated_rows)], references)
        metrics[f"{name}_generation_tokens_per_second"] = stats.tokens_per_second
        tokens += stats.generated_tokens
        seconds += stats.seconds
    metrics["eval_completion_tokens"] = float(count)
    metrics["generation_rows"] = float(len(generated_rows))
    metrics["probe_rows"] = float(len(probe_prompts))
    metrics["train_probe_rows"] = float(len(trained))
    metrics["generation_tokens_per_second"] = tokens / seconds if seconds > 0 else 0.0
    metrics["loss_reduction"] = metrics["base_eval_loss"] - metrics["tuned_eval_loss"]
    metrics["chrf_gain"] = metrics["tuned_chrf"] - metrics["base_chrf"]
    if questions:  # negative: the tuned model lost general ability
        metrics["capability_delta"] = metrics["tuned_capability_accuracy"] - metrics["base_capability_accuracy"]
        metrics["capability_questions"] = float(len(questions))
    for name in ("base", "tuned"):  # answers still thinking when max_new_tokens ran out: raise it
        metrics[f"{name}_unfinished_reasoning"] = float(sum(
            1 for trace, answer in zip(traces[name], answers[name], strict=True) if trace and not answer))
    # The decision, as a number the Kubeflow run page shows: 1 when fine-tuning lowered the held-out loss.
    metrics["tuned_beats_base"] = float(metrics["tuned_eval_loss"] < metrics["base_eval_loss"])

    if trained:
        first = len(generated_rows)
        for name in ("base", "tuned"):
            metrics[f"train_probe_{name}_chrf"] = chrf_score(answers[name][first : first + len(trained)],
                                                             [reference for _, _, reference, _ in trained])
    rows: list[dict[str, str]] = []
    for k, (prompt, _, reference, kind) in enumerate(scored):
        rows.append(
            {
                "kind": kind,
                "prompt": prompt,
                "reference": reference,
                "base_answer": answers["base"][k],
                "tuned_answer": answers["tuned"][k],
                # per answer: where the tuned model moved toward the reference, and where it did not
                "base_chrf": f"{chrf_score([answers['base'][k]], [reference]):.1f}",
                "tuned_chrf": f"{chrf_score([answers['tuned'][k]], [reference]):.1f}",
                **_traces(traces, k),
            }
        )
    for k, (question, _) in enumerate(probe_prompts, start=len(scored)):
        rows.append(
            {
                "kind": "probe",
                "prompt": question,
                "reference": "",
                "base_answer": answers["base"][k],
                "tuned_answer": answers["tuned"][k],
                **_traces(traces, k),
            }
        )

    meta = {
        "Base model": model_dir,
        "Adapter": adapter_dir,
        "Eval data": f"{eval_path} ({len(dataset)} rows, {count} completion tokens scored)",
        "Device": torch.cuda.get_device_name() if cuda_available() else "cpu",
        "Generation": ", ".join(how),
        "Date (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    # The report is a file users share: no secret value (a token in a probe question, say) reaches it.
    notes = [TINY_NOTE] if is_tiny_random(model.config) else []
    html_text = redact(render_report(title, metrics, rows, meta, notes=notes), secret_values())
    with atomic_file(report_path) as staging:
        Path(staging).write_text(html_text, encoding="utf-8")
    return EvalResult(metrics=metrics, rows=rows, report_path=str(report_path), model=model, tokenizer=tokenizer)

