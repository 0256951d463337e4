"""``kubetune argo``: write (and submit) the pipeline as a plain Argo Workflow."""

from __future__ import annotations

import argparse
import os
import sys

from kubetune.cli.options import (
    SECRET_OPTIONS,
    TRACKING_OPTIONS,
    add_option_flags,
    add_placement_flags,
    placement_options,
)
from kubetune.cli.params import parse_params
from kubetune.errors import KubetuneError
from kubetune.pipelines.argo import (
    DEFAULT_NAMESPACE,
    DEFAULT_PVC_SIZE,
    ArgoOptions,
    build_workflow,
    write_workflow,
)
from kubetune.pipelines.argo_server import server_url, submit_workflow


def cmd_argo(args: argparse.Namespace) -> int:
    argo = ArgoOptions(pvc=args.pvc, pvc_size=args.pvc_size, storage_class=args.storage_class,
                       access_mode=args.pvc_access_mode, service_account=args.service_account,
                       artifacts=args.artifacts, active_deadline_seconds=args.active_deadline_seconds)
    argo.validate()
    host = server_url(args.host or os.environ.get("ARGO_SERVER", ""))
    if args.submit and not host:
        raise KubetuneError("--submit needs the Argo Server address",
                            "pass --host https://argo.example.com:2746 or set ARGO_SERVER")
    options, params = placement_options(args), parse_params(args.param)
    workflow = build_workflow(options, argo, params)
    print(options.tracking_plan(params), file=sys.stderr)
    if args.output:
        print(write_workflow(workflow, args.output), file=sys.stderr if args.submit else sys.stdout)
    if not argo.pvc:
        print("note: the volume created for the run is deleted when the workflow succeeds; adapter and report then "
              "live in MLflow (set mlflow_tracking_uri or the MLflow secret to a tracking server)"
              + ("" if argo.artifacts else "; add --artifacts or --pvc NAME to keep them in the cluster too"),
              file=sys.stderr)
    if args.submit:
        insecure = args.insecure_skip_verify or os.environ.get("ARGO_INSECURE_SKIP_VERIFY", "").lower() == "true"
        namespace = args.namespace or os.environ.get("ARGO_NAMESPACE", "") or DEFAULT_NAMESPACE
        name, link = submit_workflow(workflow, host, args.token or os.environ.get("ARGO_TOKEN", ""), namespace,
                                     verify_ssl=not insecure)
        print(f"workflow: {name}")
        print(f"ui:       {link}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``argo`` on a subparsers object."""
    parser = sub.add_parser("argo", help="write (and submit) the pipeline as a plain Argo Workflow",
                            description="The fine-tuning pipeline as a plain Argo Workflow, for clusters that run "
                            "Argo without Kubeflow.")
    parser.add_argument("-o", "--output", default="kubetune-local/kubetune-workflow.yaml",
                        help="manifest file to write ('' = none; default: %(default)s)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter: the default of the workflow argument of that name")
    add_placement_flags(parser)
    volume = parser.add_argument_group("volume (mounted at /workspace in every step)")
    volume.add_argument("--pvc", default="", metavar="NAME", help="existing PersistentVolumeClaim to use")
    volume.add_argument("--pvc-size", default="", help=f"size of the claim created per workflow ({DEFAULT_PVC_SIZE})")
    volume.add_argument("--storage-class", default="", help="storage class of the created claim")
    volume.add_argument("--pvc-access-mode", default="ReadWriteOnce", choices=("ReadWriteOnce", "ReadWriteMany"))
    run = parser.add_argument_group("run")
    add_option_flags(run, TRACKING_OPTIONS + SECRET_OPTIONS)
    run.add_argument("--service-account", default="", help="service account the step pods run as")
    run.add_argument("--artifacts", action="store_true",
                     help="also save adapter, report and metrics to the cluster's artifact repository")
    run.add_argument("--active-deadline-seconds", type=int, default=0,
                     help="deadline of the whole workflow (default: from the profile's step timeouts)")
    submit = parser.add_argument_group("submit (Argo Server)")
    submit.add_argument("--submit", action="store_true", help="create the workflow through the Argo Server")
    submit.add_argument("--host", default="", help="Argo Server URL (default: ARGO_SERVER)")
    submit.add_argument("--token", default="", help="bearer token (default: ARGO_TOKEN)")
    submit.add_argument("--namespace", default="", help=f"namespace (default: ARGO_NAMESPACE, else {DEFAULT_NAMESPACE})")
    submit.add_argument("--insecure-skip-verify", action="store_true", help="skip TLS verification")
    parser.set_defaults(func=cmd_argo)
