"""Format detection: which raw column plays which part.

Formats, detected from the column names when ``dataset_format="auto"`` (the ``*_column`` settings override):
  - chat: a list of ``{role, content}`` messages in ``messages`` / ``conversations`` / ``conversation``
    (ShareGPT ``{from, value}`` with human/gpt roles is accepted too); the final message is the answer and
    must come from the assistant (a conversation without one counts as an empty answer); a row's own system
    message replaces the persona;
  - alpaca: ``instruction`` plus ``output`` / ``response`` / ``answer``, optional ``input`` / ``context``;
  - prompt_completion: ``prompt``/``completion``, ``prompt``/``response``, ``question``/``answer``,
    ``query``/``response`` or ``input``/``output``.
  Other columns are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.config import DataConfig
from kubetune.errors import KubetuneError

# Column aliases tried in order by auto detection.
CHAT_ALIASES = ("messages", "conversations", "conversation")
INSTRUCTION_ALIASES = ("instruction",)
INPUT_ALIASES = ("input", "context")
OUTPUT_ALIASES = ("output", "response", "answer")
PAIR_ALIASES = (
    ("prompt", "completion"),
    ("prompt", "response"),
    ("question", "answer"),
    ("query", "response"),
    ("input", "output"),
)
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
COLUMN_FLAGS = (
    "name your columns with the columns parameter, e.g. columns=instruction=question,output=answer (roles: "
    "instruction, input, output for alpaca; messages for chat; prompt, completion), or set dataset_format"
)


@dataclass(frozen=True)
class Layout:
    """The detected format and which raw column plays which part."""

    format: str
    columns: dict[str, str]  # canonical name -> raw column (only the ones present)


def detect(config: DataConfig, columns: list[str], name: str) -> Layout:
    present = set(columns)
    found = ", ".join(columns) or "none"

    def first(*aliases: str) -> str:
        return next((a for a in aliases if a in present), "")

    fmt = config.dataset_format
    if fmt == "auto":
        if config.messages_column:
            fmt = "chat"
        elif config.prompt_column or config.completion_column:
            fmt = "prompt_completion"
        elif config.instruction_column or config.output_column:
            fmt = "alpaca"
        elif first(*CHAT_ALIASES):
            fmt = "chat"
        elif first(*INSTRUCTION_ALIASES):
            fmt = "alpaca"
        elif any(p in present and c in present for p, c in PAIR_ALIASES):
            fmt = "prompt_completion"
        else:
            raise KubetuneError(
                f"cannot tell the format of dataset {name}: columns found: {found}",
                f"{COLUMN_FLAGS} (expected e.g. instruction/input/output, messages or prompt/completion)",
            )

    wanted: dict[str, tuple[str, str, tuple[str, ...]]]  # canonical -> (flag, explicit, aliases)
    if fmt == "alpaca":
        wanted = {
            "instruction": ("instruction_column", config.instruction_column, INSTRUCTION_ALIASES),
            "output": ("output_column", config.output_column, OUTPUT_ALIASES),
        }
    elif fmt == "chat":
        wanted = {"messages": ("messages_column", config.messages_column, CHAT_ALIASES)}
    else:
        pair = next(((p, c) for p, c in PAIR_ALIASES if p in present and c in present), ("", ""))
        wanted = {
            "prompt": ("prompt_column", config.prompt_column, (pair[0],) if pair[0] else ("prompt",)),
            "completion": (
                "completion_column",
                config.completion_column,
                (pair[1],) if pair[1] else ("completion", "response", "answer"),
            ),
        }
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for canonical, (flag, explicit, aliases) in wanted.items():
        column = explicit if explicit in present else ("" if explicit else first(*aliases))
        if column:
            mapping[canonical] = column
        else:
            looked = explicit or " / ".join(aliases)
            missing.append(f"{canonical} (looked for {looked}; name it with columns={flag.removesuffix('_column')}=...)")
    if fmt == "alpaca":
        explicit = config.input_column
        if explicit and explicit not in present:
            missing.append(f"input (looked for {explicit}; name it with columns=input=...)")
        elif explicit or first(*INPUT_ALIASES):
            mapping["input"] = explicit or first(*INPUT_ALIASES)
    if missing:
        raise KubetuneError(
            f"dataset {name} ({fmt} format) has no column for: {'; '.join(missing)}. Columns found: {found}",
            COLUMN_FLAGS,
        )
    return Layout(fmt, mapping)
