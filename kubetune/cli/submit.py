"""``kubetune submit``: compile the pipeline and start a run on Kubeflow Pipelines through ``kfp.Client``.

:func:`submit_pipeline` is the one implementation; the CLI (:func:`add_parser`) and the submission notebook call
it. Where things come from, first match wins:

- host: the ``host`` argument (``--host``), ``KUBETUNE_KFP_HOST``, ``KF_PIPELINES_ENDPOINT``, and inside a
  cluster pod the in-cluster API service;
- bearer token (never a flag, so it stays out of shell history): the ``token`` argument (notebooks),
  ``KUBETUNE_KFP_TOKEN``, ``KF_PIPELINES_TOKEN``, then the projected service-account token that Kubeflow mounts
  in notebook pods (``/var/run/secrets/kubeflow/pipelines/token``, or ``KF_PIPELINES_SA_TOKEN_PATH``).

Like the rest of the command, this module sits above the core and the pipelines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3
import yaml

from kubetune.cli.options import add_cluster_flags, add_placement_flags, placement_options
from kubetune.cli.params import parse_params
from kubetune.errors import KubetuneError
from kubetune.parameters import validate_parameters
from kubetune.pipelines import PipelineOptions, compile_pipeline

HOST_ENVS = ("KUBETUNE_KFP_HOST", "KF_PIPELINES_ENDPOINT")
TOKEN_ENVS = ("KUBETUNE_KFP_TOKEN", "KF_PIPELINES_TOKEN")
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
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


def resolve_token(token: str | None = None, env: dict[str, str] | None = None) -> str:
    """A bearer token from the argument, the environment or the in-pod service-account token file ("" = none)."""
    env = os.environ if env is None else env
    if token:
        return token.strip()
    for name in TOKEN_ENVS:
        if env.get(name, "").strip():
            return env[name].strip()
    path = Path(env.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def run_url(ui_host: str, run_id: str) -> str:
    return f"{ui_host.rstrip('/')}/#/runs/details/{run_id}"


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
        f"Kubeflow Pipelines at {host} refused the run: {status} {getattr(error, 'reason', '')} {body[:500]}".strip(),
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
) -> dict[str, str]:
    """Compile the pipeline with ``options`` (a PipelineOptions; default placement when None) and start a run.

    ``params`` are pipeline parameters by name (typed values). ``namespace`` is the Kubeflow profile namespace of
    a multi-user deployment (default: the pod's own namespace when run in a cluster). Returns
    ``{"run_id", "url", "experiment_id"}``; ``url`` is the run's page in the Kubeflow UI. Raises
    :class:`KubetuneError` for an unreachable host, a missing or rejected token, unknown parameters, a missing
    namespace, or a run the server refuses.
    """
    params = dict(params or {})
    validate_parameters(params)  # every setting checked here, not minutes into the run on the cluster
    host = resolve_host(host)
    token = resolve_token(token)
    options = options if options is not None else PipelineOptions()
    with tempfile.TemporaryDirectory(prefix="kubetune-submit-") as tmp:
        package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), options)
        _check_params(package, params)
        health = check_connection(host, token)
        if health.get("multi_user") and not namespace:
            namespace = _pod_namespace()
            if not namespace:
                raise KubetuneError(
                    f"Kubeflow Pipelines at {host} is multi-user, and no namespace was given",
                    "pass --namespace <your Kubeflow profile namespace> (notebooks: namespace=...)",
                )
        return _create_run(host, token, package, params, experiment or DEFAULT_EXPERIMENT, run_name, namespace)


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


def _create_run(host: str, token: str, package: str, params: dict[str, Any], experiment: str, run_name: str,
                namespace: str) -> dict[str, str]:
    ui_host = os.environ.get(UI_HOST_ENV, "").strip() or host
    # kfp.Client prints its own links on stdout; keep stdout for our one JSON line.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            client = kfp.Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow",
                                ui_host=ui_host)
            result = client.create_run_from_pipeline_package(
                package, arguments=params, run_name=run_name or None, experiment_name=experiment,
                namespace=namespace or None,
            )
        except kfp_server_api.ApiException as error:
            raise _api_error(host, error, token) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _unreachable(host, error) from None
    run_id = result.run_id
    experiment_id = getattr(result.run_info, "experiment_id", "") or ""
    return {"run_id": run_id, "url": run_url(ui_host, run_id), "experiment_id": experiment_id}


# -- command line ---------------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    options, params = placement_options(args), parse_params(args.param)
    print(options.tracking_plan(params), file=sys.stderr)
    result = submit_pipeline(
        args.host, params, experiment=args.experiment, run_name=args.run_name, options=options,
        namespace=args.namespace,
    )
    print(f"run details: {result['url']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def add_parser(sub) -> None:
    """Register ``kubetune submit`` on the CLI's subparsers object."""
    submit = sub.add_parser(
        "submit", help="compile the pipeline and start a run on Kubeflow Pipelines",
        description="Compile (same placement flags as `compile`) and start a run through kfp.Client. The bearer "
        f"token comes from {' / '.join(TOKEN_ENVS)} or the in-pod token file {SA_TOKEN_PATH}.",
    )
    submit.add_argument("--host", default="",
                        help=f"KFP API URL (default: {' / '.join(HOST_ENVS)}; in a pod, the in-cluster service)")
    submit.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="KFP experiment (created when missing)")
    submit.add_argument("--run-name", default="", help="run name shown in the Kubeflow UI")
    submit.add_argument("--namespace", default="", help="profile namespace (multi-user Kubeflow)")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    add_placement_flags(submit)
    add_cluster_flags(submit)
    submit.set_defaults(func=cmd_submit)
