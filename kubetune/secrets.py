"""Secrets: recognise them by name, value and shape, and keep them out of everything kubetune writes.

MLflow logging (params, tags, texts, artifacts), prepared datasets and error messages all go through these
functions, so one rule decides what counts as a secret.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"
# Whole name parts only (after camelCase is split): HF_TOKEN, aws_secret_access_key, api-key, hfToken match;
# tokenizer, max_new_tokens don't.
SECRET_NAME = re.compile(
    r"(^|[_.\-])(token|secrets?|password|passwd|passphrase|credentials?|auth|authorization|cookie|"
    r"api[_\-]?key|access[_\-]?key|private[_\-]?key|account[_\-]?key|connection[_\-]?string)($|[_.\-])",
    re.I,
)
# Secrets with a recognisable shape are redacted even when no environment variable holds them: Hugging Face,
# GitHub and AWS access key ids, bearer tokens, and passwords in URLs.
TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{30,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_\w{40,}\b|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=-]{16,}"
)
URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]+):[^@\s/]+@")

def is_secret_name(name: str) -> bool:
    """Does a variable or parameter name look like it holds a secret?"""
    return bool(SECRET_NAME.search(re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name))) or "password" in name.lower()


def without_credentials(uri: str) -> str:
    """The URI without a ``user:password@`` part: credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD."""
    return re.sub(r"(?<=://)[^/@]*@", "", uri)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like secrets (long enough to be worth matching)."""
    environ = os.environ if environ is None else environ
    values = {v.strip() for k, v in environ.items() if is_secret_name(k) and len(v.strip()) >= 6}
    variants = set()
    for value in values:
        # The same secret as it appears inside JSON strings and URLs.
        variants |= {value, json.dumps(value)[1:-1], urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    return sorted(variants, key=len, reverse=True)


def redact(value: Any, secrets: Iterable[str] = ()) -> str:
    """``str(value)`` with known secret values, token-shaped strings and URL passwords replaced by ``***``."""
    text = str(value)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    return TOKEN_SHAPES.sub(REDACTED, text)


def redact_values(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` (longest first) replaced by ``***``: :func:`redact` without the
    pattern scans, for the rows of a dataset, where a regular-expression pass per row would cost minutes."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text
