"""MLflow tracking: one run per pipeline run, shared by the steps, that survives a tracking-server outage.

Steps find the run by its MLflow run id (passed along in artifact metadata) or by the KFP run id tag, so a
retried step logs into the same run. Every call goes through the Tracker's queue: when the server is down, the
call is queued in memory and replayed by :meth:`Tracker.flush`; training never fails because MLflow did.
Secrets are redacted by name and by value before anything leaves the process: params, tags, metric names, texts,
tables, artifact files, registry tags and error messages.

The rooms: :mod:`~kubetune.tracking.store` (tracking URIs), :mod:`~kubetune.tracking.names` (tag names, keys,
params), :mod:`~kubetune.tracking.run` (:class:`Tracker`), :mod:`~kubetune.tracking.queue` (outage-tolerant
delivery), :mod:`~kubetune.tracking.artifacts` (redacted artifact files), :mod:`~kubetune.tracking.system_metrics`,
:mod:`~kubetune.tracking.registry` (model registration, :func:`download_adapter`) and
:mod:`~kubetune.tracking.settings` (:class:`Tracking`: where and under which names a step logs).

The adapter is registered in the MLflow Model Registry; load it back with::

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from kubetune.tracking import download_adapter

    base = AutoModelForCausalLM.from_pretrained(BASE_MODEL)   # the version's kubetune.base_model tag
    model = PeftModel.from_pretrained(base, download_adapter(TRACKING_URI, "kubetune-adapter", alias="champion"))
"""

from __future__ import annotations

from kubetune.tracking.names import (
    DATASET_HASH_TAG,
    DEFAULT_EXPERIMENT,
    KFP_RUN_ID_TAG,
    KFP_RUN_NAME_TAG,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    NO_REGISTRATION,
    PIPELINE_VERSION_TAG,
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    default_model_name,
    flatten_params,
    registered_model_name,
    truncate,
)
from kubetune.tracking.registry import download_adapter
from kubetune.tracking.run import Tracker
from kubetune.tracking.settings import Tracking
from kubetune.tracking.store import default_local_uri, in_cluster, resolve_tracking_uri
from kubetune.tracking.transfer import import_store, write_note

__all__ = [
    "DATASET_HASH_TAG",
    "DEFAULT_EXPERIMENT",
    "KFP_RUN_ID_TAG",
    "KFP_RUN_NAME_TAG",
    "MAX_PARAM_LENGTH",
    "MAX_TAG_LENGTH",
    "NO_REGISTRATION",
    "PIPELINE_VERSION_TAG",
    "REGISTERED_MODEL_TAG",
    "REGISTERED_VERSION_TAG",
    "Tracker",
    "Tracking",
    "default_local_uri",
    "default_model_name",
    "download_adapter",
    "flatten_params",
    "import_store",
    "in_cluster",
    "registered_model_name",
    "resolve_tracking_uri",
    "truncate",
    "write_note",
]
