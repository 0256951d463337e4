"""Prompt templates shared by dataset prep and evaluation.

``expert`` puts the persona and the question into an ``### Instruction:`` / ``### Response:`` template;
``chat`` renders the tokenizer's chat template with the persona as the system message. Prep
(:mod:`kubetune.data.render`) and evaluation's probe prompts (:func:`build_prompt`) both use these, so a
question is asked exactly as training rendered it.
"""

from __future__ import annotations

from typing import Any


def expert_prompt(persona: str, instruction: str, input_text: str = "") -> str:
    """The expert template: persona, ``### Instruction:``, optional ``### Input:``, then ``### Response:``."""
    parts = [persona.strip()] if persona.strip() else []
    parts.append(f"### Instruction:\n{instruction}")
    if input_text.strip():
        parts.append(f"### Input:\n{input_text}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def build_prompt(instruction: str, input_text: str = "", *, prompt_style: str, persona: str, tokenizer: Any) -> str:
    """The prompt text for one question, exactly as training rendered it (used for evaluation probes)."""
    if prompt_style == "chat":
        user = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
        system = [{"role": "system", "content": persona}] if persona.strip() else []
        return tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return expert_prompt(persona, instruction, input_text)
