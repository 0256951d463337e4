"""``kubetune submit``: compile the pipeline, upload it to Kubeflow Pipelines as a new version of a pipeline,
and start a run of that version (or, with ``--schedule``, a recurring run), optionally waiting for it to end.

:func:`submit_pipeline` is the one implementation; the CLI (:func:`add_parser`) and the submission notebook call
it. Where things come from, first match wins:

- host: the ``host`` argument (``--host``), ``KUBETUNE_KFP_HOST``, ``KF_PIPELINES_ENDPOINT``, and inside a
  cluster pod the in-cluster API service;
- credentials (never a flag, so a token stays out of shell history): the ``token`` argument (notebooks),
  ``KUBETUNE_KFP_TOKEN``, ``KF_PIPELINES_TOKEN``, then the projected service-account token that Kubeflow mounts
  in notebook pods (``/var/run/secrets/kubeflow/pipelines/token``, or ``KF_PIPELINES_SA_TOKEN_PATH``), used
  through kfp's ``ServiceAccountTokenVolumeCredentials`` so the client re-reads it as the kubelet rotates it.

The calls made with the connected client (upload, run, schedule, wait) are in :mod:`kubetune.cli.kfp_run`.
Like the rest of the command, this module sits above the core and the pipelines.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3
import yaml
from kfp.client import (
    KF_PIPELINES_SA_TOKEN_ENV,
    KF_PIPELINES_SA_TOKEN_PATH,
    ServiceAccountTokenVolumeCredentials,
    TokenCredentialsBase,
)

from kubetune.cli.kfp_run import (
    DEFAULT_PIPELINE,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    RunOutcome,
    check_follow_up,
    upload_version,
    version_name,
    wait_for_run,
)
from kubetune.cli.options import add_cluster_flags, add_placement_flags, placement_options
from kubetune.cli.params import parse_params
from kubetune.errors import KubetuneError
from kubetune.parameters import validate_parameters
from kubetune.pipelines import PipelineOptions, compile_pipeline

HOST_ENVS = ("KUBETUNE_KFP_HOST", "KF_PIPELINES_ENDPOINT")
TOKEN_ENVS = ("KUBETUNE_KFP_TOKEN", "KF_PIPELINES_TOKEN")
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"
SA_TOKEN_PATH_ENV = KF_PIPELINES_SA_TOKEN_ENV  # kfp's own names for the in-pod service-account token
SA_TOKEN_PATH = KF_PIPELINES_SA_TOKEN_PATH
POD_NAMESPACE_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
DEFAULT_EXPERIMENT = "kubetune"
HEALTHZ = "/apis/v2beta1/healthz"
PORT_FORWARD = "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80"
TOKEN_FIX = (
    "set KF_PIPELINES_TOKEN (or KUBETUNE_KFP_TOKEN) to a bearer token the cluster accepts, e.g. "
    "KF_PIPELINES_TOKEN=$(kubectl create token default-editor -n <your-namespace> --audience pipelines.kubeflow.org); "
    f"in a Kubeflow notebook pod the token at {SA_TOKEN_PATH} is used by itself"
)


# -- where to submit ---------------------------------------------------------------------------------------------
def resolve_host(host: str | None = None, env: dict[str, str] | None = None) -> str:
    """The KFP API endpoint: argument, else KUBETUNE_KFP_HOST / KF_PIPELINES_ENDPOINT, else in-cluster."""
    env = os.environ if env is None else env
    chosen = (host or "").strip() or next((env[name].strip() for name in HOST_ENVS if env.get(name, "").strip()), "")
    if not chosen:
        if env.get("KUBERNETES_SERVICE_HOST"):
            return IN_CLUSTER_HOST
        raise KubetuneError(
            "no Kubeflow Pipelines host given",
            f"pass --host URL or set KUBETUNE_KFP_HOST; from a laptop, `{PORT_FORWARD}` and use "
            "--host http://localhost:8080",
        )
    if "://" not in chosen:
        chosen = "https://" + chosen
    return chosen.rstrip("/")


@dataclass(frozen=True)
class Credentials:
    """How kfp.Client authenticates: a fixed bearer token, or kfp's own service-account token credentials.

    ``token`` is what the connection check sends (for the service account, the token the client reads now);
    it is left out of the repr so it cannot end up in a log.
    """

    token: str = field(default="", repr=False)
    service_account: TokenCredentialsBase | None = None

    def client_kwargs(self) -> dict[str, Any]:
        if self.service_account is not None:
            return {"credentials": self.service_account}
        return {"existing_token": self.token or None}


def credentials_token(credentials: TokenCredentialsBase) -> str:
    """The bearer token kfp.Client sends with ``credentials``, read through their own refresh hook."""
    config = kfp_server_api.Configuration()
    credentials.refresh_api_key_hook(config)
    return str(config.api_key.get("authorization") or "").strip()


def resolve_credentials(token: str | None = None, env: dict[str, str] | None = None) -> Credentials:
    """The argument's or the environment's token, else the in-pod service-account token (empty: none)."""
    env = os.environ if env is None else env
    explicit = (token or "").strip() or next(
        (env[name].strip() for name in TOKEN_ENVS if env.get(name, "").strip()), "")
    if explicit:
        return Credentials(explicit)
    path = env.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    if not os.path.isfile(path):  # looked at first: kfp logs an error for a token file it cannot read
        return Credentials()
    service_account = ServiceAccountTokenVolumeCredentials(path)
    try:
        found = credentials_token(service_account)
    except OSError:
        return Credentials()
    return Credentials(found, service_account) if found else Credentials()


def resolve_token(token: str | None = None, env: dict[str, str] | None = None) -> str:
    """The bearer token :func:`resolve_credentials` finds ("" = none)."""
    return resolve_credentials(token, env).token


def run_url(ui_host: str, run_id: str) -> str:
    return f"{ui_host.rstrip('/')}/#/runs/details/{run_id}"


def recurring_run_url(ui_host: str, recurring_run_id: str) -> str:
    return f"{ui_host.rstrip('/')}/#/recurringrun/details/{recurring_run_id}"


# -- errors users can act on -------------------------------------------------------------------------------------
def _unreachable(host: str, reason: object) -> KubetuneError:
    return KubetuneError(
        f"cannot reach Kubeflow Pipelines at {host} ({reason})",
        f"check the host and that the KFP API answers at {host}{HEALTHZ}; from outside the cluster, "
        f"`{PORT_FORWARD}` and pass --host http://localhost:8080",
    )


def _auth_error(host: str, status: int, token: str) -> KubetuneError:
    sent = "the bearer token was rejected (expired, or the wrong audience or namespace)" if token else \
        "no bearer token was sent"
    return KubetuneError(f"Kubeflow Pipelines at {host} answered {status} {'Unauthorized' if status == 401 else 'Forbidden'}: {sent}", TOKEN_FIX)


def _api_error(host: str, error: Exception, token: str) -> KubetuneError:
    status = getattr(error, "status", 0) or 0
    if status in (401, 403):
        return _auth_error(host, status, token)
    if status == 0:
        return _unreachable(host, getattr(error, "reason", error))
    body = (getattr(error, "body", "") or "")
    body = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return KubetuneError(
        f"Kubeflow Pipelines at {host} refused the request: {status} {getattr(error, 'reason', '')} "
        f"{body[:500]}".strip(),
        "read the server's message above; parameter names and types must match `kubetune compile` output",
    )


def check_connection(host: str, token: str = "", timeout_s: float = 15.0) -> dict[str, Any]:
    """GET the KFP healthz endpoint once, so a wrong host or token fails fast with a clear message (kfp.Client
    itself retries healthz for half a minute and then raises a bare TimeoutError)."""
    request = urllib.request.Request(host + HEALTHZ, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise _auth_error(host, error.code, token) from None
        if error.code == 404:
            raise KubetuneError(
                f"no Kubeflow Pipelines API at {host} ({HEALTHZ} answered 404)",
                "point --host at the KFP API: http://localhost:8080 after port-forwarding, or "
                "https://<kubeflow-host>/pipeline behind the Kubeflow gateway",
            ) from None
        raise _unreachable(host, f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise _unreachable(host, getattr(error, "reason", error)) from None
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise KubetuneError(
            f"{host}{HEALTHZ} answered with a page, not the KFP API (a login page?)",
            f"authenticate with a bearer token: {TOKEN_FIX}",
        ) from None


# -- submit ------------------------------------------------------------------------------------------------------
def submit_pipeline(
    host: str | None,
    params: dict[str, Any] | None = None,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str = "",
    token: str | None = None,
    options=None,
    namespace: str = "",
    pipeline_name: str = DEFAULT_PIPELINE,
    schedule: str = "",
    wait: bool = False,
    timeout: float | None = None,
    poll_interval: float = 10.0,
) -> dict[str, Any]:
    """Compile the pipeline with ``options`` (a PipelineOptions; default placement when None), upload it as a new
    version of the pipeline ``pipeline_name`` (created when missing) and start a run of that version.

    ``params`` are pipeline parameters by name (typed values). ``namespace`` is the Kubeflow profile namespace of
    a multi-user deployment (default: the pod's own namespace when run in a cluster). Returns
    ``{"run_id", "url", "experiment_id", "pipeline_id", "pipeline_version_id"}``; ``url`` is the run's page in
    the Kubeflow UI. With ``schedule`` (cron, 6 fields with seconds first) a recurring run is created instead:
    ``recurring_run_id`` replaces ``run_id`` and ``schedule`` is added. With ``wait`` the run is polled every
    ``poll_interval`` seconds until it ends, ``timeout`` seconds pass or Ctrl-C is pressed, state changes are
    printed to stderr, and :class:`~kubetune.cli.kfp_run.RunOutcome`'s ``state``, ``wait`` and ``failed_tasks``
    are added. Raises :class:`KubetuneError` for an unreachable host, a missing or rejected token, unknown
    parameters, a malformed schedule, a missing namespace, or a request the server refuses.
    """
    params = dict(params or {})
    validate_parameters(params)  # every setting checked here, not minutes into the run on the cluster
    if not pipeline_name.strip():
        raise KubetuneError("the pipeline name is empty", f"pass --pipeline-name NAME (default {DEFAULT_PIPELINE})")
    cron, note = check_follow_up(schedule, wait, timeout, poll_interval)
    host = resolve_host(host)
    credentials = resolve_credentials(token)
    options = options if options is not None else PipelineOptions()
    ui_host = os.environ.get(UI_HOST_ENV, "").strip() or host
    with tempfile.TemporaryDirectory(prefix="kubetune-submit-") as tmp:
        package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), options)
        _check_params(package, params)
        health = check_connection(host, credentials.token)
        namespace = _namespace(host, health, namespace)
        if note:
            print(note, file=sys.stderr)
        with _kfp_errors(host, credentials.token):
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", ui_host=ui_host,
                                **credentials.client_kwargs())
            submitted = _start(client, package, params, experiment=experiment or DEFAULT_EXPERIMENT,
                               run_name=run_name, namespace=namespace, pipeline_name=pipeline_name, cron=cron,
                               ui_host=ui_host)
    if wait:
        submitted.update(_wait(client, submitted, host, credentials.token, timeout, poll_interval).as_dict())
    return submitted


def _namespace(host: str, health: dict[str, Any], namespace: str) -> str:
    if health.get("multi_user") and not namespace:
        namespace = _pod_namespace()
        if not namespace:
            raise KubetuneError(
                f"Kubeflow Pipelines at {host} is multi-user, and no namespace was given",
                "pass --namespace <your Kubeflow profile namespace> (notebooks: namespace=...)",
            )
    return namespace


def _pod_namespace() -> str:
    try:
        return Path(POD_NAMESPACE_PATH).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _check_params(package: str, params: dict[str, Any]) -> None:
    with open(package, encoding="utf-8") as handle:
        spec = next(yaml.safe_load_all(handle))
    declared = spec["root"]["inputDefinitions"]["parameters"]
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise KubetuneError(f"unknown pipeline parameters {unknown}", f"use names from: {', '.join(sorted(declared))}")


@contextlib.contextmanager
def _kfp_errors(host: str, token: str) -> Iterator[None]:
    """Keep stdout for our one JSON line (kfp.Client prints its links there) and turn the client's errors into
    one message with the fix."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            yield
        except kfp_server_api.ApiException as error:
            raise _api_error(host, error, token) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _unreachable(host, error) from None
        except ValueError as error:  # kfp's own checks, e.g. two experiments with the same name
            raise KubetuneError(f"kfp.Client: {error}",
                                "make the name unique in the Kubeflow UI, or pass another one") from None


def _start(client: kfp.Client, package: str, params: dict[str, Any], *, experiment: str, run_name: str,
           namespace: str, pipeline_name: str, cron: str, ui_host: str) -> dict[str, Any]:
    """The experiment, a new pipeline version, then a run (or a recurring run) of that version."""
    experiment_id = client.create_experiment(experiment, namespace=namespace or None).experiment_id
    pipeline_id, version_id = upload_version(client, package, pipeline_name, version_name(run_name), namespace)
    ids = {"experiment_id": experiment_id, "pipeline_id": pipeline_id, "pipeline_version_id": version_id}
    if cron:
        # One run at a time, and no backfill of the times missed while paused: each run is hours of GPU time.
        recurring = client.create_recurring_run(
            experiment_id, run_name or f"{pipeline_name} on schedule", cron_expression=cron, max_concurrency=1,
            no_catchup=True, params=params, pipeline_id=pipeline_id, version_id=version_id, enabled=True,
        )
        recurring_id = recurring.recurring_run_id
        return {"recurring_run_id": recurring_id, "url": recurring_run_url(ui_host, recurring_id), **ids,
                "schedule": cron}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = client.run_pipeline(experiment_id, run_name or f"{pipeline_name} {stamp}", params=params,
                              pipeline_id=pipeline_id, version_id=version_id)
    return {"run_id": run.run_id, "url": run_url(ui_host, run.run_id), **ids}


def _wait(client: kfp.Client, submitted: dict[str, Any], host: str, token: str, timeout: float | None,
          poll_interval: float) -> RunOutcome:
    print(f"run details: {submitted['url']}", file=sys.stderr, flush=True)
    try:
        with _kfp_errors(host, token):
            return wait_for_run(client, submitted["run_id"], timeout=timeout, interval=poll_interval)
    except KubetuneError as error:
        raise KubetuneError(f"stopped waiting for run {submitted['run_id']}, which keeps going: {error.problem}",
                            f"{error.fix}; the run's page: {submitted['url']}") from None


# -- command line ---------------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    options, params = placement_options(args), parse_params(args.param)
    print(options.tracking_plan(params), file=sys.stderr)
    result = submit_pipeline(
        args.host, params, experiment=args.experiment, run_name=args.run_name, options=options,
        namespace=args.namespace, pipeline_name=args.pipeline_name, schedule=args.schedule, wait=args.wait,
        timeout=args.timeout, poll_interval=args.poll_interval,
    )
    if "recurring_run_id" in result:
        print(f"recurring run ({result['schedule']}): {result['url']}", file=sys.stderr)
    elif "wait" not in result:
        print(f"run details: {result['url']}", file=sys.stderr)
    print(json.dumps(result))
    return RunOutcome(result["state"], result["wait"]).exit_code if "wait" in result else 0


def add_parser(sub) -> None:
    """Register ``kubetune submit`` on the CLI's subparsers object."""
    submit = sub.add_parser(
        "submit", help="compile the pipeline, upload it as a pipeline version and start a run on Kubeflow Pipelines",
        description="Compile (same placement flags as `compile`), upload the package as a new version of a KFP "
        "pipeline, and start a run of that version (or a recurring run with --schedule) through kfp.Client. "
        f"Credentials come from {' / '.join(TOKEN_ENVS)} or, in a Kubeflow notebook pod, the service-account "
        f"token at {SA_TOKEN_PATH}. stdout is one JSON line with the ids and the UI link.",
    )
    submit.add_argument("--host", default="",
                        help=f"KFP API URL (default: {' / '.join(HOST_ENVS)}; in a pod, the in-cluster service)")
    submit.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="KFP experiment (created when missing)")
    submit.add_argument("--run-name", default="", help="run name shown in the Kubeflow UI")
    submit.add_argument("--namespace", default="", help="profile namespace (multi-user Kubeflow)")
    submit.add_argument("--pipeline-name", default=DEFAULT_PIPELINE,
                        help="KFP pipeline the package is uploaded to as a new version (created when missing; "
                        "default: %(default)s)")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    follow = submit.add_argument_group("waiting and scheduling")
    follow.add_argument("--wait", action="store_true",
                        help="wait for the run to end, printing each state change to stderr; exit status 0 when it "
                        f"SUCCEEDED, 1 otherwise, {EXIT_TIMEOUT} on --timeout, {EXIT_INTERRUPTED} on Ctrl-C (the "
                        "run keeps going)")
    follow.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="with --wait: stop waiting after this long (the run keeps going)")
    follow.add_argument("--poll-interval", type=float, default=10.0, metavar="SECONDS",
                        help="with --wait: seconds between status requests (default: %(default)s)")
    follow.add_argument("--schedule", default="", metavar="CRON",
                        help="create a recurring run instead of one run; KFP cron has 6 fields, seconds first, e.g. "
                        "'0 0 2 * * *' for 02:00 daily (a 5-field crontab line gets '0 ' in front)")
    add_placement_flags(submit)
    add_cluster_flags(submit)
    submit.set_defaults(func=cmd_submit)
