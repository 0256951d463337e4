"""``kubetune run --local``: the whole pipeline under kfp.local, each step a subprocess of this Python."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from kfp import local

from kubetune.cli.console import ANSI_COLOUR, StepConsole, verbose_from_env
from kubetune.cli.params import parse_params
from kubetune.errors import KubetuneError
from kubetune.parameters import pipeline_settings, validate_parameters
from kubetune.pipelines import PipelineOptions, make_pipeline
from kubetune.pipelines.kfp_spec import pipeline_steps
from kubetune.pipelines.step_table import STEPS
from kubetune.secrets import without_credentials
from kubetune.storage import atomic_file
from kubetune.tiny import TINY_NOTE, ensure_tiny_model, is_tiny_model_dir
from kubetune.tracking import default_local_uri

LOCAL_WORKDIR = "kubetune-local"
# The local demo adapts a randomly initialised 2-layer model on the CPU: shorter samples and a high learning
# rate make its held-out loss fall within a few minutes. Any --param overrides these.
LOCAL_DEFAULTS: dict[str, Any] = {
    "max_length": 512,
    "learning_rate": 1e-2,
    "num_epochs": 2.0,
    "save_steps": 20,
    "max_new_tokens": 32,
    "max_generation_samples": 8,
    "train_probe_samples": 4,
    "max_eval_samples": 40,
}


def run_local(params: dict[str, Any], workdir: str | os.PathLike = LOCAL_WORKDIR, *,
              verbose: bool | None = None) -> dict[str, Any]:
    """Run the whole pipeline under kfp.local (each step a subprocess of this Python). Returns the summary.

    The terminal gets a line per step (``verbose``, default ``KUBETUNE_VERBOSE``: every step's full log); the
    full log is kept in ``<workdir>/logs``."""
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
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    console = StepConsole(workdir / "logs" / f"run-{stamp}.log", sys.stderr,
                          verbose=verbose_from_env() if verbose is None else verbose,
                          names={step.task: step.display_name for step in STEPS},
                          upstream={spec.task: spec.dependencies for spec in pipeline_steps()})
    print(f"kubetune: running the pipeline locally; full log: {console.log_path}", file=sys.stderr)
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console), warnings.catch_warnings():
            # kfp.local says of every step that Kubernetes settings do not apply locally, and that it runs the
            # image's code in this Python: both true by design here.
            warnings.filterwarnings("ignore", r"Task '.*': settings .* have no effect", UserWarning)
            warnings.filterwarnings("ignore", r"You may be attemping to run a task that uses custom", RuntimeWarning)
            # No retries here: kfp.local would repeat a failed step after minutes of backoff; running the same
            # command again resumes training from its checkpoints instead.
            make_pipeline(PipelineOptions(retries=0))(**params)
    except RuntimeError as error:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        if "FAILURE" not in str(error):
            raise
        raise step_failure(console, ANSI_COLOUR.sub("", str(error))) from None
    finally:
        console.close()
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


def step_failure(console: StepConsole, pipeline_error: str) -> KubetuneError:
    """The failed step's own error and fix (the last lines a user reads), else the end of its log."""
    step = console.failed[0] if console.failed else "a step"
    if console.step_errors:
        problem, fix = console.step_errors[-1]
        return KubetuneError(f"{step} failed: {problem}", f"{fix or 'see the log'} (full log: {console.log_path})")
    last = " | ".join(console.failure_tail[-3:]) or pipeline_error
    return KubetuneError(f"{step} failed without a kubetune error (killed, or a crash): {last}",
                         f"read the end of its log in {console.log_path}; run with --verbose to watch it")


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
    summary = run_local(params, args.workdir, verbose=args.verbose or None)
    print(f"adapter:      {summary['adapter']}", file=sys.stderr)
    print(f"report:       {summary['report']}", file=sys.stderr)
    print(f"MLflow run:   {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}", file=sys.stderr)
    if is_tiny_model_dir(summary["base_model"]):
        print(f"note:         {TINY_NOTE}", file=sys.stderr)
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
    run.add_argument("--verbose", action="store_true",
                     help="show every step's full log as it runs (default: KUBETUNE_VERBOSE; a line per step)")
    run.set_defaults(func=cmd_run)
