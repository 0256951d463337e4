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
