"""Dataset prep: read a raw dataset, render prompt/completion pairs, clean, tokenize, split, write parquet.

Sources (``DataConfig.dataset``):
  - ``kubetune://tcm-demo``: the bundled synthetic demo data;
  - a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or a folder of such files (all of one
    extension, not recursive; other files are ignored);
  - an ``s3://``, ``gs://`` or other fsspec URI to such a file or folder (``pip install 'kubetune[cloud]'``);
  - otherwise a hub id, read with ``datasets.load_dataset(id, split=dataset_split)``.

Formats, detected from the column names when ``dataset_format="auto"`` (the ``*_column`` settings override):
  - chat: a list of ``{role, content}`` messages in ``messages`` / ``conversations`` / ``conversation``
    (ShareGPT ``{from, value}`` with human/gpt roles is accepted too); the final message is the answer and
    must come from the assistant (a conversation without one counts as an empty answer); a row's own system
    message replaces the persona;
  - alpaca: ``instruction`` plus ``output`` / ``response`` / ``answer``, optional ``input`` / ``context``;
  - prompt_completion: ``prompt``/``completion``, ``prompt``/``response``, ``question``/``answer``,
    ``query``/``response`` or ``input``/``output``.
  Other columns are ignored.

Prompt styles: ``expert`` puts the persona and the question (alpaca instruction and input, the prompt column,
or a conversation's user turns) into an ``### Instruction:`` / ``### Response:`` template, and the token ids
start with the special tokens the tokenizer adds to plain text (BOS, if any); ``chat`` renders the tokenizer's
chat template with the persona as the system message, tokenized as is.

Outputs (parquet, one row per sample): ``prompt`` (rendered prompt text), ``completion`` (the answer text),
``input_ids`` (prompt + completion + eos), ``completion_mask`` (1 on completion and eos tokens), ``length``.
The prompt's token ids are ``input_ids`` where ``completion_mask`` is 0; generation should start from them.
A sample truncated to ``max_length`` keeps its prompt and the first completion tokens and gets no eos, since
the answer does not end there. Working files go to a temporary folder (set TMPDIR for very large data).

Secrets: the values of secret environment variables (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...; see
:func:`secret_values_in_env`) are replaced by ``***`` in the persona and in every prompt and answer, so a token
that slipped into the data or a parameter is neither written to the prepared files nor learned by the model.
The rows where that happened are counted (``redacted_secret_rows``), and ``config.persona`` is redacted in place,
so whatever records the settings afterwards (artifact metadata, MLflow params, evaluation's probe prompts) holds
the persona exactly as training saw it, and no secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kubetune.config import SAMPLE_DATASET, DataConfig
from kubetune.errors import KubetuneError
from kubetune.secrets import REDACTED, redact_secrets, secret_values_in_env
from kubetune.storage import atomic_file

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
BUNDLED = {"tcm-demo": "tcm_demo.jsonl"}
OUTPUT_COLUMNS = ("prompt", "completion", "input_ids", "completion_mask", "length")
CLOUD_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
ACCEPTED_FORMS = (
    "a local .jsonl/.json/.parquet/.csv file, a folder of such files, an s3:// or gs:// URI, "
    f"a hub id such as tatsu-lab/alpaca, or {SAMPLE_DATASET}"
)

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
    "set instruction_column/output_column (alpaca), messages_column (chat) or "
    "prompt_column/completion_column (prompt_completion) to name your columns, or set dataset_format"
)

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_SMALL_DATASET = 2000  # below this, one process: starting workers costs more than it saves
_CHUNK_ROWS = 2000


@dataclass
class PrepResult:
    """What prep reports: numeric stats (for metrics), the detected format and a Markdown summary."""

    stats: dict[str, float | int]
    summary_markdown: str
    format: str = ""
    columns: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    name: str  # as the user wrote it, for messages
    files: tuple[str, ...] = ()  # local paths or URIs, all of one extension
    extension: str = ""
    hub_id: str = ""


def _uri_scheme(dataset: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", dataset)
    return match.group(1).lower() if match else ""


def _looks_like_path(dataset: str) -> bool:
    return (
        dataset.startswith(("/", "./", "../", "~", "."))
        or "\\" in dataset
        or dataset.count("/") > 1
        or dataset.lower().endswith(EXTENSIONS)
    )


def _data_files(name: str, entries: Iterable[str]) -> tuple[tuple[str, ...], str]:
    """The data files among a folder's entries; all must share one extension."""
    entries = sorted(entries)
    by_ext: dict[str, list[str]] = {}
    for entry in entries:
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        ext = os.path.splitext(base)[1].lower()
        if ext in EXTENSIONS and not base.startswith((".", "_")):
            by_ext.setdefault(ext, []).append(entry)
    if not by_ext:
        shown = ", ".join(e.rstrip("/").rsplit("/", 1)[-1] for e in entries[:10]) or "nothing"
        raise KubetuneError(
            f"folder {name} holds no data files (found: {shown})",
            f"put .jsonl, .json, .parquet or .csv files in {name}, or point dataset at a file",
        )
    if len(by_ext) > 1:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_ext.items()))
        raise KubetuneError(
            f"folder {name} mixes data file types ({counts})",
            "keep one file type per folder, or point dataset at a single file",
        )
    ext, files = next(iter(by_ext.items()))
    return tuple(files), ext


