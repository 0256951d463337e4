"""Source-version component (CPU, never cached): what the cached steps' cache keys are made of."""

from typing import NamedTuple

from kfp import dsl
from kubetune.containers.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_sources(
    dataset: str = "kubetune://tcm-demo",
    base_model: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    model_revision: str = "",
) -> NamedTuple("Versions", [("dataset_version", str), ("model_version", str), ("pinned_revision", str)]):
    """Find the current version of the dataset and the base model, so that KFP's cache serves the dataset prep
    and the 4-bit model only while their content is unchanged: content sha256 of local files (name, size and
    time for large ones), the ETag or generation of s3:// and gs:// objects, the commit sha of hub revisions.
    A version that cannot be resolved is unique to this run (no cache for that step) and the log says why.

    Args:
        dataset: Dataset: a local file or folder (jsonl, json, parquet, csv), an s3:// or gs:// URI, a hub id,
            or kubetune://tcm-demo for the bundled demo data.
        base_model: Base model: a local directory (e.g. on the cache volume, /cache/...) or a hub id.
        model_revision: Hub revision (branch, tag or commit) of base_model; empty for the default branch.

    Returns:
        dataset_version: Changes when the dataset's content changes.
        model_version: Changes when the base model's files change.
        pinned_revision: The hub commit model_revision points to now (what the later steps download).
    """
    from kubetune.errors import clear_errors
    from kubetune.steps import resolve

    with clear_errors():
        versions = resolve(dataset, base_model, model_revision)
    # A plain tuple in the declared order: the container runs this function's source alone.
    return versions["dataset_version"], versions["model_version"], versions["pinned_revision"]
