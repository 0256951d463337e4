"""Matplotlib figures of fine-tuning runs: loss curves, base vs tuned evaluation metrics, one metric by run.

The evaluation step logs the first two to its MLflow run; :func:`kubetune.compare.write_plots` saves the loss
curves and the metric by run of a comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LOSS_METRIC = "train.loss"


def _figure(width: float = 7.0, height: float = 4.0):
    # The object API with the Agg canvas: no pyplot state, no display, safe in threads and headless pods.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], title: str = "Training loss"):
    """One line per curve of ``(step, value)`` points, overlaid; returns a matplotlib Figure."""
    figure = _figure()
    axes = figure.add_subplot()
    for label, points in curves.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(curves) > 1 or any(label != LOSS_METRIC for label in curves):
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_base_vs_tuned(metrics: Mapping[str, Any]):
    """Bars of base vs tuned for every ``base_X``/``tuned_X`` pair of eval metrics (one panel each, as their
    scales differ); None when there is no pair."""
    pairs = [key[5:] for key in metrics if key.startswith("base_") and f"tuned_{key[5:]}" in metrics
             and "tokens_per_second" not in key]
    if not pairs:
        return None
    figure = _figure(3.0 * len(pairs), 3.6)
    for index, name in enumerate(pairs, start=1):
        axes = figure.add_subplot(1, len(pairs), index)
        values = [float(metrics[f"base_{name}"]), float(metrics[f"tuned_{name}"])]
        bars = axes.bar(["base", "tuned"], values, color=["#999999", "#2a7ab9"])
        axes.bar_label(bars, fmt="%.4g", fontsize=8)
        axes.set_title(name)
    figure.suptitle("Evaluation: base vs tuned")
    figure.tight_layout()
    return figure


def plot_metric_by_run(labels: Sequence[str], values: Sequence[float], metric: str, best_index: int | None = None):
    """A bar per run for one metric, the best one highlighted."""
    figure = _figure(max(5.0, 1.1 * len(labels) + 2), 4.2)
    axes = figure.add_subplot()
    colors = ["#d9822b" if i == best_index else "#2a7ab9" for i in range(len(labels))]
    bars = axes.bar(range(len(labels)), values, color=colors)
    axes.bar_label(bars, fmt="%.4g", fontsize=8)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by run")
    figure.tight_layout()
    return figure
