"""Capability regression check: multiple-choice accuracy of the base and the tuned model on general questions, so
that a domain fine-tune which made the model forget what it knew shows as a negative delta.

Scored by log-likelihood, as EleutherAI's lm-evaluation-harness scores MMLU, CMMLU and C-Eval: the question with
lettered choices, then ``Answer:``; the model's choice is the letter it gives the highest probability. No text is
generated, so the check is fast and deterministic. Questions come from a JSONL file (one object per line:
``question``, ``choices`` — 2 to 10 strings — and ``answer`` — a letter, a 0-based index or the choice's text),
which works on air-gapped clusters; ``builtin`` is the small general set this package ships.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import KubetuneError

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).parent / "sample_data" / "general_mc.jsonl"
LETTERS = "ABCDEFGHIJ"
FORMAT_FIX = ('write one JSON object per line: {"question": "...", "choices": ["...", "..."], "answer": "B"} '
              "(answer: a letter, a 0-based index or the choice's text)")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    def prompt(self) -> str:
        lines = [self.question.strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(self.choices)]
        return "\n".join(lines) + "\nAnswer:"


def _answer_index(value, choices: Sequence[str]) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(choices) else None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(text.upper())
        if text in choices:
            return list(choices).index(text)
    return None


def load_questions(source: str) -> list[Question]:
    """The questions of ``source`` (a JSONL path, or ``builtin``); one error naming every bad line and the fix."""
    path = BUILTIN_FILE if source == BUILTIN else Path(source)
    if not path.is_file():
        raise KubetuneError(f"capability_check file {source} does not exist",
                            f"pass a JSONL file of multiple-choice questions, or {BUILTIN!r} for the shipped set")
    questions: list[Question] = []
    problems: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        choices = row.get("choices") if isinstance(row, dict) else None
        question = row.get("question") if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            problems.append(f"line {number}: no question")
        elif not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                  and all(isinstance(c, str) and c.strip() for c in choices)):
            problems.append(f"line {number}: choices must be 2 to {len(LETTERS)} non-empty strings")
        elif (answer := _answer_index(row.get("answer"), choices)) is None:
            problems.append(f"line {number}: answer {row.get('answer')!r} names none of its {len(choices)} choices")
        else:
            questions.append(Question(question, tuple(choices), answer))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise KubetuneError(f"capability_check file {source} has bad lines: {shown}", FORMAT_FIX)
    if not questions:
        raise KubetuneError(f"capability_check file {source} holds no questions", FORMAT_FIX)
    return questions


def choice_scores(model, tokenizer, questions: Sequence[Question], batch_size: int = 32) -> list[list[float]]:
    """Per question, the log-probability of each choice's letter after its prompt (one forward pass each)."""
    import torch

    device = model.get_input_embeddings().weight.device
    prompts = [tokenizer(q.prompt(), add_special_tokens=True)["input_ids"] for q in questions]
    letters = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = []
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):  # left padding: every prompt ends at the last position
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                attention[row, width - len(prompt):] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), logits_to_keep=1).logits
            log_probs = logits[:, -1].float().log_softmax(-1).cpu()
            for row, question in enumerate(questions[first : first + batch_size]):
                scores.append([float(log_probs[row, letters[i]]) for i in range(len(question.choices))])
    return scores


def accuracy(model, tokenizer, questions: Sequence[Question]) -> float:
    """Share of ``questions`` whose right letter gets the highest probability."""
    scores = choice_scores(model, tokenizer, questions)
    right = sum(max(range(len(s)), key=s.__getitem__) == q.answer for s, q in zip(scores, questions, strict=True))
    return right / len(questions)
