"""What ``kubetune submit`` does with a connected ``kfp.Client``: upload the compiled package as a pipeline
version, start a run or a recurring run from that version, and follow a run until it ends.

Host, credentials, the connection check and the command line live in :mod:`kubetune.cli.submit`; this module
only talks to a client it is given, and turns the server's answers into progress lines and an exit status.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import kfp
import kfp_server_api
import urllib3

from kubetune import __version__
from kubetune.errors import KubetuneError

DEFAULT_PIPELINE = "kubetune-finetune"
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
EXIT_FAILED = 1  # the run ended in a final state other than SUCCEEDED
EXIT_TIMEOUT = 124  # like timeout(1): stopped waiting, the run goes on
EXIT_INTERRUPTED = 130  # like a shell after Ctrl-C: stopped waiting, the run goes on
TRANSIENT_POLL_ERRORS = 3  # consecutive failed polls tolerated (a port-forward that blinks) before giving up
CRON_FIX = ("KFP reads 6 fields, seconds first: SECOND MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK, e.g. "
            "--schedule '0 0 2 * * *' for 02:00 every day (a 5-field crontab line gets '0 ' in front)")
# (field, lowest, highest) of KFP's 6-field cron.
CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
               ("month", 1, 12), ("day of week", 0, 6))
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_ITEM = re.compile(r"^(?P<range>\*|\?|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(?P<step>[0-9]+))?$")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


# -- schedule and wait settings --------------------------------------------------------------------------------
def check_follow_up(schedule: str, wait: bool, timeout: float | None, poll_interval: float) -> tuple[str, str]:
    """Judge ``--schedule`` / ``--wait`` / ``--timeout`` / ``--poll-interval`` before anything is compiled or sent;
    returns the 6-field cron ("" = no schedule) and a note for the user ("" = none)."""
    if schedule and wait:
        raise KubetuneError(
            "--schedule and --wait do not go together: a recurring run has no single run to wait for",
            "drop --wait and follow the scheduled runs in the Kubeflow UI, or drop --schedule to start one run "
            "and wait for it",
        )
    if timeout is not None and not wait:
        raise KubetuneError("a timeout was given without --wait, so there is no waiting for it to end",
                            "add --wait (notebooks: wait=True), or drop --timeout")
    if timeout is not None and timeout <= 0:
        raise KubetuneError(f"--timeout {timeout:g} is not a positive number of seconds", "pass e.g. --timeout 3600")
    if poll_interval <= 0:
        raise KubetuneError(f"--poll-interval {poll_interval:g} is not a positive number of seconds",
                            "pass e.g. --poll-interval 10")
    return normalize_cron(schedule) if schedule else ("", "")


def normalize_cron(expression: str) -> tuple[str, str]:
    """The 6-field cron KFP wants, and a note for the user when it differs from what was given ("" if not).

    Checked here, before anything is compiled or sent, so a typo is not found by the scheduler hours later.
    """
    text = " ".join(expression.split())
    if text in CRON_DESCRIPTORS or re.fullmatch(r"@every [0-9][0-9a-z.]*", text):
        return text, ""
    fields = text.split(" ") if text else []
    note = ""
    if len(fields) == 5:
        fields = ["0", *fields]
        note = f"schedule {text!r} read as {' '.join(fields)!r}: KFP's cron starts with a seconds field"
    if len(fields) != 6:
        count = f"{len(fields)} field{'' if len(fields) == 1 else 's'}"
        raise KubetuneError(f"--schedule {expression!r} has {count}; KFP's cron has 6", CRON_FIX)
    for value, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        problem = _cron_field_problem(value, name, low, high)
        if problem:
            raise KubetuneError(f"--schedule {expression!r}: the {name} field {value!r} {problem}", CRON_FIX)
    return " ".join(fields), note


def _cron_field_problem(value: str, name: str, low: int, high: int) -> str:
    """What is wrong with one cron field ("" when nothing is)."""
    names, first = (MONTHS, 1) if name == "month" else (DAYS, 0) if name == "day of week" else ((), 0)
    for item in value.split(","):
        match = CRON_ITEM.match(item)
        if not match:
            return "is not a number, range, list, step or *"
        if match["range"] == "?" and not name.startswith("day"):
            return "cannot be ? (only the day fields can)"
        if match["step"] is not None and int(match["step"]) == 0:
            return "has a step of 0"
        bounds = () if match["range"] in ("*", "?") else match["range"].split("-")
        for bound in bounds:
            number = int(bound) if bound.isdigit() else \
                names.index(bound.upper()) + first if bound.upper() in names else None
            if number is None or not low <= number <= high:
                return f"is out of range ({low}-{high}{', or names like ' + names[0] if names else ''})"
    return ""


# -- pipeline version ------------------------------------------------------------------------------------------
def version_name(run_name: str = "", now: datetime.datetime | None = None) -> str:
    """A pipeline version name that is unique per submission and readable in the UI's version list."""
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9.]+", "-", run_name.lower()).strip("-.")[:60]
    return f"{slug or 'kubetune'}-{__version__}-{stamp}"


def find_pipeline(client: kfp.Client, name: str, namespace: str = "") -> str | None:
    """The id of the pipeline called ``name``, or None."""
    if not namespace:
        return client.get_pipeline_id(name)
    # get_pipeline_id lists the shared pipelines only; a profile's own pipelines are listed by its namespace.
    name_filter = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=name_filter, namespace=namespace).pipelines or []
    return found[0].pipeline_id if found else None


