"""``kubetune mlflow-import``: load the records a step kept in its ``mlflow_store`` output into an MLflow server."""

from __future__ import annotations

import argparse
import json
import os

from kubetune.errors import KubetuneError
from kubetune.tracking import import_store, resolve_tracking_uri
from kubetune.tracking.transfer import has_records


def cmd_import(args: argparse.Namespace) -> int:
    if not has_records(args.store):
        raise KubetuneError(f"{args.store} holds no MLflow store (no mlflow.db in it)",
                            "pass the mlflow_store output of evaluate_model (or train_lora), downloaded as a folder")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise KubetuneError("no MLflow server to import into",
                            "pass --tracking-uri http://mlflow.example.com or set MLFLOW_TRACKING_URI")
    for result in import_store(args.store, resolve_tracking_uri(uri)):
        print(json.dumps(result), flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mlflow-import", help="load a step's mlflow_store output (kept without a tracking server) into MLflow",
        description="Copy the runs of a kubetune MLflow store (the mlflow_store output of a step that ran without a "
        "tracking server, mlflow_required=false) into an MLflow server: tags, params, metric histories, artifacts "
        "and registered adapter versions. Importing the same store again skips the runs already imported.",
    )
    parser.add_argument("store", help="the mlflow_store folder (evaluate_model's holds training's records too)")
    parser.add_argument("--tracking-uri", default="", help="MLflow server (default: MLFLOW_TRACKING_URI)")
    parser.set_defaults(func=cmd_import)
