"""Write outputs under a temporary name and move them into place only when complete.

A step killed half-way never leaves a file or directory that a later step, or KFP's cache, would take as a
finished result: the final name appears in one ``rename`` after every byte is written and flushed to disk
(``fsync``), so a node that loses power right after the rename does not leave empty files behind either.
A kill leaves at most a hidden ``.<name>.partial-*`` sibling, which nothing reads.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARKER = ".partial-"


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_MARKER}{uuid.uuid4().hex[:8]}")


def is_partial(path: str | os.PathLike) -> bool:
    """Is ``path`` a staging name of :func:`atomic_dir` / :func:`atomic_file` (an unfinished output)?"""
    name = Path(path).name
    return name.startswith(".") and PARTIAL_MARKER in name


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk; a no-op where the platform can't."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. directories on some network filesystems
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[str]:
    """Yield a staging directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    staging.mkdir()
    try:
        yield str(staging)
        _fsync_tree(staging)
        if target.exists():
            old = _staging_name(target)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        _fsync(target.parent)
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
        _fsync(staging)
        os.replace(staging, target)
        _fsync(target.parent)
    finally:
        if staging.exists():
            staging.unlink()


def file_sha256(path: str | os.PathLike, *, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 of a file, or of a directory's relative names and bytes (sorted, files named in ``exclude``
    skipped); "" when the path is missing."""
    import hashlib

    root = Path(path)
    if not root.exists():
        return ""
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)
    for file in files:
        if root.is_dir():
            digest.update(str(file.relative_to(root)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