def upload_version(client: kfp.Client, package: str, pipeline_name: str, version: str,
                   namespace: str = "") -> tuple[str, str]:
    """Upload ``package`` as a new version of the pipeline ``pipeline_name`` (created when missing), so every
    submission stays in the UI as a version that can be re-run or compared. Returns (pipeline id, version id)."""
    description = f"compiled by kubetune {__version__}"
    try:
        pipeline_id = find_pipeline(client, pipeline_name, namespace)
    except ValueError as error:  # kfp: several pipelines carry that name
        raise KubetuneError(str(error), "pass --pipeline-name with a name no other pipeline has") from None
    if pipeline_id is not None:
        uploaded = client.upload_pipeline_version(package, version, pipeline_id=pipeline_id, description=description)
        return pipeline_id, uploaded.pipeline_version_id
    pipeline = client.upload_pipeline(package, pipeline_name=pipeline_name, description=description,
                                      namespace=namespace or None)
    # A new pipeline holds the package as its first version: run that one rather than upload it twice.
    versions = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1,
                                             sort_by="created_at desc").pipeline_versions or []
    if not versions:
        raise KubetuneError(f"pipeline {pipeline_name!r} ({pipeline.pipeline_id}) was created without a version",
                            "check the pipeline in the Kubeflow UI, then submit again")
    return pipeline.pipeline_id, versions[0].pipeline_version_id


# -- waiting ---------------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    """How waiting for a run ended: ``wait`` is "finished", "timed_out" or "interrupted"; ``state`` is the last
    state the server reported."""

    state: str
    wait: str = "finished"
    failed_tasks: list[dict[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.wait == "timed_out":
            return EXIT_TIMEOUT
        if self.wait == "interrupted":
            return EXIT_INTERRUPTED
        return 0 if self.state == "SUCCEEDED" else EXIT_FAILED

    def as_dict(self) -> dict[str, Any]:
        found = {"state": self.state, "wait": self.wait}
        if self.failed_tasks:
            found["failed_tasks"] = self.failed_tasks
        return found


def wait_for_run(client: kfp.Client, run_id: str, *, timeout: float | None = None, interval: float = 10.0,
                 out: TextIO | None = None) -> RunOutcome:
    """Poll the run every ``interval`` seconds until it reaches a final state, ``timeout`` seconds pass, or
    Ctrl-C; print one line to ``out`` (default stderr) per change of the run's or a task's state.

    Stopping early never touches the run: it keeps going on the cluster. Errors the server keeps answering with
    (or that are not transient) are raised as the client raised them.
    """
    out = out or sys.stderr
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[tuple[str, str], str] = {}
    state, failures = "", 0
    print(f"waiting for run {run_id} (Ctrl-C stops waiting; the run keeps going)", file=out, flush=True)
    try:
        while True:
            try:
                run = client.get_run(run_id)
                failures = 0
            except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                failures += 1
                if not _transient(error) or failures >= TRANSIENT_POLL_ERRORS:
                    raise
                run = None
            if run is not None:
                state = _report(run, seen, out)
                if state in FINAL_STATES:
                    return _finished(run, state, out)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                print(f"stopped waiting after {timeout:g} s: run {run_id} is {state or 'not reported yet'} and "
                      "keeps going", file=out, flush=True)
                return RunOutcome(state, "timed_out")
            time.sleep(interval if left is None else min(interval, left))
    except KeyboardInterrupt:
        print(f"stopped waiting (Ctrl-C): run {run_id} keeps going on the cluster", file=out, flush=True)
        return RunOutcome(state, "interrupted")


def _transient(error: Exception) -> bool:
    status = getattr(error, "status", 0) or 0
    return status == 0 or status >= 500


def _state(value: object) -> str:
    return str(value or "").upper()


def _tasks(run: kfp_server_api.V2beta1Run) -> list:
    return list(getattr(run.run_details, "task_details", None) or [])


def _report(run: kfp_server_api.V2beta1Run, seen: dict[tuple[str, str], str], out: TextIO) -> str:
    """Print each task's and then the run's state when it changed since the last poll; return the run's state.
    A final run state is left to :func:`_finished`, which says it once with the failures."""
    state = _state(run.state)
    changes = [(("task", task.task_id or task.display_name or ""), task.display_name or task.task_id or "task",
                _state(task.state)) for task in _tasks(run)]
    if state not in FINAL_STATES:
        changes.append((("run", ""), "run", state))
    for key, name, now in changes:
        if now and seen.get(key) != now:
            seen[key] = now
            print(f"{name}: {now}", file=out, flush=True)
    return state


def _finished(run: kfp_server_api.V2beta1Run, state: str, out: TextIO) -> RunOutcome:
    failed = [{"task": task.display_name or task.task_id or "",
               "error": getattr(task.error, "message", "") or ""}
              for task in _tasks(run) if _state(task.state) == "FAILED"]
    print(f"run {run.run_id} finished: {state}", file=out, flush=True)
    for task in failed:
        print(f"  task {task['task']} failed{': ' + task['error'] if task['error'] else ''}", file=out, flush=True)
    message = getattr(run.error, "message", "") or ""
    if state != "SUCCEEDED" and message:
        print(f"  {message}", file=out, flush=True)
    return RunOutcome(state, "finished", failed)
