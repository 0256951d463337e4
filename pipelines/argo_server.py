"""Submitting the plain Argo Workflow (:mod:`kubetune.pipelines.argo`) through the Argo Server's API (Hera)."""

from __future__ import annotations

import os

from kubetune.pipelines.argo import DEFAULT_NAMESPACE

from kubetune.errors import KubetuneError


def server_url(host: str, environ: dict[str, str] | None = None) -> str:
    """``https://host:2746`` from a URL or from ``host:port`` as the argo CLI's ARGO_SERVER holds it."""
    environ = os.environ if environ is None else environ
    host = host.strip().rstrip("/")
    if host and "://" not in host:
        secure = environ.get("ARGO_SECURE", "true").strip().lower() not in {"false", "0", "no"}
        host = ("https://" if secure else "http://") + host
    return host


def submit_workflow(workflow, host: str, token: str = "", namespace: str = DEFAULT_NAMESPACE, *,
                    verify_ssl: bool = True, timeout_s: float = 30.0) -> tuple[str, str]:
    """Create the workflow through the Argo Server. Returns (workflow name, UI link)."""
    import requests
    from hera.exceptions import Forbidden, HeraException, NotFound, Unauthorized
    from hera.workflows import WorkflowsService
    from hera.workflows.models import WorkflowCreateRequest

    class _Session(requests.Session):  # Hera sets no timeout: a silent host would hang the command
        def request(self, method, url, **kwargs):
            kwargs.setdefault("timeout", timeout_s)
            return super().request(method, url, **kwargs)

    if not host.startswith(("http://", "https://")):
        raise KubetuneError(f"Argo Server address {host!r} has no http:// or https://",
                            "pass --host https://argo.example.com:2746 or set ARGO_SERVER")
    service = WorkflowsService(host=host, token=token or None, namespace=namespace, verify_ssl=verify_ssl,
                               session=_Session())
    fix_token = "pass a valid --token or ARGO_TOKEN (e.g. `argo auth token`, or a service account token)"
    try:
        with service:
            created = service.create_workflow(WorkflowCreateRequest(workflow=workflow.build()), namespace=namespace)
    except Unauthorized as exc:
        raise KubetuneError(f"the Argo Server at {host} rejected the credentials (401 Unauthorized)",
                            fix_token) from exc
    except Forbidden as exc:
        raise KubetuneError(f"the Argo Server at {host} refused to create workflows in namespace {namespace} "
                            "(403 Forbidden)",
                            f"use a token whose service account may create workflows in {namespace}, or another "
                            "--namespace") from exc
    except NotFound as exc:
        raise KubetuneError(f"{host} has no Argo Server API for namespace {namespace} (404): {exc}",
                            "check --host (the Argo Server URL, e.g. https://argo.example.com:2746) and "
                            "--namespace") from exc
    except HeraException as exc:
        raise KubetuneError(f"the Argo Server at {host} did not create the workflow: {exc}",
                            "read the server's message above; `kubetune argo -o FILE` writes the manifest to "
                            "check with `argo lint FILE`") from exc
    except requests.exceptions.SSLError as exc:
        raise KubetuneError(f"TLS verification failed for {host}: {exc}",
                            "use the server's https URL with a trusted certificate, or --insecure-skip-verify "
                            "for a test server") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise KubetuneError(f"cannot reach the Argo Server at {host}: {type(exc).__name__}",
                            "check --host / ARGO_SERVER (scheme, host and port, e.g. https://localhost:2746 with "
                            "`kubectl -n argo port-forward svc/argo-server 2746:2746`)") from exc
    except (KeyError, ValueError) as exc:  # an error answer that is not the Argo Server's JSON
        raise KubetuneError(f"{host} answered with something other than the Argo Server API ({exc!r})",
                            "check that --host points at the Argo Server") from exc
    name = created.metadata.name or ""
    return name, f"{host}/workflows/{namespace}/{name}"


