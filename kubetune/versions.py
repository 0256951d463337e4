"""The version of a dataset or base model as it is right now: a string that changes when its content changes.

The cached steps (dataset prep, 4-bit model load) take these versions as inputs, so a cache key (KFP's, kfp.local's,
Argo's memoization) changes whenever the data or the model behind an unchanged name changes:

- ``kubetune://`` bundled data and local files or folders up to :data:`FULL_HASH_BYTES`: sha256 of the bytes;
  larger local sources: the names, sizes and modification times of their files (a rewrite changes the time);
- ``s3://``, ``gs://`` and other fsspec URIs: each object's ETag, generation or checksum as the store reports it;
- hub models and datasets: the commit sha the revision (default: the main branch) points to now. A hub model's
  resolved sha is also the revision the steps download, so the cache key and the bytes always agree.

When a version cannot be resolved (no network or credentials here), it is a value unique to this resolution, so
the cached step runs again rather than serve a result for content nobody can vouch for; the reason is returned for
the step's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune.data.sources import resolve_source
from kubetune.modeling import resolve_model_source

FULL_HASH_BYTES = 256 << 20
"""Local sources up to this size are hashed byte by byte; larger ones by name, size and modification time."""
UNRESOLVED = "unresolved"
# What object stores report that changes with an object's content, best first.
OBJECT_IDENTITY_KEYS = ("ETag", "etag", "generation", "md5Hash", "crc32c", "version_id", "VersionId")
OBJECT_TIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "modified", "created")


@dataclass(frozen=True)
class Version:
    version: str
    """Changes when the content changes; starts with ``unresolved`` when it could not be resolved."""
    revision: str = ""
    """For a hub source: the commit sha to read, so the bytes match the version."""
    how: str = ""
    """How the version was found, or why it could not be: one line for the log."""

    @property
    def resolved(self) -> bool:
        return not self.version.startswith(UNRESOLVED)


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _unresolved(why: str) -> Version:
    return Version(f"{UNRESOLVED}-{uuid.uuid4().hex}", how=f"not resolved, so not served from a cache: {why}")


def local_version(path: str | os.PathLike) -> Version:
    """sha256 of a local file's or folder's bytes, or its files' names, sizes and times when it is large."""
    root = Path(path)
    return files_version(root, [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()))


def files_version(root: Path, files: list[Path]) -> Version:
    """The version of ``files`` under ``root``: their names and bytes, or, above :data:`FULL_HASH_BYTES` in all,
    their names, sizes and modification times."""
    stats = [(str(f.relative_to(root)) if f != root else f.name, f.stat()) for f in files]
    total = sum(stat.st_size for _, stat in stats)
    if total > FULL_HASH_BYTES:
        listing = [(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]
        return Version(f"stat-{_digest(listing)}", how=f"{len(files)} file(s), {total} bytes: names, sizes and "
                       "modification times")
    digest = hashlib.sha256()
    for (name, _), file in zip(stats, files, strict=True):
        digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(chunk)
    return Version(f"sha256-{digest.hexdigest()}", how=f"{len(files)} file(s), {total} bytes: content sha256")


def object_version(uris: tuple[str, ...]) -> Version:
    """The identity the object store reports for each object (ETag, generation, checksum), else size and time."""
    import fsspec

    listing = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        try:
            info = fs.info(path)
        except Exception as error:  # credentials, network: the store's own words
            return _unresolved(f"cannot read {uri}: {type(error).__name__}: {error}")
        identity = {key: info[key] for key in OBJECT_IDENTITY_KEYS if info.get(key)}
        if not identity:
            identity = {key: info[key] for key in OBJECT_TIME_KEYS if info.get(key)}
            if not identity:
                return _unresolved(f"the store reports no ETag, checksum or modification time for {uri}")
        listing.append((uri, info.get("size"), identity))
    return Version(f"objects-{_digest(listing)}", how=f"{len(uris)} object(s): store-reported identity")


def _hub_api():
    from huggingface_hub import HfApi

    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)


def hub_version(repo_id: str, revision: str = "", *, repo_type: str = "model") -> Version:
    """The commit sha ``revision`` (default: the main branch) of a hub repository points to now."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return _unresolved(f"HF_HUB_OFFLINE is set, so the current commit of {repo_id} cannot be asked")
    try:
        info = _hub_api().repo_info(repo_id, revision=revision or None, repo_type=repo_type, timeout=30)
    except Exception as error:  # no network, gated repo without token, unknown revision
        return _unresolved(f"cannot ask the hub for {repo_id}@{revision or 'main'}: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}")
    if not info.sha:
        return _unresolved(f"the hub reported no commit for {repo_id}@{revision or 'main'}")
    return Version(f"commit-{info.sha}", revision=info.sha, how=f"{repo_id}@{revision or 'main'} is commit {info.sha}")


def dataset_version(dataset: str) -> Version:
    """The version of a ``dataset`` setting (bundled, local, fsspec URI or hub id)."""
    source = resolve_source(dataset)
    if source.hub_id:
        return hub_version(source.hub_id, repo_type="dataset")
    if "://" in source.files[0]:  # fsspec URIs; local files are plain paths
        return object_version(source.files)
    if len(source.files) == 1:
        return local_version(source.files[0])
    # the folder's data files only (others are not read), under one size limit for all of them
    return files_version(Path(source.files[0]).parent, sorted(Path(f) for f in source.files))


def model_version(base_model: str, revision: str = "") -> Version:
    """The version of a base model: a local directory's files, or the hub commit ``revision`` points to."""
    source = resolve_model_source(base_model, revision or None)
    if source.is_local:
        return local_version(source.location)
    return hub_version(source.location, revision)
