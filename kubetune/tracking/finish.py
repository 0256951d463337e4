"""Closing a pipeline run's MLflow run with the pipeline's final state, whatever ended it.

The tracked steps end their run themselves when they finish or raise; an OOM kill, an eviction, a lost node or a
cancelled run never reaches that code, and the run would stay RUNNING for ever. The pipeline's final-status step
(KFP's exit handler, Argo's onExit) runs after every other step, finds the run by its KFP run id tag and closes it:
FINISHED, FAILED or KILLED, with the step that was running and the orchestrator's error message as tags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kubetune.secrets import redact, secret_values
from kubetune.tracking.names import (
    KFP_RUN_ID_TAG,
    MAX_TAG_LENGTH,
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    truncate,
)
from kubetune.tracking.run import Tracker
from kubetune.tracking.settings import Tracking, platform_run_id
from kubetune.tracking.store import resolve_tracking_uri

log = logging.getLogger("kubetune")

RUNNING_STEP_TAG = "kubetune.running_step"
"""The tracked step that is working on the run now (:data:`NO_STEP` between steps): names the step a kill stopped."""
NO_STEP = "none"
PIPELINE_STATE_TAG = "kubetune.pipeline_state"
FAILED_STEP_TAG = "kubetune.failed_step"
PIPELINE_ERROR_TAG = "kubetune.pipeline_error"

# The numbers of the result page: label, then base and tuned (or a single) metric.
RESULT_METRICS = (
    ("held-out loss, base → tuned", ("eval.base_eval_loss", "eval.tuned_eval_loss")),
    ("chrF, base → tuned", ("eval.base_chrf", "eval.tuned_chrf")),
    ("training loss", ("sft.train_loss",)),
    ("training tokens/s", ("sft.tokens_per_second",)),
)

# Final states as KFP (PipelineTaskFinalStatus.state) and Argo ({{workflow.status}}) name them → MLflow's.
RUN_STATUS = {
    "SUCCEEDED": "FINISHED", "FAILED": "FAILED", "ERROR": "FAILED", "SYSTEM_ERROR": "FAILED",
    "CANCELED": "KILLED", "CANCELLED": "KILLED", "CANCELING": "KILLED", "TERMINATED": "KILLED",
}


@dataclass(frozen=True)
class Closing:
    run_id: str
    """The MLflow run that was closed ("" when there was none to close)."""
    status: str
    """Its status now (FINISHED, FAILED, KILLED), or "" when there was no run."""
    failed_step: str
    message: str
    """One line for the step's log."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The run's metrics (latest values), for the result page."""
    tags: dict[str, str] = field(default_factory=dict)
    run_url: str = ""

    def page(self, pipeline_state: str, error: str = "") -> str:
        """The run's result as Markdown, for the Kubeflow run page: the state, the failed step and its error, the
        MLflow run and the numbers that decide whether fine-tuning worked."""
        state = pipeline_state.strip().upper() or "UNKNOWN"
        lines = [f"**Pipeline {state}**" + (f" in `{self.failed_step}`" if self.failed_step and
                                             run_status(state) != "FINISHED" else "")]
        if error.strip() and run_status(state) != "FINISHED":
            lines.append(f"\n> {redact(error.strip(), secret_values())[:1000]}")
        run = f"[`{self.run_id}`]({self.run_url})" if self.run_url else f"`{self.run_id}`"
        lines.append(f"\nMLflow run {run}: {self.status}." if self.run_id else f"\n{self.message}.")
        rows = [(label, " → ".join(f"{self.metrics[key]:.4g}" for key in keys))
                for label, keys in RESULT_METRICS if all(key in self.metrics for key in keys)]
        if "eval.tuned_beats_base" in self.metrics:
            rows.append(("tuned beats base (held-out loss)", "yes" if self.metrics["eval.tuned_beats_base"] else "no"))
        if self.tags.get(REGISTERED_MODEL_TAG):
            rows.append(("registered adapter", f"{self.tags[REGISTERED_MODEL_TAG]} version "
                                               f"{self.tags.get(REGISTERED_VERSION_TAG, '?')}"))
        if rows:
            lines += ["", "| result | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows)]
        return "\n".join(lines) + "\n"


def run_status(pipeline_state: str) -> str:
    """MLflow's run status for an orchestrator's final state (unknown states count as failures)."""
    return RUN_STATUS.get(pipeline_state.strip().upper().replace(" ", "_"), "FAILED")


def close_pipeline_run(tracking: Tracking, pipeline_state: str, *, failed_step: str = "", error: str = "") -> Closing:
    """Close the MLflow run tagged with ``tracking.kfp_run_id`` as the pipeline ended.

    A run the steps already ended keeps its status (evaluation's FINISHED is the truth about a finished run); a
    run still RUNNING gets the pipeline's state. ``failed_step`` (known to Argo) defaults to the step the run
    says was working when it stopped. Returns what was done; never raises for a missing run or server: the
    pipeline's own state is the result that matters.
    """
    status = run_status(pipeline_state)
    try:
        uri = resolve_tracking_uri(tracking.tracking_uri, required=True)
    except Exception as error:  # no server: the steps kept their records in their outputs, nothing to close
        return Closing("", "", failed_step, f"no MLflow run to close ({str(error).splitlines()[0]})")
    tracker = Tracker(uri, tracking.experiment, platform_run_id=platform_run_id(uri))
    secrets = secret_values()
    try:
        run = _find_run(tracker, tracking.kfp_run_id)
        if run is None:
            return Closing("", "", failed_step, f"no MLflow run is tagged with the pipeline run id "
                           f"{tracking.kfp_run_id!r} (the pipeline stopped before training opened one)")
        running = run.data.tags.get(RUNNING_STEP_TAG, NO_STEP)
        step = failed_step or ("" if running == NO_STEP else running)
        tags = {PIPELINE_STATE_TAG: pipeline_state.strip().upper() or "UNKNOWN", RUNNING_STEP_TAG: NO_STEP}
        if status != "FINISHED":
            tags[FAILED_STEP_TAG] = step or "unknown"
            if error.strip():
                tags[PIPELINE_ERROR_TAG] = truncate(redact(error.strip(), secrets), MAX_TAG_LENGTH)
        for key, value in tags.items():
            tracker.client.set_tag(run.info.run_id, key, value)
        tracker.run_id = run.info.run_id
        found = {"metrics": dict(run.data.metrics), "tags": dict(run.data.tags), "run_url": tracker.run_url}
        if run.info.status != "RUNNING":
            return Closing(run.info.run_id, run.info.status, step,
                           f"MLflow run {run.info.run_id} had already ended {run.info.status}; pipeline state "
                           f"{tags[PIPELINE_STATE_TAG]} recorded", **found)
        tracker.client.set_terminated(run.info.run_id, status)
    except Exception as error:  # noqa: BLE001 - a server outage must not turn a finished pipeline into a failure
        return Closing("", "", failed_step, redact(f"could not close the MLflow run at {uri}: "
                                                  f"{type(error).__name__}: {str(error)[:300]}", secrets))
    where = f" in {step}" if step and status != "FINISHED" else ""
    return Closing(run.info.run_id, status, step, f"MLflow run {run.info.run_id} closed {status}{where}", **found)


def _find_run(tracker: Tracker, kfp_run_id: str):
    """The newest run tagged with this pipeline run id, in the tracker's experiment (or KFP's, when nested)."""
    if not kfp_run_id:
        return None
    if tracker.platform_run_id:
        experiment_ids = [tracker.client.get_run(tracker.platform_run_id).info.experiment_id]
    else:
        experiment = tracker.client.get_experiment_by_name(tracker.experiment)
        if experiment is None:
            return None
        experiment_ids = [experiment.experiment_id]
    found = tracker.client.search_runs(experiment_ids, filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None
