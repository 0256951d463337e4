"""``kubetune run --local``: the whole pipeline under kfp.local, each step a subprocess of this Python."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from kfp import local

from kubetune.cli.params import parse_params
from kubetune.errors import KubetuneError
from kubetune.parameters import pipeline_settings, validate_parameters
from kubetune.pipelines import PipelineOptions, make_pipeline
from kubetune.secrets import without_credentials
from kubetune.storage import atomic_file
from kubetune.tiny import ensure_tiny_model
from kubetune.tracking import default_local_uri

LOCAL_WORKDIR = "kubetune-local"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# The local demo adapts a randomly initialised 2-layer model on the CPU: shorter samples and a high learning
# rate make its held-out loss fall within a few minutes. Any --param overrides these.
LOCAL_DEFAULTS: dict[str, Any] = {
    "max_length": 512,
    "learning_rate": 1e-2,
    "num_epochs": 2.0,
    "save_steps": 20,
    "max_new_tokens": 32,
    "max_generation_samples": 8,
    "max_eval_samples": 40,
}


def run_local(params: dict[str, Any], workdir: str | os.PathLike = LOCAL_WORKDIR) -> dict[str, Any]:
    """Run the whole pipeline under kfp.local (each step a subprocess of this Python). Returns the summary."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params = dict(params)
    if "base_model" not in params:
        params = {**LOCAL_DEFAULTS, **params, "base_model": ensure_tiny_model(workdir / "tiny-model")}
    # A server in the environment stays there (the steps inherit it): never copied into a parameter, which the
    # step logs print.
    if not params.get("mlflow_tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        params["mlflow_tracking_uri"] = default_local_uri(workdir)
    tracking_uri = params.get("mlflow_tracking_uri") or os.environ["MLFLOW_TRACKING_URI"].strip()
    # Checkpoints in the workdir, one folder per set of parameters: running the same command again after a kill
    # resumes training (and its MLflow run) instead of starting over. Removed once the run has finished.
    checkpoints = None
    if not params.get("checkpoint_dir"):
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
        checkpoints = workdir / "checkpoints" / digest
        params["checkpoint_dir"] = str(checkpoints)
    outputs = workdir / "outputs"
    outputs.mkdir(exist_ok=True)
    earlier = set(outputs.iterdir())
    # kfp.local's cache serves dataset prep and the 4-bit model again while the versions resolve_sources finds
    # (content hashes, hub commits) and the settings are unchanged, like KFP's cache on a cluster.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(outputs), raise_on_error=True,
               enable_caching=True, cache_root=str(workdir / "cache"), workspace_root=str(workdir / "workspace"))
    try:
        # No retries here: kfp.local would repeat a failed step after minutes of backoff; running the same
        # command again resumes training from its checkpoints instead.
        make_pipeline(PipelineOptions(retries=0))(**params)
    except RuntimeError as error:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        if "FAILURE" not in str(error):
            raise
        plain = ANSI_COLOUR.sub("", str(error))
        raise KubetuneError(
            f"the local pipeline failed: {plain}",
            "read the failed step's log above: it ends with the step's own error and its fix",
        ) from None
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    run_dir = max(set(outputs.iterdir()) - earlier, key=lambda path: path.stat().st_mtime)
    train, evaluate = task_outputs(run_dir / "train-lora"), task_outputs(run_dir / "evaluate-model")
    # KFP names the artifacts "report" and "training_report": copies with .html open in a browser as pages.
    pages = {"report": evaluate["report"], "training_report": train["training_report"]}
    for name, artifact in pages.items():
        with atomic_file(workdir / f"{name}.html") as staging:
            shutil.copyfile(artifact["path"], staging)
    return {
        "adapter": train["adapter"]["path"],
        "report": str(workdir / "report.html"),
        "training_report": str(workdir / "training_report.html"),
        "mlflow_run_id": train["adapter"]["metadata"].get("mlflow_run_id", ""),
        "mlflow_tracking_uri": without_credentials(tracking_uri),
        "mlflow_experiment": params.get("mlflow_experiment", "kubetune"),
        "base_model": params["base_model"],
    }


def task_outputs(task_dir: Path) -> dict[str, dict[str, Any]]:
    """A kfp.local task's output artifacts (path and metadata by name), from the executor output it wrote."""
    written = json.loads((task_dir / "executor_output.json").read_text(encoding="utf-8"))
    return {name: {"path": entry["artifacts"][0]["uri"], "metadata": entry["artifacts"][0].get("metadata", {})}
            for name, entry in written.get("artifacts", {}).items()}


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise KubetuneError("run needs --local (cluster runs go through `kubetune submit`)",
                            "use `kubetune run --local` here, or `kubetune submit --host URL` for Kubeflow")
    params = parse_params(args.param)
    validate_parameters(params)
    summary = run_local(params, args.workdir)
    print(f"adapter:      {summary['adapter']}", file=sys.stderr)
    print(f"report:       {summary['report']}", file=sys.stderr)
    print(f"MLflow run:   {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _parameters_help() -> str:
    """The pipeline parameters, their defaults and what they do: the names --param takes."""
    lines = ["pipeline parameters (--param NAME=VALUE; the names the Kubeflow UI shows):"]
    for setting in pipeline_settings():
        default = json.dumps(setting.default, ensure_ascii=False) if isinstance(setting.default, (list, str)) \
            else setting.default
        lines.append(f"  {setting.name} (default: {default}): {setting.help}")
    lines.append("Without base_model the run uses a tiny random model with demo settings: "
                 + ", ".join(f"{k}={v}" for k, v in LOCAL_DEFAULTS.items()) + ".")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the whole pipeline locally with kfp.local", epilog=_parameters_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--local", action="store_true", help="run here, each step as a subprocess")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    run.add_argument("--workdir", default=LOCAL_WORKDIR, help="outputs, tiny model and MLflow store")
    run.set_defaults(func=cmd_run)
