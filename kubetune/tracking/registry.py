"""The adapter as an MLflow model: logged with MLflow's transformers flavor (the PEFT adapter and tokenizer only,
the base model referenced by path or hub id), a LoggedModel of the run carrying the evaluation metrics,
registered as a new version of ``<experiment>-adapter``; and a registered version downloaded back."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.errors import KubetuneError
from kubetune.secrets import redact, without_credentials
from kubetune.tracking.names import (
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    clean_key,
    registered_model_name,
)

if TYPE_CHECKING:
    from kubetune.tracking.run import Tracker

PEFT_DIR = "peft"  # where MLflow's transformers flavor keeps a PEFT adapter inside the model
_LOAD_HINT = (
    "LoRA adapter trained by kubetune on {base}. Load it with "
    "mlflow.transformers.load_model('models:/{name}@champion') (a text-generation pipeline), or the adapter "
    "alone with kubetune.tracking.download_adapter('{uri}', '{name}', alias='champion')."
)


class Registry:
    """The registry half of :class:`~kubetune.tracking.Tracker` (a mixin)."""

    def log_adapter_model(self: Tracker, model, tokenizer, *, base_model: str, base_path: str,
                          metrics: Mapping[str, float], name: str, tags: Mapping[str, Any] | None = None,
                          generation: Mapping[str, Any] | None = None) -> None:
        """Log ``model`` (a PeftModel) as this run's MLflow model ``tuned_model`` (a model named ``adapter`` would
        shadow the run's ``adapter/`` files): the adapter and tokenizer, with the base model referenced (``base_path``, a directory that loading needs too; else the hub id
        ``base_model``), ``metrics`` on the LoggedModel, and the model registered as a new version of ``name``
        (created when missing; a retried step reuses its version) with the run's ``kubetune.*`` tags (base model,
        quantization, data, LoRA settings) and ``tags``. ``mlflow.transformers.load_model`` of the version gives
        a text-generation pipeline. The result lands in :attr:`registered` (``name``, ``version``)."""
        name = registered_model_name(name)
        clean_tags = {clean_key(k): self._tag_value(v) for k, v in (tags or {}).items() if v not in ("", None)}

        def log() -> None:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.exceptions import MlflowException

            existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
            if existing:  # logged and registered by an earlier attempt
                version = max(existing, key=lambda v: int(v.version))
            else:
                # Model.log takes the global URIs; the LoggedModel is made first, in this run's experiment
                # (else MLflow files it under the active or default experiment).
                mlflow.set_tracking_uri(self.tracking_uri)
                mlflow.set_registry_uri(self.tracking_uri)
                run = self.client.get_run(self.run_id)
                lineage = {k: v for k, v in run.data.tags.items() if k.startswith("kubetune.")
                           and k not in (REGISTERED_MODEL_TAG, REGISTERED_VERSION_TAG)} | clean_tags
                logged = self.client.create_logged_model(run.info.experiment_id, name="tuned_model",
                                                         source_run_id=self.run_id, model_type="peft-lora",
                                                         tags=lineage)
                _point_at_base(model, tokenizer, base_model)
                mlflow.transformers.log_model(
                    transformers_model={"model": model, "tokenizer": tokenizer}, task="text-generation",
                    base_model_path=base_path or None, model_config=dict(generation or {}),
                    pip_requirements=["transformers", "peft", "torch", "accelerate", "bitsandbytes"],
                    model_id=logged.model_id, run_id=self.run_id,
                )
                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[
                    Metric(clean_key(f"eval.{key}"), float(value), now, 0, model_id=logged.model_id)
                    for key, value in metrics.items() if isinstance(value, (int, float)) and value == value
                ])
                try:
                    self.client.create_registered_model(
                        name, description=f"LoRA adapters trained by kubetune (experiment {self.experiment}).")
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                version = self.client.create_model_version(
                    name, f"models:/{logged.model_id}", self.run_id, tags=lineage,
                    description=self._redact(_LOAD_HINT.format(uri=without_credentials(self.tracking_uri),
                                                               name=name, base=base_model)),
                    await_creation_for=0, model_id=logged.model_id,
                )
            self.registered = {"name": name, "version": str(version.version)}
            self.client.set_tag(self.run_id, REGISTERED_MODEL_TAG, name)
            self.client.set_tag(self.run_id, REGISTERED_VERSION_TAG, str(version.version))

        self._send("log and register the adapter model", log)


def _point_at_base(model, tokenizer, base_model: str) -> None:
    """Make the adapter name its real base model (a hub id or a directory), not the 4-bit copy it was loaded from:
    MLflow records ``name_or_path``, and PEFT's adapter config keeps ``base_model_name_or_path``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.name_or_path = base_model
    inner.config._name_or_path = base_model
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = base_model
    tokenizer.name_or_path = base_model


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
    source = model_version.source
    if source.startswith("models:/"):  # a LoggedModel: its files, found through this server (not the global URI)
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst_path, tracking_uri=tracking_uri)
    if (Path(local) / PEFT_DIR / "adapter_config.json").is_file():  # an MLflow transformers model
        local = str(Path(local) / PEFT_DIR)
    if not (Path(local) / "adapter_config.json").is_file():
        raise KubetuneError(f"{name} version {model_version.version} at {model_version.source} is not a PEFT "
                            "adapter (no adapter_config.json)", "register the adapter directory the SFT step wrote")
    return local
