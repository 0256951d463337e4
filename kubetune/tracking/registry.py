"""The MLflow Model Registry: register a run's adapter as a model version, and download a version back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.errors import KubetuneError
from kubetune.secrets import redact
from kubetune.tracking.names import (
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    clean_key,
    registered_model_name,
)

if TYPE_CHECKING:
    from kubetune.tracking.run import Tracker


class Registry:
    """The registry half of :class:`~kubetune.tracking.Tracker` (a mixin)."""

    def register_model(self: Tracker, name: str, artifact_path: str, *, tags: Mapping[str, Any] | None = None,
                       description: str = "") -> None:
        """Register this run's ``artifact_path`` as a new version of registered model ``name`` (created when
        missing). A retried step reuses the version it registered before. The result lands in
        :attr:`registered` (``name``, ``version``) and in the run's tags once delivered."""
        name = registered_model_name(name)
        clean_tags = {clean_key(k): self._tag_value(v) for k, v in (tags or {}).items() if v not in ("", None)}
        clean_description = self._redact(description)

        def register() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(
                    name, description=f"LoRA adapters trained by kubetune (experiment {self.experiment}).")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
            if existing:
                version = max(existing, key=lambda v: int(v.version))
            else:
                source = f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
                version = self.client.create_model_version(
                    name, source, self.run_id, tags=clean_tags, description=clean_description,
                    await_creation_for=0,
                )
            self.registered = {"name": name, "version": str(version.version)}
            self.client.set_tag(self.run_id, REGISTERED_MODEL_TAG, name)
            self.client.set_tag(self.run_id, REGISTERED_VERSION_TAG, str(version.version))

        self._send("register model", register)


def download_adapter(tracking_uri: str, name: str, version: str | int | None = None, alias: str | None = None,
                     dst_path: str | None = None) -> str:
    """Download a registered adapter version (by ``version``, by ``alias`` such as ``champion``, else the latest)
    and return its local directory, ready for ``PeftModel.from_pretrained(base_model, directory)``.

    The version's tags name the base model (``kubetune.base_model``, ``kubetune.base_model_revision``) and its
    quantization; load that base model (4-bit or not) before attaching the adapter.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if version not in (None, "") and alias:
        raise KubetuneError("download_adapter got both a version and an alias", "pass one of them")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias:
            model_version = client.get_model_version_by_alias(name, alias)
        elif version not in (None, ""):
            model_version = client.get_model_version(name, str(version))
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise KubetuneError(f"registered model {name!r} has no versions in {redact(tracking_uri)}",
                                    "run the pipeline (it registers the adapter) or check the model name")
            model_version = max(versions, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise KubetuneError(
            f"no adapter {name!r} {f'@{alias}' if alias else f'version {version}' if version else ''} in "
            f"{redact(tracking_uri)}: {str(exc)[:200]}",
            "list versions with MlflowClient().search_model_versions(\"name = '<name>'\") or check the alias",
        ) from exc
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_version.source, dst_path=dst_path,
                                                tracking_uri=tracking_uri)
    if not (Path(local) / "adapter_config.json").is_file():
        raise KubetuneError(f"{name} version {model_version.version} at {model_version.source} is not a PEFT "
                            "adapter (no adapter_config.json)", "register the adapter directory the SFT step wrote")
    return local
