"""Artifact files leave the process redacted: a file holding a secret (by value, or by shape in a text file) is
logged as a redacted copy when it is text and left out when it is binary."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kubetune.secrets import TOKEN_SHAPES, URL_PASSWORD, redact

_TEXT_SUFFIXES = {".json", ".jsonl", ".html", ".htm", ".md", ".txt", ".yaml", ".yml", ".csv", ".jinja", ".py", ".cfg"}
_MAX_TEXT_BYTES = 64 << 20


def redacted_copy(path: Path, secrets: list[str], staging_dir: Callable[[], str]) -> tuple[Path, list[str]]:
    """``path`` itself when no file in it holds a secret, else a copy staged under ``staging_dir()`` with those
    files redacted. Also returns a message per binary file left out of the copy because it holds a secret."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    needles = [s.encode() for s in secrets]
    dirty = {f for f in files if _file_contains(f, needles) or (_is_text(f) and _shaped_secret(f))}
    if not dirty:
        return path, []
    left_out: list[str] = []
    staged = Path(tempfile.mkdtemp(prefix="artifact-", dir=staging_dir())) / path.name
    for file in files:
        target = staged if path.is_file() else staged / file.relative_to(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if file not in dirty:
            shutil.copy2(file, target)
        elif _is_text(file):
            target.write_text(redact(file.read_text(encoding="utf-8", errors="surrogateescape"), secrets),
                              encoding="utf-8", errors="surrogateescape")
        else:
            left_out.append(f"left {file.name} out of the MLflow artifacts: it is binary and holds a secret")
    return staged, left_out


def _is_text(path: Path) -> bool:
    if path.suffix.lower() in _TEXT_SUFFIXES:
        return True
    if path.stat().st_size > _MAX_TEXT_BYTES:
        return False
    head = path.read_bytes()[:8192]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a character cut by the 8 KiB window
    return True


def _file_contains(path: Path, needles: list[bytes]) -> bool:
    if not needles:
        return False
    overlap = max(len(n) for n in needles)
    tail = b""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:]
    return False


def _shaped_secret(path: Path) -> bool:
    if path.stat().st_size > _MAX_TEXT_BYTES:
        return False
    text = path.read_text(encoding="utf-8", errors="replace")
    return bool(TOKEN_SHAPES.search(text) or URL_PASSWORD.search(text))
