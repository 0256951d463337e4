"""A self-contained MLflow store in a step's ``mlflow_store`` output, and moving its runs into a server.

A store is a folder: ``mlflow.db`` (sqlite), the artifacts under ``mlartifacts/`` and ``store.json``, which
records the folder's absolute path when the store was written. MLflow keeps absolute artifact paths in the
database, so a store copied elsewhere (the next step's pod, a user's laptop) is relocated before it is opened:
every path under the old folder is rewritten to the new one.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.secrets import redact
from kubetune.tracking.store import STORE_FILE, default_local_uri

MANIFEST = "store.json"
NOTE = "README.txt"
IMPORTED_FROM_TAG = "kubetune.imported_from_run"
# Tables and columns where MLflow keeps absolute artifact locations.
_PATH_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                 ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def store_uri(store_dir: str | Path) -> str:
    return f"sqlite:///{Path(store_dir).resolve() / STORE_FILE}"


def has_records(store_dir: str | Path) -> bool:
    return (Path(store_dir) / STORE_FILE).is_file()


def open_store(store_dir: str | Path) -> str:
    """Prepare ``store_dir`` to hold a store (relocating one copied there) and return its tracking URI."""
    root = Path(store_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if has_records(root):
        relocate_store(root)
    (root / MANIFEST).write_text(json.dumps({"root": str(root)}), encoding="utf-8")
    return default_local_uri(root)


def relocate_store(store_dir: str | Path) -> None:
    """Rewrite the absolute artifact paths of a store that was written at another path."""
    root = Path(store_dir).resolve()
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise KubetuneError(f"{root} holds no kubetune MLflow store ({MANIFEST} is missing)",
                            "pass the mlflow_store output of a kubetune train or evaluate step")
    old = json.loads(manifest.read_text(encoding="utf-8"))["root"]
    if old == str(root):
        return
    with sqlite3.connect(root / STORE_FILE) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in _PATH_COLUMNS:
            if table in tables:
                for prefix in (old, Path(old).as_uri()):
                    new = str(root) if not prefix.startswith("file:") else root.as_uri()
                    db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} LIKE ?",
                               (new, len(prefix) + 1, prefix + "%"))
    manifest.write_text(json.dumps({"root": str(root)}), encoding="utf-8")


def continue_store(source_dir: str | Path, store_dir: str | Path) -> str:
    """Copy the store of an earlier step into ``store_dir`` and return the copy's tracking URI."""
    target = Path(store_dir)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source_dir, target)
    return open_store(target)


def write_note(store_dir: str | Path, tracking_uri: str, run_id: str) -> None:
    """The ``mlflow_store`` output of a step that logged to a server: a note saying where the records are."""
    root = Path(store_dir)
    if has_records(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / NOTE).write_text(f"This step logged to the MLflow server {redact(tracking_uri)}, run {run_id}.\n",
                             encoding="utf-8")


def import_store(store_dir: str | Path, tracking_uri: str) -> list[dict[str, Any]]:
    """Copy every run of a kubetune store into the MLflow at ``tracking_uri``: experiment, name, tags, params,
    metric histories, artifacts, status and registered model versions. Importing again skips runs already
    imported (they are tagged with their original run id). Returns one summary per run."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="kubetune-import-") as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(store_dir, copy)  # relocated in the copy: the given folder stays as it is
        relocate_store(copy)
        source = MlflowClient(tracking_uri=store_uri(copy), registry_uri=store_uri(copy))
        target = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        results = []
        for experiment in source.search_experiments():
            for run in source.search_runs([experiment.experiment_id]):
                results.append(_import_run(source, target, experiment.name, run, Path(tmp)))
        return results


def _import_run(source, target, experiment_name: str, run, scratch: Path) -> dict[str, Any]:
    from mlflow.entities import Metric, Param

    experiment = target.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else target.create_experiment(experiment_name)
    old_id = run.info.run_id
    found = target.search_runs([experiment_id], filter_string=f"tags.`{IMPORTED_FROM_TAG}` = '{old_id}'")
    if found:
        return {"source_run_id": old_id, "run_id": found[0].info.run_id, "skipped": True}
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    new = target.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name,
                            tags={**tags, IMPORTED_FROM_TAG: old_id})
    new_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in run.data.metrics for m in source.get_metric_history(old_id, key)]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params and 1,000 metrics a batch
        target.log_batch(new_id, params=params[start:start + 100])
    for start in range(0, len(metrics), 1000):
        target.log_batch(new_id, metrics=metrics[start:start + 1000])
    artifacts = scratch / old_id
    artifacts.mkdir()
    if source.list_artifacts(old_id):
        target.log_artifacts(new_id, source.download_artifacts(old_id, "", str(artifacts)))
    registered = []
    for version in source.search_model_versions(f"run_id = '{old_id}'"):
        relative = version.source.split("/artifacts/", 1)[-1] if "/artifacts/" in version.source else "adapter"
        if not target.search_registered_models(f"name = '{version.name}'"):
            target.create_registered_model(version.name)
        created = target.create_model_version(version.name, f"runs:/{new_id}/{relative}", run_id=new_id,
                                              tags=version.tags, description=version.description)
        registered.append(f"{version.name}/{created.version}")
    target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
    return {"source_run_id": old_id, "run_id": new_id, "experiment": experiment_name,
            "registered": registered, "skipped": False}
