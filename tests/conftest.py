"""Shared fixtures: the tiny local model (made once per session) and its 4-bit copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["mlflow_server"]  # the MLflow server and two-run fixtures (tests/mlflow_server.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from kubetune.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def quantized_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    from kubetune.config import QuantConfig
    from kubetune.modeling import quantize_model

    target = tmp_path_factory.mktemp("models") / "tiny-nf4"
    quantize_model(tiny_model_dir, str(target), QuantConfig())
    return str(target)


@pytest.fixture(scope="session")
def prepare_sample(quantized_model_dir, tmp_path_factory):
    """``prepare_sample(**DataConfig settings)``: the shipped sample data prepared for the tiny 4-bit model; returns
    the folder holding train.parquet and eval.parquet."""
    from kubetune.config import DataConfig
    from kubetune.data import prepare_dataset
    from kubetune.modeling import load_tokenizer

    def prepare(**settings) -> Path:
        root = tmp_path_factory.mktemp("prepared")
        prepare_dataset(DataConfig(**settings), load_tokenizer(quantized_model_dir), str(root / "train.parquet"),
                        str(root / "eval.parquet"))
        return root

    return prepare


# The longest test files, longest first (measured on 2 cores: whole local pipeline runs and notebooks).
LONGEST_FIRST = ("test_notebooks", "test_reliability", "test_lifecycle", "test_local_pipeline", "test_compare",
                 "test_stepcli", "test_secrets", "test_preemption")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with end-to-end tests, then the rest: pytest-xdist hands whole
    files to its workers in this order (scripts/test.sh: ``--dist loadfile --no-loadscope-reorder``), so the
    long files start early and the short ones fill the end, instead of a long file starting last while the other
    worker idles."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        name = item.module.__name__
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if name in slow_modules else 2), 0

    items.sort(key=rank)  # stable: the order within a file is kept
