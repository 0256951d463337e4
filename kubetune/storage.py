"""Write outputs under a temporary name and move them into place only when complete.

A step killed half-way never leaves a file or directory that a later step, or KFP's cache, would take as a
finished result.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[str]:
    """Yield a staging directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    staging.mkdir()
    try:
        yield str(staging)
        if target.exists():
            old = _staging_name(target)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[str]:
    """Yield a staging file path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    try:
        yield str(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()