def _file_extension(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if ext not in EXTENSIONS:
        raise KubetuneError(
            f"dataset file {name} has an unsupported type {ext or '(no extension)'}",
            f"use one of {', '.join(EXTENSIONS)}",
        )
    return ext


def _remote_source(dataset: str, scheme: str) -> _Source:
    import fsspec
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise KubetuneError(
            f"dataset {dataset} has an unknown URI scheme {scheme}://",
            "use s3://, gs://, az://, abfs://, hdfs://, http(s)://, hf:// or another fsspec protocol, "
            f"or a local path, hub id or {SAMPLE_DATASET}",
        )
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        package = CLOUD_PACKAGES.get(scheme)
        install = (
            "pip install 'kubetune[cloud]'" if package in ("s3fs", "gcsfs") else f"pip install {package}"
        )
        raise KubetuneError(
            f"reading {scheme}:// needs the package {package or 'for that protocol'}, which is not installed "
            f"({error})",
            install if package else f"install the fsspec implementation for {scheme}://",
        ) from None
    fs, path = fsspec.core.url_to_fs(dataset)
    try:
        if fs.isdir(path):
            files, ext = _data_files(dataset, (fs.unstrip_protocol(p) for p in fs.ls(path, detail=False)))
            return _Source(dataset, files, ext)
        if fs.isfile(path):
            return _Source(dataset, (dataset,), _file_extension(path))
    except KubetuneError:
        raise
    except Exception as error:  # credentials, network: the filesystem's own words say most
        raise KubetuneError(
            f"cannot read {dataset}: {type(error).__name__}: {error}",
            "check the URI and the credentials (AWS_*/GOOGLE_APPLICATION_CREDENTIALS) of this environment",
        ) from None
    raise KubetuneError(f"{dataset} does not exist", "check the bucket and path of the URI")


def _resolve_source(dataset: str) -> _Source:
    """Classify ``dataset`` as bundled data, local file/folder, fsspec URI or hub id."""
    dataset = dataset.strip()
    scheme = _uri_scheme(dataset)
    if scheme == "kubetune":
        key = dataset.split("://", 1)[1].strip("/")
        if key not in BUNDLED:
            known = ", ".join(f"kubetune://{k}" for k in BUNDLED)
            raise KubetuneError(f"there is no bundled dataset {dataset}", f"use one of: {known}")
        path = resources.files("kubetune").joinpath("sample_data", BUNDLED[key])
        return _Source(dataset, (str(path),), ".jsonl")
    if scheme == "file":
        dataset = dataset.split("://", 1)[1]
    elif scheme:
        return _remote_source(dataset, scheme)
    path = Path(dataset).expanduser()
    if path.is_file():
        return _Source(dataset, (str(path),), _file_extension(path.name))
    if path.is_dir():
        files, ext = _data_files(dataset, (str(p) for p in path.iterdir() if p.is_file()))
        return _Source(dataset, files, ext)
    if _looks_like_path(dataset) or scheme == "file":
        raise KubetuneError(
            f"dataset {dataset} is neither an existing file or folder nor a URI "
            f"(resolved to {path.resolve()})",
            f"check the path; the dataset can be {ACCEPTED_FORMS}",
        )
    return _Source(dataset, hub_id=dataset)


# ----------------------------------------------------------------------------------------------------------
# Format detection


@dataclass(frozen=True)
class _Layout:
    """The detected format and which raw column plays which part."""

    format: str
    columns: dict[str, str]  # canonical name -> raw column (only the ones present)


def _detect(config: DataConfig, columns: list[str], name: str) -> _Layout:
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
            missing.append(f"{canonical} (looked for {looked}; set {flag})")
    if fmt == "alpaca":
        explicit = config.input_column
        if explicit and explicit not in present:
            missing.append(f"input (looked for {explicit}; set input_column)")
        elif explicit or first(*INPUT_ALIASES):
            mapping["input"] = explicit or first(*INPUT_ALIASES)
    if missing:
        raise KubetuneError(
            f"dataset {name} ({fmt} format) has no column for: {'; '.join(missing)}. Columns found: {found}",
            COLUMN_FLAGS,
        )
    return _Layout(fmt, mapping)


# ----------------------------------------------------------------------------------------------------------
# Reading JSON / JSON Lines ourselves: errors name the file and line, and only the needed columns are kept.


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else type(value).__name__


def _open(file: str):
    if _uri_scheme(file):
        import fsspec

        return fsspec.open(file, "rb").open()
    return open(file, "rb")


def _iter_json_records(file: str) -> Iterator[tuple[Any, str]]:
    """Yield (record, where) from a .jsonl file, or a .json file holding a list or JSON Lines."""
    with _open(file) as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        handle.seek(0)
        whole_document = file.lower().endswith(".json") and head[:1] == b"["
        if file.lower().endswith(".json") and head[:1] == b"{":
            first = handle.readline().lstrip(b"\xef\xbb\xbf")
            more = bool(handle.readline().strip())
            handle.seek(0)
            try:
                json.loads(first)
                whole_document = not more  # one object on one line: a document such as {"data": [...]}
            except ValueError:
                whole_document = True  # a pretty-printed object, not JSON Lines
        if whole_document:
            text = handle.read().decode("utf-8-sig")
            try:
                document = json.loads(text)
            except json.JSONDecodeError as error:
                raise KubetuneError(
                    f"{file} is not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}",
                    f"fix line {error.lineno} of {file}; a .json file holds a list of objects or one object per line",
                ) from None
            if isinstance(document, dict):
                lists = [v for v in document.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise KubetuneError(
                        f"{file} holds one JSON object, not a list of rows",
                        "write a list of row objects, or one object per line (JSON Lines)",
                    )
                document = lists[0]
            for i, record in enumerate(document):
                yield record, f"{file} item {i + 1}"
            return
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if number == 1:
                line = line.lstrip(b"\xef\xbb\xbf")
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                detail = (
                    f"{error.msg} at column {error.colno}"
                    if isinstance(error, json.JSONDecodeError)
                    else error
                )
                raise KubetuneError(
                    f"{file}: line {number} is not valid JSON ({detail})",
                    f"fix or remove line {number} of {file}; every line of a JSON Lines file must be one JSON "
                    'object such as {"instruction": "...", "input": "", "output": "..."}',
                ) from None
            yield record, f"{file} line {number}"


def _text_value(value: Any, column: str, row: int, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KubetuneError(
        f"column {column!r} holds {_json_type(value)} at row {row} ({where}); expected text",
        f"make every value of {column!r} a string, or name another column with the *_column settings",
    )


def _messages_value(value: Any, column: str, row: int, where: str) -> list[dict[str, str]] | None:
    if value is None:
        return None
    shape = f"column {column!r} at row {row} ({where})"
    fix = f'make {column!r} a list of {{"role": ..., "content": ...}} objects (roles system/user/assistant)'
    if not isinstance(value, list):
        raise KubetuneError(f"{shape} holds {_json_type(value)}; expected a list of messages", fix)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise KubetuneError(
                f"{shape}: message {i} is {_json_type(message)}, not a {{role, content}} object", fix
            )
        role = message.get("role", message.get("from"))
        has_content = "content" in message or "value" in message
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not has_content or not (content is None or isinstance(content, str)):
            keys = ", ".join(map(str, message)) or "none"
            raise KubetuneError(
                f"{shape}: message {i} has role {_json_type(role)} and content "
                f"{_json_type(content) if has_content else 'missing'} (keys: {keys}); expected text for both",
                fix,
            )
        messages.append({"role": ROLE_ALIASES.get(role, role), "content": content or ""})
    return messages


def _read_json(source: _Source, config: DataConfig, scratch: str) -> tuple[datasets.Dataset, _Layout]:
    import datasets

    records = (item for file in source.files for item in _iter_json_records(file))
    head: list[tuple[Any, str]] = []
    for item in records:
        head.append(item)
        if len(head) >= _CHUNK_ROWS:
            break
    if not head:
        raise KubetuneError(f"dataset {source.name} has no rows", "point dataset at a non-empty file")
    keys: dict[str, None] = {}
    for record, where in head:
        keys.update(dict.fromkeys(_require_object(record, where)))
    layout = _detect(config, list(keys), source.name)
    if layout.format == "alpaca" and "input" not in layout.columns and not config.input_column:
        # rows may carry an input only later in the file than the first chunk
        layout = _Layout(layout.format, {**layout.columns, "input": "input"})
    schema = pa.schema(
        [(c, MESSAGE_TYPE if c == "messages" else pa.string()) for c in layout.columns],
    )
    path = os.path.join(scratch, "raw.arrow")
    row = 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: dict[str, list[Any]] = {c: [] for c in layout.columns}

        def flush() -> None:
            if batch[next(iter(batch))]:
                writer.write_batch(
                    pa.record_batch([pa.array(batch[c], schema.field(c).type) for c in batch], schema)
                )
                for values in batch.values():
                    values.clear()

        for record, where in _chain(head, records):
            _require_object(record, where)
            for canonical, column in layout.columns.items():
                value = record.get(column)
                if canonical == "messages":
                    batch[canonical].append(_messages_value(value, column, row, where))
                else:
                    batch[canonical].append(_text_value(value, column, row, where))
            row += 1
            if row % _CHUNK_ROWS == 0:
                flush()
        flush()
    return datasets.Dataset.from_file(path), layout


def _require_object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise KubetuneError(
            f"{where} is {_json_type(record)}, not an object with named fields",
            'write each row as an object such as {"instruction": "...", "output": "..."}',
        )
    return record


def _chain(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from rest


# ----------------------------------------------------------------------------------------------------------
# Reading parquet, CSV and hub datasets through `datasets`, then checking column types from the Arrow schema.


def _arrow_type_name(arrow_type: pa.DataType) -> str:
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        kind = "numbers"
    elif pa.types.is_boolean(arrow_type):
        kind = "booleans"
    elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        kind = "lists"
    elif pa.types.is_struct(arrow_type):
        kind = "objects"
    else:
        kind = "values"
    return f"{kind} ({arrow_type})"


def _first_valid_row(table: pa.Table, column: str) -> int:
    valid = pc.is_valid(table.column(column))
    index = pc.index(valid, True).as_py()
    return max(index, 0)


def _check_arrow_types(dataset: datasets.Dataset, layout: _Layout) -> None:
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for canonical, column in layout.columns.items():
        arrow_type = table.schema.field(column).type
        if pa.types.is_null(arrow_type):
            continue  # all empty
        if canonical == "messages":
            ok = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
            item = arrow_type.value_type if ok else None
            names = (
                {item.field(i).name for i in range(item.num_fields)}
                if ok and pa.types.is_struct(item)
                else set()
            )
            ok = ok and ({"role", "content"} <= names or {"from", "value"} <= names)
            if ok:
                content = "content" if "content" in names else "value"
                content_type = item.field(content).type
                ok = pa.types.is_string(content_type) or pa.types.is_large_string(content_type)
            if not ok:
                raise KubetuneError(
                    f"column {column!r} holds {_arrow_type_name(arrow_type)} at row "
                    f"{_first_valid_row(table, column)}; expected a list of {{role, content}} messages with text content",
                    'point messages_column at a list of {"role": ..., "content": ...} messages',
                )
        elif not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
            raise KubetuneError(
                f"column {column!r} holds {_arrow_type_name(arrow_type)} at row {_first_valid_row(table, column)}; "
                "expected text",
                f"make every value of {column!r} a string, or name another column with the *_column settings",
            )


def _local_copies(files: tuple[str, ...], scratch: str) -> list[str]:
    """Remote (fsspec) files copied into the scratch folder, local ones as they are: ``datasets`` refuses remote
    paths when offline (HF_DATASETS_OFFLINE), and would download them to its cache anyway."""
    import shutil

    local = []
    for index, file in enumerate(files):
        if not _uri_scheme(file):
            local.append(file)
            continue
        target = Path(scratch) / "remote" / f"{index:05d}-{file.rstrip('/').rsplit('/', 1)[-1]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with _open(file) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        local.append(str(target))
    return local


def _read_with_datasets(
    source: _Source, config: DataConfig, scratch: str
) -> tuple[datasets.Dataset, _Layout]:
    import datasets

    try:
        files = _local_copies(source.files, scratch)
        if source.hub_id:
            dataset = datasets.load_dataset(source.hub_id, split=config.dataset_split)
        elif source.extension == ".csv":
            # keep_default_na=False: an empty cell is "", not a float NaN that turns a text column numeric
            dataset = datasets.load_dataset(
                "csv", data_files=files, split="train", cache_dir=scratch, keep_default_na=False
            )
        else:
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=scratch)
    except KubetuneError:
        raise
    except Exception as error:
        if source.hub_id:
            raise KubetuneError(
                f"could not load dataset {source.hub_id!r} (split {config.dataset_split!r}) from the hub: "
                f"{type(error).__name__}: {error}",
                f"check the hub id, split and network access (HF_TOKEN for gated data); if {source.hub_id!r} "
                f"is meant as a local path, it does not exist here. The dataset can be {ACCEPTED_FORMS}",
            ) from None
        raise KubetuneError(
            f"could not read {source.name} as {source.extension}: {type(error).__name__}: {error}",
            f"check that the files are valid {source.extension} files with a header row / consistent columns",
        ) from None
    if isinstance(dataset, dict):  # a DatasetDict when a split was not selected
        raise KubetuneError(f"dataset {source.name} has several splits", "set dataset_split")
    layout = _detect(config, list(dataset.column_names), source.name)
    _check_arrow_types(dataset, layout)
    dataset = dataset.select_columns(list(layout.columns.values()))
    # via temporary names, so swaps such as input->prompt while a "prompt" column exists cannot collide
    staged = {raw: f"__kubetune_{canonical}" for canonical, raw in layout.columns.items()}
    dataset = dataset.rename_columns(staged)
    dataset = dataset.rename_columns({tmp: tmp.removeprefix("__kubetune_") for tmp in staged.values()})
    return dataset, layout


def _read(source: _Source, config: DataConfig, scratch: str) -> tuple[datasets.Dataset, _Layout]:
    if source.extension in (".jsonl", ".json"):
        return _read_json(source, config, scratch)
    return _read_with_datasets(source, config, scratch)


# ----------------------------------------------------------------------------------------------------------
# Rendering prompt/completion text


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


class _Prepare:
    """Batched map function: raw canonical columns -> rendered text, token ids and per-row status.

    Runs in worker processes, so row problems come back as an ``_error`` string, not an exception.
    """

    OK, TRUNCATED, TOO_LONG, EMPTY = 0, 1, 2, 3

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
            if self.style == "expert":
                return expert_prompt(self.persona, instruction, extra), answer
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            return self._chat_prompt(self.persona, [{"role": "user", "content": user}]), answer
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
        prompts, answers, errors, hashes, redacted = [], [], [], [], []
        for i, index in enumerate(indices):
            try:
                prompt, answer = self._render({c: batch[c][i] for c in columns})
                errors.append("")
            except ValueError as error:
                prompt, answer = "", ""
                errors.append(f"row {index}: {error}")
            if self.secrets:
                clean_prompt, clean_answer = redact_secrets(prompt, self.secrets), redact_secrets(answer, self.secrets)
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
        }
        limit = self.max_length
        for i, prompt, answer in zip(todo, prompt_ids, answer_ids, strict=True):
            prompt = self.prefix + prompt
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


def _special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer adds in front of plain text (BOS for Llama-style models, none for Qwen)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


# ----------------------------------------------------------------------------------------------------------
# The entry points


def _num_proc(config: DataConfig, rows: int) -> int:
    if rows < _SMALL_DATASET:
        return 1
    if config.num_proc > 0:
        return config.num_proc
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def _check_tokenizer(config: DataConfig, tokenizer: Any) -> None:
    problems = []
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos token")
    if config.prompt_style == "chat" and not getattr(tokenizer, "chat_template", None):
        problems.append("prompt_style=chat but the tokenizer has no chat template")
    if problems:
        raise KubetuneError(
            "; ".join(problems),
            "use the base model's own tokenizer (a chat model's for prompt_style=chat), or prompt_style=expert",
        )


def _percentile(lengths: np.ndarray, q: float) -> int:
    return int(np.percentile(lengths, q, method="nearest")) if lengths.size else 0


def _summary(stats: dict[str, float | int], fmt: str, name: str) -> str:
    lines = [f"**Dataset prep** — `{name}` ({fmt} format)", "", "| stat | value |", "|---|---|"]
    for key, value in stats.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines) + "\n"


def prepare_dataset(config: DataConfig, tokenizer: Any, train_path: str, eval_path: str) -> PrepResult:
    """Read ``config.dataset``, render prompt/completion pairs, clean, tokenize, split and write parquet.

    ``tokenizer`` is a loaded transformers tokenizer. Writes ``train_path`` and ``eval_path`` atomically (a
    killed step leaves no partial file) and returns stats and a Markdown summary. Secret values are redacted
    from the persona (``config.persona`` too) and the rows; see the module docstring.
    """
    config.validate()
    _check_tokenizer(config, tokenizer)
    started = time.perf_counter()
    source = _resolve_source(config.dataset)
    secrets = secret_values_in_env()
    persona = redact_secrets(config.persona, secrets)
    if persona != config.persona:
        log.warning("prep: the persona holds the value of a secret environment variable; it is replaced by %s",
                    REDACTED)
        config.persona = persona  # see the module docstring: the settings describe what was written
    with tempfile.TemporaryDirectory(prefix="kubetune-prep-") as scratch:
        raw, layout = _read(source, config, scratch)
        rows_in = len(raw)
        if rows_in == 0:
            raise KubetuneError(
                f"dataset {source.name} has no rows", "point dataset at a non-empty file or split"
            )
        num_proc = _num_proc(config, rows_in)
        log.info(
            "prep: %d rows from %s, %s format, %d process(es)", rows_in, source.name, layout.format, num_proc
        )

        prepared = raw.map(
            _Prepare(
                config,
                layout.format,
                tokenizer,
                _special_prefix(tokenizer) if config.prompt_style == "expert" else [],
                secrets,
            ),
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=_prepared_features(),
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=os.path.join(scratch, "prepared.arrow"),
            load_from_cache_file=False,
            new_fingerprint=uuid.uuid4().hex,  # skips hashing the tokenizer; nothing is reused across runs
            desc="prepare",
        )
        table = prepared.data.table  # the pa.Table behind the memory-mapped dataset
        errors = table.column("_error")
        bad = pc.index(pc.not_equal(errors, ""), True).as_py()
        if bad >= 0:
            column = layout.columns.get("messages", "messages")
            raise KubetuneError(
                f"column {column!r}: {errors[bad].as_py()}",
                f'make {column!r} a list of {{"role": ..., "content": ...}} objects with text content',
            )

        # cleaning rules, in order: empty answer, exact duplicate (first one kept), too long
        status = np.asarray(table.column("_status").to_numpy())
        nonempty = np.flatnonzero(status != _Prepare.EMPTY)
        dropped_empty = int(rows_in - nonempty.size)
        seen: set[bytes] = set()
        unique = []
        for index, key in zip(
            nonempty.tolist(), table.column("_hash").take(pa.array(nonempty)).to_pylist(), strict=True
        ):
            if key not in seen:
                seen.add(key)
                unique.append(index)
        dropped_duplicate = int(nonempty.size - len(unique))
        unique_idx = np.asarray(unique, dtype=np.int64)
        kept = unique_idx[status[unique_idx] != _Prepare.TOO_LONG]
        dropped_too_long = int(unique_idx.size - kept.size)
        truncated = int(np.count_nonzero(status[kept] == _Prepare.TRUNCATED))
        rows_kept = int(kept.size)
        if rows_kept < 2:
            counts = (
                f"{rows_in} rows in, {dropped_empty} with an empty answer, {dropped_duplicate} duplicates, "
                f"{dropped_too_long} longer than max_length={config.max_length} tokens"
            )
            fix = _empty_fix(config, layout, dropped_empty, dropped_too_long)
            if rows_kept == 0:
                raise KubetuneError(f"no rows left after cleaning {source.name}: {counts}", fix)
            raise KubetuneError(
                f"only 1 row left after cleaning {source.name} ({counts}); need at least 2, one for training "
                "and one for evaluation",
                f"use a larger dataset; {fix}",
            )

        train_idx, eval_idx = _split(kept, config)
        lengths = np.asarray(table.column("length").to_numpy())
        written = lengths[np.concatenate([train_idx, eval_idx])]
        completion_tokens = np.asarray(table.column("_completion_tokens").to_numpy())
        redacted_rows = int(pc.sum(table.column("_redacted")).as_py() or 0)
        if redacted_rows:
            log.warning("prep: %d row(s) held the value of a secret environment variable; replaced by %s",
                        redacted_rows, REDACTED)
        with atomic_file(train_path) as train_tmp, atomic_file(eval_path) as eval_tmp:
            _write_parquet(table, train_idx, train_tmp)
            _write_parquet(table, eval_idx, eval_tmp)

        seconds = time.perf_counter() - started
        stats: dict[str, float | int] = {
            "rows_in": rows_in,
            "dropped_empty": dropped_empty,
            "dropped_duplicate": dropped_duplicate,
            "dropped_too_long": dropped_too_long,
            "truncated": truncated,
            "rows_kept": rows_kept,
            "train_rows": int(train_idx.size),
            "eval_rows": int(eval_idx.size),
            "length_p50": _percentile(written, 50),
            "length_p90": _percentile(written, 90),
            "length_p99": _percentile(written, 99),
            "length_max": int(written.max()),
            "length_mean": round(float(written.mean()), 1),
            "total_train_tokens": int(lengths[train_idx].sum()),
            "train_completion_tokens": int(completion_tokens[train_idx].sum()),
            "redacted_secret_rows": redacted_rows,
            "prep_seconds": round(seconds, 2),
            "rows_per_s": round(rows_in / max(seconds, 1e-9), 1),
        }
    return PrepResult(stats, _summary(stats, layout.format, source.name), layout.format, dict(layout.columns))


def _prepared_features() -> Any:
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
        }
    )


