"""Compare fine-tuning runs across MLflow experiments: what differs, how they scored, which one is best.

:func:`compare_runs` is the plain function a notebook calls; :func:`write_plots` saves a comparison's loss curves
and metric by run (figures from :mod:`kubetune.plots`), and :func:`set_best_alias` puts a registry alias such as
``champion`` on the best run's adapter version. ``kubetune compare`` (:mod:`kubetune.cli.compare`) prints a
comparison as text, CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune.errors import KubetuneError
from kubetune.plots import LOSS_METRIC, plot_loss_curves, plot_metric_by_run
from kubetune.secrets import redact
from kubetune.tracking import REGISTERED_MODEL_TAG, REGISTERED_VERSION_TAG

DEFAULT_METRIC = "eval.tuned_eval_loss"
KEY_METRICS = (
    "eval.tuned_eval_loss",
    "eval.base_eval_loss",
    "eval.loss_reduction",
    "eval.tuned_perplexity",
    "eval.tuned_chrf",
    "eval.chrf_gain",
    "eval.capability_delta",
    "review.tuned_win_rate",
    "sft.train_loss",
    "sft.tokens_per_second",
    "sft.train_runtime_s",
    "sft.gpu_peak_memory_gib",
)
# Metrics where higher is better; the default direction for --metric when --mode is not given.
HIGHER_IS_BETTER = ("chrf", "reduction", "gain", "tokens_per_second", "accuracy", "win_rate", "capability_delta")
Mode = Literal["min", "max"]


@dataclass
class RunRow:
    """One run as the comparison shows it."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    registered_model: str = ""
    registered_version: str = ""

    @property
    def label(self) -> str:
        return f"{self.run_name} ({self.run_id[:8]})" if self.run_name else self.run_id[:8]


