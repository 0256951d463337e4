"""Dataset prep component (CPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output
from kubetune.containers.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_dataset(
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    stats: Output[Metrics],
    summary: Output[Markdown],
    dataset: str = "kubetune://tcm-demo",
    dataset_subset: str = "",
    dataset_split: str = "train",
    base_model: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    model_revision: str = "",
    dataset_format: str = "auto",
    columns: str = "",
    prompt_style: str = "expert",
    persona: str = "",
    max_length: int = 2048,
    length_policy: str = "truncate",
    max_samples: int = 0,
    eval_fraction: float = 0.1,
    max_eval_samples: int = 200,
    seed: int = 42,
    trust_remote_code: bool = False,
    dataset_version: str = "",
    model_version: str = "",
):
    """Prepare an SFT dataset: read a file, folder, s3:// or gs:// URI or hub id in Alpaca, chat or
    prompt/completion format; template prompts with the expert persona or the chat template; drop empty answers
    and duplicates; drop or truncate over-long rows; split train/eval. Reports rows kept and dropped per rule and
    token-length percentiles.

    Args:
        dataset: Dataset: a local file or folder (jsonl, json, parquet, csv), an s3:// or gs:// URI, a hub id,
            or kubetune://tcm-demo for the bundled demo data.
        dataset_subset: Configuration (subset) of a hub dataset, e.g. mrpc of glue; empty = the dataset's
            default.
        dataset_split: Split to read when the dataset is a hub id.
        base_model: Base model: a local directory (e.g. on the cache volume, /cache/...) or a hub id.
        model_revision: Hub revision (branch, tag or commit) of base_model; empty for the default branch.
        dataset_format: Row format: alpaca (instruction/input/output), chat (messages), prompt_completion, or
            auto to detect.
        columns: Explicit column mapping, e.g. instruction=question,output=answer (empty = detect).
        prompt_style: expert: persona + instruction/response template; chat: the tokenizer's chat template
            with the persona as the system message.
        persona: The expert persona placed at the top of every prompt; empty = the built-in TCM expert.
        max_length: Maximum tokens per sample (prompt + completion).
        length_policy: What to do with samples longer than max_length: drop them, or truncate: cut an
            over-long input in its middle (its start and end kept) so the instruction and answer fit, then the
            completion.
        max_samples: Keep at most this many rows after cleaning, sampled with the seed (0 = all).
        eval_fraction: Fraction of rows held out for evaluation, in (0, 1).
        max_eval_samples: Cap on held-out rows (0 = no cap).
        seed: Seed for sampling, the train/eval split and training.
        trust_remote_code: Allow model and tokenizer code from the hub.
        dataset_version: The dataset's current version (resolve_sources): part of the cache key, recorded in
            the metadata.
        model_version: The base model's current version (its tokenizer shapes the prompts): part of the cache
            key.

    Returns:
        train_data: Prepared training rows (prompt/completion, JSONL).
        eval_data: Held-out rows for evaluation (JSONL).
        stats: Rows in, kept and dropped per rule, token-length percentiles.
        summary: The same statistics as a short Markdown summary.
    """
    import json

    from kubetune.config import DataConfig
    from kubetune.errors import clear_errors
    from kubetune.steps import numbers, parse_columns, prepare

    with clear_errors():
        config = DataConfig(
            dataset=dataset, dataset_subset=dataset_subset, dataset_split=dataset_split,
            dataset_format=dataset_format, prompt_style=prompt_style,
            **({"persona": persona} if persona else {}),
            max_length=max_length, length_policy=length_policy, max_samples=max_samples,
            eval_fraction=eval_fraction, max_eval_samples=max_eval_samples, seed=seed, **parse_columns(columns),
        )
        stat_values, markdown, metadata = prepare(
            config, base_model, train_data.path, eval_data.path, revision=model_revision,
            trust_remote_code=trust_remote_code,
        )
    for name, value in numbers(stat_values).items():
        stats.log_metric(name, value)
    # The same numbers as a file: an output without one is never served from kfp.local's cache.
    with open(stats.path, "w", encoding="utf-8") as handle:
        json.dump(numbers(stat_values), handle)
    metadata.update(dataset_version=dataset_version, model_version=model_version)
    train_data.metadata.update(metadata)
    eval_data.metadata.update(metadata)
    with open(summary.path, "w", encoding="utf-8") as handle:
        handle.write(markdown)