def _write_parquet(table: pa.Table, indices: np.ndarray, path: str, chunk_rows: int = 4096) -> None:
    """Write the chosen rows in chunks, so memory stays flat however big the split is."""
    import pyarrow.parquet as pq

    columns = table.select(list(OUTPUT_COLUMNS))
    schema = columns.schema.remove_metadata()  # the stored metadata describes the working columns too
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, indices.size, chunk_rows):
            part = columns.take(pa.array(indices[start : start + chunk_rows]))
            writer.write_table(part.replace_schema_metadata(None))


def _empty_fix(config: DataConfig, layout: _Layout, empty: int, too_long: int) -> str:
    fixes = []
    if too_long:
        fixes.append(f"raise max_length (now {config.max_length})")
        if config.length_policy == "drop":
            fixes.append("use length_policy=truncate")
    if empty:
        answer = (
            layout.columns.get("output") or layout.columns.get("completion") or layout.columns.get("messages")
        )
        fixes.append(f"check that the answer column ({answer}) is the right one and holds text")
    return "; ".join(fixes) or "check the dataset's answers"


def _split(kept: np.ndarray, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded sample of ``max_samples`` rows, then a seeded train/eval split (each sorted, at least 1 row)."""
    rng = np.random.default_rng(config.seed)
    rows = kept
    if 0 < config.max_samples < rows.size:
        rows = np.sort(rng.permutation(rows)[: config.max_samples])
    n_eval = max(1, round(rows.size * config.eval_fraction))
    if config.max_eval_samples:
        n_eval = min(n_eval, config.max_eval_samples)
    n_eval = min(n_eval, rows.size - 1)
    order = rng.permutation(rows.size)
    return np.sort(rows[order[n_eval:]]), np.sort(rows[order[:n_eval]])


def load_prepared(path: str) -> datasets.Dataset:
    """Load a parquet file written by :func:`prepare_dataset` as a ``datasets.Dataset`` (memory-mapped)."""
    import datasets

    if not Path(path).is_file():
        raise KubetuneError(f"prepared dataset {path} does not exist", "run the dataset prep step first")
    dataset = datasets.Dataset.from_parquet(path)
    missing = [c for c in OUTPUT_COLUMNS if c not in dataset.column_names]
    if missing:
        raise KubetuneError(
            f"{path} is not a prepared dataset: columns {', '.join(missing)} are missing "
            f"(found {', '.join(dataset.column_names)})",
            "pass a train/eval parquet file written by the dataset prep step",
        )
    return dataset