@dataclass
class Comparison:
    """Runs of one or several experiments, the params that differ between them, and the best run by ``metric``."""

    tracking_uri: str
    experiments: list[str]
    metric: str
    mode: Mode
    rows: list[RunRow]
    differing_params: list[str]
    metric_names: list[str]
    best: RunRow | None = None
    plots: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per run: identity, the differing params, the key metrics, and whether it is best."""
        records = []
        for row in self.rows:
            record: dict[str, Any] = {
                "run_id": row.run_id,
                "run_name": row.run_name,
                "experiment": row.experiment,
                "status": row.status,
                "best": self.best is not None and row.run_id == self.best.run_id,
            }
            record.update({name: row.params.get(name, "") for name in self.differing_params})
            record.update({name: row.metrics.get(name) for name in self.metric_names})
            record["registered_model"] = row.registered_model
            record["registered_version"] = row.registered_version
            records.append(record)
        return records

    def to_json(self) -> str:
        return json.dumps(
            {
                "tracking_uri": redact(self.tracking_uri),
                "experiments": self.experiments,
                "metric": self.metric,
                "mode": self.mode,
                "best": asdict(self.best) if self.best else None,
                "differing_params": self.differing_params,
                "metrics": self.metric_names,
                "runs": self.records(),
                "plots": self.plots,
            },
            ensure_ascii=False,
            indent=2,
            default=_json_default,
        )

    def to_csv(self) -> str:
        records = self.records()
        columns = list(records[0]) if records else ["run_id", "run_name", "experiment", "status", "best"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
        return buffer.getvalue()

    def to_text(self) -> str:
        records = self.records()
        lines = [f"{len(self.rows)} run(s) in {', '.join(self.experiments)} ({redact(self.tracking_uri)})"]
        if not records:
            return lines[0] + "\n"
        columns = ["", "run", "experiment", *self.differing_params, *self.metric_names]
        table = [columns]
        for row, record in zip(self.rows, records, strict=True):
            table.append(
                ["*" if record["best"] else "", row.label, row.experiment,
                 *(_short(record[name]) for name in self.differing_params),
                 *(_number(record[name]) for name in self.metric_names)]
            )
        widths = [max(len(str(line[i])) for line in table) for i in range(len(columns))]
        for line in table:
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if not self.differing_params and len(self.rows) > 1:
            lines.append("params: all runs share the same parameters")
        if self.best is not None:
            lines.append(
                f"best by {self.metric} ({self.mode}): {self.best.label} = {_number(self.best.metrics[self.metric])}"
                + (f", adapter {self.best.registered_model} v{self.best.registered_version}"
                   if self.best.registered_version else "")
            )
        else:
            lines.append(f"best: no run has the metric {self.metric}")
        lines.extend(f"plot: {path}" for path in self.plots)
        return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _short(value: Any, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def default_mode(metric: str) -> Mode:
    return "max" if any(word in metric for word in HIGHER_IS_BETTER) else "min"


# -- comparing ---------------------------------------------------------------------------------------------
def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _check_local_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise KubetuneError(
                f"no MLflow store at {db}",
                "run `kubetune run --local` first, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)",
            )


def _read_rows(tracking_uri: str, experiments: Sequence[str], include_unfinished: bool,
               max_runs: int) -> list[RunRow]:
    from mlflow.entities import ViewType

    client = _client(tracking_uri)
    found, missing = {}, []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            missing.append(name)
        else:
            found[experiment.experiment_id] = name
    if missing:
        known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        raise KubetuneError(
            f"experiment(s) {', '.join(missing)} not found in {redact(tracking_uri)}",
            f"use one of: {', '.join(known) or '(none yet: run the pipeline first)'}",
        )
    rows: list[RunRow] = []
    for experiment_id, name in found.items():
        runs = client.search_runs([experiment_id], max_results=max_runs, order_by=["attributes.start_time ASC"])
        for run in runs:
            if not include_unfinished and run.info.status != "FINISHED":
                continue
            rows.append(
                RunRow(
                    run_id=run.info.run_id,
                    run_name=run.info.run_name or "",
                    experiment=name,
                    status=run.info.status,
                    start_time=run.info.start_time or 0,
                    params=dict(run.data.params),
                    metrics=dict(run.data.metrics),
                    registered_model=run.data.tags.get(REGISTERED_MODEL_TAG, ""),
                    registered_version=run.data.tags.get(REGISTERED_VERSION_TAG, ""),
                )
            )
    return rows


def compare_runs(tracking_uri: str, experiments: Sequence[str], metric: str = DEFAULT_METRIC,
                 mode: Mode | None = None, *, metrics: Sequence[str] = (), include_unfinished: bool = True,
                 max_runs: int = 1000) -> Comparison:
    """Read the runs of ``experiments`` from MLflow at ``tracking_uri`` and compare them.

    Args:
        tracking_uri: The MLflow tracking URI.
        experiments: Experiment names (at least one).
        metric: The metric that picks the best run (default ``eval.tuned_eval_loss``).
        mode: ``min`` or ``max``; None guesses from the name (losses min, chrF/gains/throughput max).
        metrics: Extra metrics to show beside :data:`KEY_METRICS`.
        include_unfinished: Keep runs that are still running or failed (they never count as best
            unless they have the metric).
        max_runs: Cap on runs read per experiment.
    """
    from mlflow.exceptions import MlflowException

    if not experiments:
        raise KubetuneError("no experiment to compare", "pass --experiment NAME (repeatable)")
    mode = mode or default_mode(metric)
    if mode not in ("min", "max"):
        raise KubetuneError(f"mode {mode!r} is unknown", "use min or max")
    _check_local_store(tracking_uri)
    try:
        rows = _read_rows(tracking_uri, experiments, include_unfinished, max_runs)
    except MlflowException as exc:  # unreachable or refusing: no traceback, and no credential of the URI
        raise KubetuneError(
            f"could not read runs from {redact(tracking_uri)}: {redact(str(exc))[:300]}",
            "check the tracking URI and that the MLflow server answers (credentials go in "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, not in the URI)",
        ) from None
    rows.sort(key=lambda row: row.start_time)
    metric_names = [m for m in dict.fromkeys([metric, *KEY_METRICS, *metrics]) if any(m in r.metrics for r in rows)]
    scored = [row for row in rows if _finite(row.metrics.get(metric))]
    best = None
    if scored:
        best = (min if mode == "min" else max)(scored, key=lambda row: row.metrics[metric])
    return Comparison(
        tracking_uri=tracking_uri,
        experiments=list(experiments),
        metric=metric,
        mode=mode,
        rows=rows,
        differing_params=differing_params(rows),
        metric_names=metric_names,
        best=best,
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def differing_params(rows: Sequence[RunRow]) -> list[str]:
    """Param names whose values are not the same in every run (a param missing from some run differs)."""
    if len(rows) < 2:
        return []
    names = sorted({name for row in rows for name in row.params})
    return [name for name in names if len({row.params.get(name) for row in rows}) > 1]


def set_best_alias(comparison: Comparison, alias: str) -> tuple[str, str]:
    """Point registry alias ``alias`` (e.g. ``champion``) at the best run's adapter version. Returns
    (registered model, version)."""
    from mlflow.exceptions import MlflowException

    best = comparison.best
    if best is None:
        raise KubetuneError(f"no run has the metric {comparison.metric}, so there is no best run to mark",
                            "pick a --metric the runs logged (see the table), or finish an evaluation first")
    client = _client(comparison.tracking_uri)
    name, version = best.registered_model, best.registered_version
    if not version:
        versions = client.search_model_versions(f"run_id = '{best.run_id}'")
        if versions:
            chosen = max(versions, key=lambda v: int(v.version))
            name, version = chosen.name, str(chosen.version)
    if not version:
        raise KubetuneError(
            f"the best run {best.label} has no registered adapter version",
            "runs register their adapter in the training step unless registration is off; pick another run or "
            "register this one with MlflowClient().create_model_version",
        )
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise KubetuneError(f"could not set alias {alias!r} on {name} version {version}: {str(exc)[:200]}",
                            "use an alias of letters, digits and '_' (not 'latest' or v<number>)") from exc
    return name, version


# -- writing plots ---------------------------------------------------------------------------------------------
def write_plots(comparison: Comparison, plots_dir: str | Path) -> list[str]:
    """Write ``loss_curves.png`` (train.loss of every run, overlaid) and ``metric_by_run.png`` (the comparison
    metric per run) to ``plots_dir``; returns the paths written and records them on the comparison."""
    target = Path(plots_dir)
    target.mkdir(parents=True, exist_ok=True)
    client = _client(comparison.tracking_uri)
    written: list[str] = []
    curves = {}
    for row in comparison.rows:
        history = client.get_metric_history(row.run_id, LOSS_METRIC)
        if history:
            curves[_plot_label(row, comparison.differing_params)] = sorted((m.step, m.value) for m in history)
    if curves:
        path = target / "loss_curves.png"
        plot_loss_curves(curves, title="Training loss by run").savefig(path, dpi=110, bbox_inches="tight")
        written.append(str(path))
    scored = [row for row in comparison.rows if _finite(row.metrics.get(comparison.metric))]
    if scored:
        best_index = next((i for i, row in enumerate(scored)
                           if comparison.best and row.run_id == comparison.best.run_id), None)
        path = target / "metric_by_run.png"
        figure = plot_metric_by_run([_plot_label(r, comparison.differing_params) for r in scored], [r.metrics[comparison.metric] for r in scored],
                                    comparison.metric, best_index)
        figure.savefig(path, dpi=110, bbox_inches="tight")
        written.append(str(path))
    comparison.plots = written
    return written


def _plot_label(row: RunRow, differing: Sequence[str]) -> str:
    """What tells runs apart in a legend: their differing params (short names), else the run name; plus the id."""
    parts = [f"{name.rsplit('.', 1)[-1]}={_short(row.params.get(name, '-'), 16)}" for name in differing[:3]]
    return f"{', '.join(parts) or _short(row.run_name or row.run_id, 32)} [{row.run_id[:6]}]"
