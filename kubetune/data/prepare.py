"""Dataset prep: read a raw dataset, render prompt/completion pairs, clean, tokenize, split, write parquet.

Outputs (parquet, one row per sample): ``prompt`` (rendered prompt text), ``completion`` (the answer text),
``input_ids`` (prompt + completion + eos), ``completion_mask`` (1 on completion and eos tokens), ``length``.
The prompt's token ids are ``input_ids`` where ``completion_mask`` is 0; generation should start from them.
A sample truncated to ``max_length`` keeps its prompt and the first completion tokens and gets no eos, since
the answer does not end there. Under ``length_policy=truncate`` an alpaca input too long for the instruction and
the answer to fit is first cut in its middle (start and end kept, the cut marked; ``input_truncated`` counts them).
Working files go to a temporary folder (set TMPDIR for very large data).

Secrets: the values of secret environment variables (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...; see
:func:`kubetune.secrets.secret_values`, the one policy of every writer) are replaced by ``***`` in the persona and in every prompt and answer, so a token
that slipped into the data or a parameter is neither written to the prepared files nor learned by the model.
The rows where that happened are counted (``redacted_secret_rows``), and ``config.persona`` is redacted in place,
so whatever records the settings afterwards (artifact metadata, MLflow params, evaluation's probe prompts) holds
the persona exactly as training saw it, and no secret.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kubetune.config import DataConfig
from kubetune.data.formats import Layout
from kubetune.data.reading import read_raw
from kubetune.data.render import Renderer, prepared_features, special_prefix
from kubetune.data.sources import resolve_source
from kubetune.errors import KubetuneError
from kubetune.secrets import REDACTED, redact_values, secret_values
from kubetune.storage import atomic_file

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("prompt", "completion", "input_ids", "completion_mask", "length")
_SMALL_DATASET = 2000  # below this, one process: starting workers costs more than it saves


@dataclass
class PrepResult:
    """What prep reports: numeric stats (for metrics), the detected format and a Markdown summary."""

    stats: dict[str, float | int]
    summary_markdown: str
    format: str = ""
    columns: dict[str, str] = field(default_factory=dict)


def prepare_dataset(config: DataConfig, tokenizer: Any, train_path: str, eval_path: str) -> PrepResult:
    """Read ``config.dataset``, render prompt/completion pairs, clean, tokenize, split and write parquet.

    ``tokenizer`` is a loaded transformers tokenizer. Writes ``train_path`` and ``eval_path`` atomically (a
    killed step leaves no partial file) and returns stats and a Markdown summary. Secret values are redacted
    from the persona (``config.persona`` too) and the rows; see the module docstring.
    """
    config.validate()
    _check_tokenizer(config, tokenizer)
    started = time.perf_counter()
    source = resolve_source(config.dataset)
    secrets = secret_values()
    persona = redact_values(config.persona, secrets)
    if persona != config.persona:
        log.warning("prep: the persona holds the value of a secret environment variable; it is replaced by %s",
                    REDACTED)
        config.persona = persona  # see the module docstring: the settings describe what was written
    with tempfile.TemporaryDirectory(prefix="kubetune-prep-") as scratch:
        raw, layout = read_raw(source, config, scratch)
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
            Renderer(
                config,
                layout.format,
                tokenizer,
                special_prefix(tokenizer) if config.prompt_style == "expert" else [],
                secrets,
            ),
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=prepared_features(),
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
        nonempty = np.flatnonzero(status != Renderer.EMPTY)
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
        kept = unique_idx[status[unique_idx] != Renderer.TOO_LONG]
        dropped_too_long = int(unique_idx.size - kept.size)
        truncated = int(np.count_nonzero(status[kept] == Renderer.TRUNCATED))
        input_cut = np.asarray(table.column("_input_cut").to_numpy())
        input_truncated = int(np.count_nonzero(input_cut[kept]))
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
            "input_truncated": input_truncated,
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


# ----------------------------------------------------------------------------------------------------------
# Helpers of prepare_dataset


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


def _write_parquet(table: pa.Table, indices: np.ndarray, path: str, chunk_rows: int = 4096) -> None:
    """Write the chosen rows in chunks, so memory stays flat however big the split is."""
    import pyarrow.parquet as pq

    columns = table.select(list(OUTPUT_COLUMNS))
    schema = columns.schema.remove_metadata()  # the stored metadata describes the working columns too
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, indices.size, chunk_rows):
            part = columns.take(pa.array(indices[start : start + chunk_rows]))
            writer.write_table(part.replace_schema_metadata(None))


def _empty_fix(config: DataConfig, layout: Layout, empty: int, too_long: int) -> str:
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
    if rows.size < 2:
        raise KubetuneError(
            f"{rows.size} row(s) are left after cleaning{' and max_samples' if config.max_samples else ''}: "
            "training and evaluation need at least one row each",
            "raise max_samples (0 = all rows), or use a dataset with more usable rows",
        )
    n_eval = max(1, round(rows.size * config.eval_fraction))
    if config.max_eval_samples:
        n_eval = min(n_eval, config.max_eval_samples)
    n_eval = min(n_eval, rows.size - 1)
    order = rng.permutation(rows.size)
    return np.sort(rows[order[n_eval:]]), np.sort(rows[order[:n_eval]])
