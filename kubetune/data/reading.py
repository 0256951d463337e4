"""Reading a source's rows into a ``datasets.Dataset`` of canonical columns (``instruction``, ``messages``...).

JSON and JSON Lines are read here, row by row, so errors name the file and line and only the needed columns
are kept; parquet, CSV and hub datasets go through ``datasets``, and their column types are checked from the
Arrow schema. Either way a value of the wrong type is an error that names the column and row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from kubetune.config import DataConfig
from kubetune.data.formats import ROLE_ALIASES, Layout, detect
from kubetune.data.sources import ACCEPTED_FORMS, Source, local_copies, open_binary
from kubetune.errors import KubetuneError

if TYPE_CHECKING:
    import datasets

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_CHUNK_ROWS = 2000


def read_raw(source: Source, config: DataConfig, scratch: str) -> tuple[datasets.Dataset, Layout]:
    """The source's rows with only the detected columns, named canonically, and the detected layout."""
    if source.extension in (".jsonl", ".json"):
        return _read_json(source, config, scratch)
    return _read_with_datasets(source, config, scratch)


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


def _iter_json_records(file: str) -> Iterator[tuple[Any, str]]:
    """Yield (record, where) from a .jsonl file, or a .json file holding a list or JSON Lines."""
    with open_binary(file) as handle:
        head = handle.read(4096)
        if head[:2] == b"\x1f\x8b":
            raise KubetuneError(f"{file} is gzip-compressed, not JSON text",
                                f"decompress it first (gunzip -c {file} > data.jsonl) and point dataset at the result")
        head = head.lstrip(b"\xef\xbb\xbf").lstrip()
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


def _read_json(source: Source, config: DataConfig, scratch: str) -> tuple[datasets.Dataset, Layout]:
    import datasets

    records = ((record, where, file) for file in source.files for record, where in _iter_json_records(file))
    head: list[tuple[Any, str, str]] = []
    for item in records:
        head.append(item)
        if len(head) >= _CHUNK_ROWS:
            break
    if not head:
        raise KubetuneError(f"dataset {source.name} has no rows", "point dataset at a non-empty file")
    keys: dict[str, None] = {}
    for record, where, _ in head:
        keys.update(dict.fromkeys(_require_object(record, where)))
    layout = detect(config, list(keys), source.name)
    if layout.format == "alpaca" and "input" not in layout.columns and not config.input_column:
        # rows may carry an input only later in the file than the first chunk
        layout = Layout(layout.format, {**layout.columns, "input": "input"})
    schema = pa.schema(
        [(c, MESSAGE_TYPE if c == "messages" else pa.string()) for c in layout.columns],
    )
    path = os.path.join(scratch, "raw.arrow")
    row = 0
    fitting: dict[str, int] = dict.fromkeys(source.files, 0)  # per file: rows holding the layout's answer column
    answer = layout.columns.get("messages") or layout.columns.get("output") or layout.columns.get("completion")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: dict[str, list[Any]] = {c: [] for c in layout.columns}

        def flush() -> None:
            if batch[next(iter(batch))]:
                writer.write_batch(
                    pa.record_batch([pa.array(batch[c], schema.field(c).type) for c in batch], schema)
                )
                for values in batch.values():
                    values.clear()

        for record, where, file in _chain(head, records):
            _require_object(record, where)
            fitting[file] += answer in record
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
    _check_files_share_the_layout(source, layout, answer, fitting)
    return datasets.Dataset.from_file(path), layout


def _check_files_share_the_layout(source: Source, layout: Layout, answer: str, fitting: dict[str, int]) -> None:
    """A folder whose files hold different formats would lose every row of the other format as "empty"."""
    strangers = [Path(file).name for file, count in fitting.items() if count == 0]
    if len(source.files) > 1 and strangers:
        raise KubetuneError(
            f"dataset {source.name} mixes formats: it reads as {layout.format} (answers in {answer!r}), but no row "
            f"of {', '.join(strangers[:5])} has that column",
            "keep one format per folder (convert the other files, or point dataset at one file), or set "
            "dataset_format and the *_column settings",
        )


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


def _check_arrow_types(dataset: datasets.Dataset, layout: Layout) -> None:
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


def _check_csv_headers(files: list[str]) -> None:
    """A column named twice would be renamed by the CSV reader ("output.1") and silently left out."""
    import csv

    for file in files:
        with open(file, newline="", encoding="utf-8-sig", errors="replace") as handle:
            header = next(csv.reader(handle), [])
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise KubetuneError(f"{file}: the header names column(s) {', '.join(twice)} more than once",
                                "give every column of the CSV header a name of its own")


def _subset(config: DataConfig) -> str:
    return f"subset {config.dataset_subset!r}, " if config.dataset_subset else ""


def _read_with_datasets(
    source: Source, config: DataConfig, scratch: str
) -> tuple[datasets.Dataset, Layout]:
    import datasets

    try:
        files = local_copies(source.files, scratch)
        if source.hub_id:
            dataset = datasets.load_dataset(source.hub_id, config.dataset_subset or None, split=config.dataset_split)
        elif source.extension == ".csv":
            _check_csv_headers(files)
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
                f"could not load dataset {source.hub_id!r} ({_subset(config)}split {config.dataset_split!r}) from the "
                f"hub: {type(error).__name__}: {error}",
                "check the hub id, dataset_subset, dataset_split and network access (HF_TOKEN for gated data); if "
                f"{source.hub_id!r} "
                f"is meant as a local path, it does not exist here. The dataset can be {ACCEPTED_FORMS}",
            ) from None
        raise KubetuneError(
            f"could not read {source.name} as {source.extension}: {type(error).__name__}: {error}",
            f"check that the files are valid {source.extension} files with a header row / consistent columns",
        ) from None
    if isinstance(dataset, dict):  # a DatasetDict when a split was not selected
        raise KubetuneError(f"dataset {source.name} has several splits", "set dataset_split")
    layout = detect(config, list(dataset.column_names), source.name)
    _check_arrow_types(dataset, layout)
    dataset = dataset.select_columns(list(layout.columns.values()))
    # via temporary names, so swaps such as input->prompt while a "prompt" column exists cannot collide
    staged = {raw: f"__kubetune_{canonical}" for canonical, raw in layout.columns.items()}
    dataset = dataset.rename_columns(staged)
    dataset = dataset.rename_columns({tmp: tmp.removeprefix("__kubetune_") for tmp in staged.values()})
    return dataset, layout
