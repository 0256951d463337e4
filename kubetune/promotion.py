"""Gated promotion: point the registry alias (``champion``) at a tuned adapter only when its evaluation says so.

The rules, all of which must hold:

1. the tuned model beats the base model on ``metric`` (an evaluation metric logged as ``base_<metric>`` and
   ``tuned_<metric>``: ``eval_loss``, ``perplexity``, ``chrf``, ``capability_accuracy``) by more than ``margin``;
2. when the capability check ran, the tuned model lost at most ``capability_tolerance`` of its accuracy;
3. it beats the current champion (the version the alias points at) on ``tuned_<metric>``, if there is one.

The decision and every rule's outcome are recorded on the evaluation's MLflow run (tags ``kubetune.promotion``
and ``kubetune.promotion_reasons``), whichever way it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kubetune.errors import KubetuneError

LOWER_IS_BETTER = ("eval_loss", "perplexity")
EVAL_PREFIX = "eval."  # evaluation metrics on the MLflow run


@dataclass(frozen=True)
class PromotionRule:
    metric: str = "eval_loss"
    margin: float = 0.0
    capability_tolerance: float = 0.02
    alias: str = "champion"

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ("promoted: " if self.promote else "held back: ") + "; ".join(self.reasons)


def _value(metrics: dict[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return value if value is not None and math.isfinite(value) else None


def decide(metrics: dict[str, float], rule: PromotionRule, champion: dict[str, float] | None = None) -> Decision:
    """Apply the rules to evaluation ``metrics`` (without the ``eval.`` prefix); ``champion`` holds the current
    champion's evaluation metrics, None when no version has the alias."""
    base, tuned = _value(metrics, f"base_{rule.metric}"), _value(metrics, f"tuned_{rule.metric}")
    if base is None or tuned is None:
        raise KubetuneError(f"the evaluation has no base_{rule.metric} and tuned_{rule.metric} to compare",
                            "pick a metric the evaluation logged: eval_loss, perplexity, chrf, capability_accuracy")
    sign = -1.0 if rule.lower_is_better else 1.0
    gain = sign * (tuned - base)
    reasons, promote = [], True
    if gain > rule.margin:
        reasons.append(f"tuned {rule.metric} {tuned:.4g} beats base {base:.4g} by {gain:.4g} (margin {rule.margin:g})")
    else:
        promote = False
        reasons.append(f"tuned {rule.metric} {tuned:.4g} does not beat base {base:.4g} by more than {rule.margin:g}")
    delta = _value(metrics, "capability_delta")
    if delta is not None:
        if delta >= -rule.capability_tolerance:
            reasons.append(f"general ability kept (capability {delta:+.3f}, tolerance {rule.capability_tolerance:g})")
        else:
            promote = False
            reasons.append(f"general ability fell by {-delta:.3f}, more than the tolerance {rule.capability_tolerance:g}")
    current = _value(champion or {}, f"tuned_{rule.metric}")
    if champion is None:
        reasons.append(f"no current {rule.alias}")
    elif current is None:
        reasons.append(f"the current {rule.alias} has no tuned_{rule.metric}: replaced")
    elif sign * (tuned - current) > 0:
        reasons.append(f"beats the current {rule.alias} ({rule.metric} {current:.4g})")
    else:
        promote = False
        reasons.append(f"does not beat the current {rule.alias} ({rule.metric} {current:.4g})")
    return Decision(promote, reasons)


def _eval_metrics(client, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {k.removeprefix(EVAL_PREFIX): v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}


def promote_run(tracking_uri: str, run_id: str, rule: PromotionRule) -> tuple[Decision, str, str]:
    """Decide on the adapter version registered by evaluation run ``run_id`` and, when the rules hold, point
    ``rule.alias`` at it. Returns (decision, registered model, version)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        raise KubetuneError(f"run {run_id} has no registered adapter version to promote",
                            "evaluate with a registered model name (the default), then promote that run")
    chosen = max(versions, key=lambda v: int(v.version))
    name, version = chosen.name, str(chosen.version)
    champion = None
    try:
        current = client.get_model_version_by_alias(name, rule.alias)
    except MlflowException:
        current = None  # no version has the alias yet
    if current is not None and current.run_id == run_id:
        decision = Decision(False, [f"version {version} already is {rule.alias}"])
    else:
        if current is not None:
            champion = _eval_metrics(client, current.run_id) if current.run_id else {}
        decision = decide(_eval_metrics(client, run_id), rule, champion)
        if decision.promote:
            client.set_registered_model_alias(name, rule.alias, version)
    client.set_tag(run_id, "kubetune.promotion", f"{rule.alias}" if decision.promote else "held back")
    client.set_tag(run_id, "kubetune.promotion_reasons", "; ".join(decision.reasons)[:4900])
    return decision, name, version
