"""Write outputs under a temporary name and move them into place only when complete.

A step killed half-way never leaves a file or directory that a later step, or KFP's cache, would take as a
finished result: the final name appears in one ``rename`` after every byte is written and flushed to disk
(``fsync``), so a node that loses power right after the rename does not leave empty files behind either.
A kill leaves at most a hidden ``.<name>.partial-*`` sibling, which nothing reads.

Nothing of the user's is replaced: a directory output may replace only an earlier output of kubetune (it holds
the :data:`OWN_OUTPUT` marker, or the metadata file of a kubetune model or adapter) or an empty folder, and
:func:`check_outputs` refuses an output that is one of the step's inputs, lies inside one, or holds one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubetune.errors import KubetuneError, collect

PARTIAL_MARKER = ".partial-"
OWN_OUTPUT = ".kubetune-output"
"""A file in every directory kubetune writes, so that a rerun may replace it and nothing else."""
# Outputs of earlier versions, written before the marker: a 4-bit model, an adapter.
_OWN_METADATA = ("kubetune_model.json", "kubetune_adapter.json")


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
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    staging.mkdir()
    try:
        yield str(staging)
        (staging / OWN_OUTPUT).write_text("written by kubetune; a rerun may replace this folder\n",
                                          encoding="utf-8")
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


def is_own_output(directory: str | os.PathLike) -> bool:
    """Was ``directory`` written by kubetune (so a rerun may replace it)?"""
    return any((Path(directory) / name).is_file() for name in (OWN_OUTPUT, *_OWN_METADATA))


def check_replaceable(target: str | os.PathLike) -> None:
    """Refuse to write a directory over a file, or over a folder that holds files kubetune did not write."""
    target = Path(target)
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise KubetuneError(f"output {target} is an existing file, and this output is a folder",
                            "choose a new output path (a folder that does not exist yet)")
    if target.is_dir() and any(target.iterdir()) and not is_own_output(target):
        raise KubetuneError(
            f"output folder {target} already holds files that kubetune did not write; they would be replaced",
            "choose a new output path, or empty or remove that folder yourself if you mean to replace it",
        )


def check_outputs(inputs: dict[str, str | os.PathLike], outputs: dict[str, str | os.PathLike]) -> None:
    """One error for every output that is an input, lies inside one or holds one, and for outputs that share a
    path: writing them would destroy what the step reads, or one output would overwrite the other."""
    problems: list[tuple[str, str]] = []
    resolved_in = {name: Path(path).resolve() for name, path in inputs.items() if str(path) and Path(path).exists()}
    resolved_out = {name: Path(path).resolve() for name, path in outputs.items() if str(path)}
    for out_name, out in resolved_out.items():
        for in_name, source in resolved_in.items():
            if out == source or out in source.parents or source in out.parents:
                problems.append((f"output {out_name} ({out}) overlaps input {in_name} ({source}): writing it would "
                                 f"destroy what the step reads", f"give {out_name} a path of its own"))
    for out_name, out in resolved_out.items():
        problems += _unwritable(out_name, out)
    names = list(resolved_out)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if resolved_out[first] == resolved_out[second]:
                problems.append((f"outputs {first} and {second} are the same path ({resolved_out[first]})",
                                 f"give {first} and {second} different paths"))
    collect(problems)


def _unwritable(name: str, path: Path) -> list[tuple[str, str]]:
    """Can ``path`` be created? Checked before the work, not after it."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return []
    if existing != path and not existing.is_dir():
        return [(f"output {name} ({path}) cannot be created: {existing} is a file",
                 f"give {name} a path in a folder")]
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return [(f"output {name} ({path}) cannot be written: no permission to write in {folder}",
                 f"give {name} a path in a folder this user may write to, or fix that folder's permissions")]
    return []


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[str]:
    """Yield a staging file path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    if target.is_dir():
        raise KubetuneError(f"output {target} is an existing folder, and this output is a file",
                            "choose a new output path")
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
