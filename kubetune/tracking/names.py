"""What kubetune writes into MLflow is named and shaped here: tag names, key cleaning, value limits, params.

Values are redacted before they are truncated, so a cut never leaves half a secret behind.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.secrets import REDACTED, is_secret_name, redact

DEFAULT_EXPERIMENT = "kubetune"
KFP_RUN_ID_TAG = "kubetune.kfp_run_id"
KFP_RUN_NAME_TAG = "kubetune.kfp_run_name"
PIPELINE_VERSION_TAG = "kubetune.pipeline_version"
REGISTERED_MODEL_TAG = "kubetune.registered_model"
REGISTERED_VERSION_TAG = "kubetune.registered_model_version"
DATASET_HASH_TAG = "kubetune.dataset_sha256"
MAX_PARAM_LENGTH = 500  # MLflow takes 6000; longer values are unreadable in its UI, and the marker keeps a hash
MAX_TAG_LENGTH = 5000
NO_REGISTRATION = "none"


def truncate(text: str, limit: int = MAX_PARAM_LENGTH) -> str:
    """Cut ``text`` to ``limit`` characters, ending with a marker that keeps the full value's length and hash, so
    two long values that differ only past the cut still compare as different."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    marker = f"...[truncated: {len(text)} chars, sha256 {digest}]"
    return text[: max(0, limit - len(marker))] + marker


def clean_key(name: str) -> str:
    """A param, metric or tag key MLflow accepts: letters, digits, _ - . / and space, up to 250 characters."""
    return re.sub(r"[^\w\-./ ]", "_", name)[:250]


def flatten_params(groups: Mapping[str, Any], secrets: Iterable[str] = (),
                   max_length: int = MAX_PARAM_LENGTH) -> dict[str, str]:
    """``{"lora": {"lora_r": 16}}`` → ``{"lora.lora_r": "16"}``, nested mappings flattened the same way.

    Values of secret-named keys become ``***``, secret values inside other values are redacted, and long values
    are truncated (after redaction, so a cut never leaves half a secret behind).
    """
    secrets = list(secrets)
    flat: dict[str, str] = {}

    def visit(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(name, value)
            elif is_secret_name(str(key)) and value not in ("", None):
                flat[clean_key(name)] = REDACTED
            else:
                flat[clean_key(name)] = truncate(redact(value, secrets), max_length)

    visit("", groups)
    return flat


def default_model_name(experiment: str) -> str:
    """The registered model the adapters of an experiment go to: ``<experiment>-adapter``."""
    return registered_model_name(f"{experiment or DEFAULT_EXPERIMENT}-adapter")


def registered_model_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "-", name.strip()).strip("-.")
    if not cleaned:
        raise KubetuneError(f"registered model name {name!r} is empty after cleaning",
                            "use letters, digits, '-', '_' and '.', e.g. tcm-assistant-adapter")
    return cleaned
