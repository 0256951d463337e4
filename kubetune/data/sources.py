"""Where a dataset comes from (``DataConfig.dataset``), and opening its files.

Sources:
  - ``kubetune://tcm-demo``: the bundled synthetic demo data;
  - a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or a folder of such files (all of one
    extension, not recursive; other files are ignored);
  - an ``s3://``, ``gs://`` or other fsspec URI to such a file or folder (``pip install 'kubetune[cloud]'``);
  - otherwise a hub id, read with ``datasets.load_dataset(id, dataset_subset, split=dataset_split)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kubetune.config import SAMPLE_DATASET
from kubetune.errors import KubetuneError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
BUNDLED = {"tcm-demo": "tcm_demo.jsonl"}
CLOUD_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
ACCEPTED_FORMS = (
    "a local .jsonl/.json/.parquet/.csv file, a folder of such files, an s3:// or gs:// URI, "
    f"a hub id such as tatsu-lab/alpaca, or {SAMPLE_DATASET}"
)


@dataclass(frozen=True)
class Source:
    name: str  # as the user wrote it, for messages
    files: tuple[str, ...] = ()  # local paths or URIs, all of one extension
    extension: str = ""
    hub_id: str = ""


def _uri_scheme(dataset: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", dataset)
    return match.group(1).lower() if match else ""


def _looks_like_path(dataset: str) -> bool:
    return (
        dataset.startswith(("/", "./", "../", "~", "."))
        or "\\" in dataset
        or dataset.count("/") > 1
        or dataset.lower().endswith(EXTENSIONS)
    )


def _data_files(name: str, entries: Iterable[str]) -> tuple[tuple[str, ...], str]:
    """The data files among a folder's entries; all must share one extension."""
    entries = sorted(entries)
    by_ext: dict[str, list[str]] = {}
    for entry in entries:
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        ext = os.path.splitext(base)[1].lower()
        if ext in EXTENSIONS and not base.startswith((".", "_")):
            by_ext.setdefault(ext, []).append(entry)
    if not by_ext:
        shown = ", ".join(e.rstrip("/").rsplit("/", 1)[-1] for e in entries[:10]) or "nothing"
        raise KubetuneError(
            f"folder {name} holds no data files (found: {shown})",
            f"put .jsonl, .json, .parquet or .csv files in {name}, or point dataset at a file",
        )
    if len(by_ext) > 1:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_ext.items()))
        raise KubetuneError(
            f"folder {name} mixes data file types ({counts})",
            "keep one file type per folder, or point dataset at a single file",
        )
    ext, files = next(iter(by_ext.items()))
    return tuple(files), ext


def _file_extension(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if ext not in EXTENSIONS:
        raise KubetuneError(
            f"dataset file {name} has an unsupported type {ext or '(no extension)'}",
            f"use one of {', '.join(EXTENSIONS)}",
        )
    return ext


def _remote_source(dataset: str, scheme: str) -> Source:
    import fsspec
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise KubetuneError(
            f"dataset {dataset} has an unknown URI scheme {scheme}://",
            "use s3://, gs://, az://, abfs://, hdfs://, http(s)://, hf:// or another fsspec protocol, "
            f"or a local path, hub id or {SAMPLE_DATASET}",
        )
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        package = CLOUD_PACKAGES.get(scheme)
        install = (
            "pip install 'kubetune[cloud]'" if package in ("s3fs", "gcsfs") else f"pip install {package}"
        )
        raise KubetuneError(
            f"reading {scheme}:// needs the package {package or 'for that protocol'}, which is not installed "
            f"({error})",
            install if package else f"install the fsspec implementation for {scheme}://",
        ) from None
    fs, path = fsspec.core.url_to_fs(dataset)
    try:
        if fs.isdir(path):
            files, ext = _data_files(dataset, (fs.unstrip_protocol(p) for p in fs.ls(path, detail=False)))
            return Source(dataset, files, ext)
        if fs.isfile(path):
            return Source(dataset, (dataset,), _file_extension(path))
    except KubetuneError:
        raise
    except Exception as error:  # credentials, network: the filesystem's own words say most
        raise KubetuneError(
            f"cannot read {dataset}: {type(error).__name__}: {error}",
            "check the URI and the credentials (AWS_*/GOOGLE_APPLICATION_CREDENTIALS) of this environment",
        ) from None
    raise KubetuneError(f"{dataset} does not exist", "check the bucket and path of the URI")


def resolve_source(dataset: str) -> Source:
    """Classify ``dataset`` as bundled data, local file/folder, fsspec URI or hub id."""
    dataset = dataset.strip()
    scheme = _uri_scheme(dataset)
    if scheme == "kubetune":
        key = dataset.split("://", 1)[1].strip("/")
        if key not in BUNDLED:
            known = ", ".join(f"kubetune://{k}" for k in BUNDLED)
            raise KubetuneError(f"there is no bundled dataset {dataset}", f"use one of: {known}")
        path = resources.files("kubetune").joinpath("sample_data", BUNDLED[key])
        return Source(dataset, (str(path),), ".jsonl")
    if scheme == "file":
        dataset = dataset.split("://", 1)[1]
    elif scheme:
        return _remote_source(dataset, scheme)
    path = Path(dataset).expanduser()
    try:
        path.resolve(strict=path.is_symlink())
    except (RuntimeError, OSError) as exc:  # a link to itself, or a chain of links that never ends
        raise KubetuneError(f"dataset {dataset} is a link that leads nowhere ({exc})",
                            "point dataset at the real file or folder") from None
    if path.is_file():
        return Source(dataset, (str(path),), _file_extension(path.name))
    if path.is_dir():
        files, ext = _data_files(dataset, (str(p) for p in path.iterdir() if p.is_file()))
        return Source(dataset, files, ext)
    if _looks_like_path(dataset) or scheme == "file":
        raise KubetuneError(
            f"dataset {dataset} is neither an existing file or folder nor a URI "
            f"(resolved to {path.resolve()})",
            f"check the path; the dataset can be {ACCEPTED_FORMS}",
        )
    return Source(dataset, hub_id=dataset)


# ----------------------------------------------------------------------------------------------------------
# Opening the files: remote ones through fsspec


def open_binary(file: str):
    """A binary file handle for a local path or an fsspec URI."""
    if _uri_scheme(file):
        import fsspec

        return fsspec.open(file, "rb").open()
    return open(file, "rb")


def local_copies(files: tuple[str, ...], scratch: str) -> list[str]:
    """Remote (fsspec) files copied into the scratch folder, local ones as they are: ``datasets`` refuses remote
    paths when offline (HF_DATASETS_OFFLINE), and would download them to its cache anyway."""
    import shutil

    local = []
    for index, file in enumerate(files):
        if not _uri_scheme(file):
            local.append(file)
            continue
        target = Path(scratch) / "remote" / f"{index:05d}-{file.rstrip('/').rsplit('/', 1)[-1]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_binary(file) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        local.append(str(target))
    return local
