"""Gated promotion: the rules on their own, then against a real MLflow server and registry (runs with
evaluation metrics and registered adapter versions), through ``kubetune promote``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kubetune.errors import KubetuneError
from kubetune.promotion import PromotionRule, decide

GOOD = {"base_eval_loss": 2.0, "tuned_eval_loss": 1.5, "base_chrf": 10.0, "tuned_chrf": 20.0}


def test_rules_tuned_must_beat_base_by_the_margin():
    assert decide(GOOD, PromotionRule()).promote
    held = decide(GOOD, PromotionRule(margin=0.6))
    assert not held.promote and "does not beat base" in held.reasons[0]
    assert decide(GOOD, PromotionRule(metric="chrf", margin=5)).promote  # higher is better for chrF
    assert not decide({**GOOD, "tuned_chrf": 9.0}, PromotionRule(metric="chrf")).promote
    with pytest.raises(KubetuneError, match="no base_bleu"):
        decide(GOOD, PromotionRule(metric="bleu"))


def test_rules_capability_and_champion():
    forgot = {**GOOD, "capability_delta": -0.05}
    decision = decide(forgot, PromotionRule())
    assert not decision.promote and "general ability fell by 0.050" in decision.summary()
    assert decide(forgot, PromotionRule(capability_tolerance=0.1)).promote
    assert not decide(GOOD, PromotionRule(), champion={"tuned_eval_loss": 1.4}).promote
    assert decide(GOOD, PromotionRule(), champion={"tuned_eval_loss": 1.6}).promote


def _evaluated_run(client, experiment_id: str, name: str, metrics: dict[str, float]) -> tuple[str, str]:
    """A run with evaluation metrics and an adapter file, registered as a new version of ``name``."""
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, f"eval.{key}", value)
    client.log_text(run_id, "{}", "adapter/adapter_config.json")
    client.set_terminated(run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/adapter", run_id=run_id)
    return run_id, str(version.version)


def _promote(uri: str, run_id: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "kubetune.cli", "promote", run_id, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_promote_moves_the_alias_only_when_the_rules_hold(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("promotion")
    name = "promotion-adapter"
    first, first_version = _evaluated_run(client, experiment_id, name, GOOD)
    done = _promote(mlflow_server.uri, first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "promoted" in done.stdout and "no current champion" in done.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == first_version

    # better than its base, worse than the champion: held back, the alias stays, the reasons are on the run
    worse, _ = _evaluated_run(client, experiment_id, name, {**GOOD, "tuned_eval_loss": 1.8})
    done = _promote(mlflow_server.uri, worse)
    assert done.returncode == 3 and "does not beat the current champion" in done.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == first_version
    tags = client.get_run(worse).data.tags
    assert tags["kubetune.promotion"] == "held back" and "current champion" in tags["kubetune.promotion_reasons"]

    # better than the champion but forgot general knowledge: held back too
    forgot, _ = _evaluated_run(client, experiment_id, name, {**GOOD, "tuned_eval_loss": 1.2,
                                                             "capability_delta": -0.2})
    assert _promote(mlflow_server.uri, forgot).returncode == 3
    # better on every rule: promoted, the alias moves
    best, best_version = _evaluated_run(client, experiment_id, name, {**GOOD, "tuned_eval_loss": 1.2,
                                                                      "capability_delta": 0.0})
    assert _promote(mlflow_server.uri, best).returncode == 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == best_version
    assert client.get_run(best).data.tags["kubetune.promotion"] == "champion"
    assert _promote(mlflow_server.uri, best).returncode == 3  # already the champion


def test_promoting_a_run_without_a_registered_adapter_is_one_clear_error(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment("promotion-unregistered"))
    done = _promote(mlflow_server.uri, run.info.run_id)
    assert done.returncode != 0 and "no registered adapter version" in done.stderr
    assert "Traceback" not in done.stderr
