"""Rendering and tokenising rows: canonical columns in, prompt/completion text, token ids and a status out.

Prompt styles: ``expert`` puts the persona and the question (alpaca instruction and input, the prompt column,
or a conversation's user turns) into an ``### Instruction:`` / ``### Response:`` template, and the token ids
start with the special tokens the tokenizer adds to plain text (BOS, if any); ``chat`` renders the tokenizer's
chat template with the persona as the system message, tokenized as is. The templates are in
:mod:`kubetune.prompts`.

The values of secret environment variables are replaced by ``***`` in every prompt and answer, and the rows
where that happened are marked (``_redacted``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetune.config import DataConfig
from kubetune.data.formats import ROLE_ALIASES
from kubetune.prompts import expert_prompt
from kubetune.secrets import redact_values


class Renderer:
    """Batched map function: raw canonical columns -> rendered text, token ids and per-row status.

    Runs in worker processes, so row problems come back as an ``_error`` string, not an exception.
    """

    OK, TRUNCATED, TOO_LONG, EMPTY = 0, 1, 2, 3
    INPUT_CUT_MARK = "\n…[input shortened]…\n"
    MIN_INPUT_TOKENS = 16  # below this little of the input is left: the row is dropped as too long instead

    def __init__(self, config: DataConfig, fmt: str, tokenizer: Any, prefix: list[int], secrets: list[str]):
        self.style = config.prompt_style
        self.secrets = secrets
        self.persona = config.persona
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.prefix = prefix  # special tokens the tokenizer puts before plain text (BOS); expert style only
        self.eos = tokenizer.eos_token_id
        self.max_length = config.max_length
        self.truncate = config.length_policy == "truncate"

    def _chat_prompt(self, persona: str, turns: list[dict[str, str]]) -> str:
        system = [{"role": "system", "content": persona}] if persona.strip() else []
        return self.tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)

    def _question_prompt(self, instruction: str, extra: str) -> str:
        if self.style == "expert":
            return expert_prompt(self.persona, instruction, extra)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return self._chat_prompt(self.persona, [{"role": "user", "content": user}])

    def _render(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, answer) of one row; an empty answer means the row has none."""
        if self.fmt in ("alpaca", "prompt_completion"):
            if self.fmt == "alpaca":
                instruction, extra, answer = (
                    row["instruction"] or "",
                    row.get("input") or "",
                    row["output"] or "",
                )
            else:
                instruction, extra, answer = row["prompt"] or "", "", row["completion"] or ""
            return self._question_prompt(instruction, extra), answer
        messages = []
        for i, message in enumerate(row["messages"] or []):
            role = message.get("role", message.get("from"))
            content = message.get("content", message.get("value"))
            if not isinstance(role, str) or not (content is None or isinstance(content, str)):
                raise ValueError(
                    f"message {i} has role {type(role).__name__} and content {type(content).__name__}"
                )
            messages.append({"role": ROLE_ALIASES.get(role, role), "content": content or ""})
        if not messages or messages[-1]["role"] != "assistant":
            return "", ""  # no final answer: counted as empty
        system = [m["content"] for m in messages[:-1] if m["role"] == "system"]
        turns = [m for m in messages[:-1] if m["role"] != "system"]
        persona = system[0] if system else self.persona  # a row's own system message wins
        if self.style == "chat":
            return self._chat_prompt(persona, turns), messages[-1]["content"]
        if len(turns) == 1:
            instruction = turns[0]["content"]
        else:  # earlier turns of a conversation become part of the instruction
            instruction = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
        return expert_prompt(persona, instruction), messages[-1]["content"]

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        columns = list(batch)
        rows = [{c: batch[c][i] for c in columns} for i in range(len(indices))]
        prompts, answers, errors, hashes, redacted = [], [], [], [], []
        for i, index in enumerate(indices):
            try:
                prompt, answer = self._render(rows[i])
                errors.append("")
            except ValueError as error:
                prompt, answer = "", ""
                errors.append(f"row {index}: {error}")
            if self.secrets:
                clean_prompt, clean_answer = redact_values(prompt, self.secrets), redact_values(answer, self.secrets)
                # a row's own system message may carry one; the persona's (already redacted) does not count
                redacted.append(int(clean_prompt != prompt or clean_answer != answer))
                prompt, answer = clean_prompt, clean_answer
            else:
                redacted.append(0)
            prompts.append(prompt)
            answers.append(answer)
            key = prompt.encode("utf-8") + b"\0" + answer.encode("utf-8")
            hashes.append(hashlib.blake2b(key, digest_size=16).digest())
        todo = [i for i, answer in enumerate(answers) if answer.strip()]
        encode = self.tokenizer
        prompt_ids = encode([prompts[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
        answer_ids = encode([answers[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
        n = len(indices)
        out: dict[str, list[Any]] = {
            "prompt": prompts,
            "completion": answers,
            "input_ids": [[] for _ in range(n)],
            "completion_mask": [[] for _ in range(n)],
            "length": [0] * n,
            "_status": [self.EMPTY] * n,
            "_completion_tokens": [0] * n,
            "_error": errors,
            "_hash": hashes,
            "_redacted": redacted,
            "_input_cut": [0] * n,
        }
        limit = self.max_length
        for i, prompt, answer in zip(todo, prompt_ids, answer_ids, strict=True):
            prompt = self.prefix + prompt
            answer_room = min(len(answer) + 1, limit // 2)
            if self.truncate and len(prompt) + answer_room > limit:
                shortened = self._cut_input(rows[i], len(prompt), answer_room)
                if shortened is not None:
                    prompts[i], prompt = shortened
                    out["_input_cut"][i] = 1
            if len(prompt) + len(answer) + 1 <= limit:
                ids, status = prompt + answer + [self.eos], self.OK
            elif self.truncate and len(prompt) < limit - 1:
                # the answer goes on past the limit, so no eos: the model must not learn to stop here
                ids, status = prompt + answer[: limit - len(prompt)], self.TRUNCATED
            else:
                out["_status"][i] = self.TOO_LONG
                continue
            out["input_ids"][i] = ids
            out["completion_mask"][i] = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
            out["length"][i] = len(ids)
            out["_status"][i] = status
            out["_completion_tokens"][i] = len(ids) - len(prompt)
        return out

    def _cut_input(self, row: dict[str, Any], prompt_tokens: int, answer_room: int) -> tuple[str, list[int]] | None:
        """(prompt, token ids) with the alpaca input cut in its middle (its start and end kept, the cut marked) so
        the instruction and ``answer_room`` tokens of answer fit ``max_length``; None when that is impossible."""
        extra = (row.get("input") or "") if self.fmt == "alpaca" else ""
        if not extra.strip():
            return None
        extra_ids = self.tokenizer(extra, add_special_tokens=False)["input_ids"]
        mark = len(self.tokenizer(self.INPUT_CUT_MARK, add_special_tokens=False)["input_ids"])
        budget = self.max_length - answer_room
        keep = len(extra_ids) - (prompt_tokens - budget) - mark
        for _ in range(3):  # tokens merge differently at the cut: shorten again by what is still over
            if keep < self.MIN_INPUT_TOKENS:
                return None
            head, tail = extra_ids[: keep // 2], extra_ids[len(extra_ids) - (keep - keep // 2):]
            text = self.tokenizer.decode(head) + self.INPUT_CUT_MARK + self.tokenizer.decode(tail)
            prompt = redact_values(self._question_prompt(row["instruction"] or "", text), self.secrets)
            ids = self.prefix + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                return prompt, ids
            keep -= len(ids) - budget
        return None


def prepared_features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "prompt": Value("string"),
            "completion": Value("string"),
            "input_ids": List(Value("int32")),
            "completion_mask": List(Value("int8")),
            "length": Value("int32"),
            "_status": Value("int8"),
            "_completion_tokens": Value("int32"),
            "_error": Value("string"),
            "_hash": Value("binary"),
            "_redacted": Value("int8"),
            "_input_cut": Value("int8"),
        }
    )


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer adds in front of plain text (BOS for Llama-style models, none for Qwen)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []
