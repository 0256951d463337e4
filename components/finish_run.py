"""Final-status component (CPU, tiny): the pipeline's exit handler."""

from kfp import dsl
from kfp.dsl import Markdown, Output
from kubetune.containers.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_run(
    status: dsl.PipelineTaskFinalStatus,
    result: Output[Markdown],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "kubetune",
    kfp_run_id: str = "",
):
    """Close the run's MLflow run with the pipeline's final state once every other step has ended, however it
    ended: FINISHED, FAILED (tagged with the step that was running and the pipeline's error) or KILLED. An OOM
    kill, an eviction or a cancelled run never reaches the steps' own clean-up; this step always runs.

    Args:
        status: The final state of the other steps, filled in by KFP (state, error message).
        mlflow_tracking_uri: MLflow tracking URI; empty = MLFLOW_TRACKING_URI of the pod, else a local sqlite
            store.
        mlflow_experiment: MLflow experiment name.
        kfp_run_id: The KFP run id, tagged on the MLflow run.

    Returns:
        result: The run's result for the run page: its state, the failed step and error, the MLflow run, the
            held-out loss and chrF of base and tuned, and the registered adapter.
    """
    from kubetune.steps import finish
    from kubetune.tracking import Tracking

    closing = finish(Tracking(mlflow_tracking_uri, mlflow_experiment, kfp_run_id=kfp_run_id), status.state,
                     error=status.error_message or "")
    with open(result.path, "w", encoding="utf-8") as handle:
        handle.write(closing.page(status.state, status.error_message or ""))
