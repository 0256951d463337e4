"""The SFT step's page for the Kubeflow run view: loss, learning rate and throughput against the optimizer step,
the speed plan the step chose, where it resumed from, and a link to the MLflow run.

Like the evaluation report it is one self-contained file (inline SVG and CSS, no scripts): the Kubeflow UI shows
HTML artifacts in a sandboxed iframe.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from kubetune.report import CSS

# (series key in the trainer's log rows, chart title)
SERIES = (
    ("loss", "Training loss"),
    ("eval_loss", "Held-out loss"),
    ("learning_rate", "Learning rate"),
    ("tokens_per_second", "Tokens per second"),
)
WIDTH, HEIGHT, PAD = 560, 220, 44
PAGE_CSS = CSS + """
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg.curve { border: 1px solid #d5d9e0; border-radius: 6px; background: #fff; }
svg.curve text { font-size: 11px; fill: #555; }
svg.curve polyline { fill: none; stroke: #2f6feb; stroke-width: 2; }
svg.curve .axis { stroke: #aab; stroke-width: 1; }
"""


def _points(history: Sequence[dict[str, float]], key: str) -> list[tuple[float, float]]:
    points = [(float(row["step"]), float(row[key])) for row in history
              if key in row and "step" in row and math.isfinite(float(row[key]))]
    return sorted(dict(points).items())  # one value per step (a resumed run may log a step twice): the last


def _chart(key: str, title: str, points: list[tuple[float, float]]) -> str:
    (x0, x1), (y0, y1) = (min(p[0] for p in points), max(p[0] for p in points)), \
        (min(p[1] for p in points), max(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.01 + 1e-12)

    def xy(step: float, value: float) -> str:
        x = PAD + (step - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
        y = HEIGHT - PAD + (PAD - HEIGHT + PAD) * (value - y0) / (y1 - y0)
        return f"{x:.1f},{y:.1f}"

    steps = ",".join(f"{s:g}" for s, _ in points)
    values = ",".join(f"{v:.6g}" for _, v in points)
    return (
        f'<svg class="curve" data-series="{key}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)} by step">'
        f'<text x="{PAD}" y="16" font-weight="600">{html.escape(title)}</text>'
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 16}">step {x0:g}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 16}" text-anchor="end">step {x1:g}</text>'
        f'<text x="4" y="{PAD + 4}">{y1:.4g}</text><text x="4" y="{HEIGHT - PAD}">{y0:.4g}</text>'
        f'<polyline data-steps="{steps}" data-values="{values}" '
        f'points="{" ".join(xy(s, v) for s, v in points)}"/></svg>'
    )


def render_training_page(history: Sequence[dict[str, float]], *, metrics: dict[str, Any], plan: Sequence[str],
                         mlflow_run_url: str = "", title: str = "kubetune LoRA SFT") -> str:
    """The page: one chart per series the run logged, then the totals, the speed plan and the resume point."""
    charts = [_chart(key, name, points) for key, name in SERIES if len(points := _points(history, key)) >= 1]
    totals = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=\"num\">{html.escape(f'{metrics[key]:.6g}')}</td></tr>"
        for key, name in (("train_loss", "Mean training loss"), ("global_step", "Optimizer steps"),
                          ("tokens_per_second", "Tokens per second"), ("tokens_seen", "Tokens seen"),
                          ("gpu_peak_memory_gib", "Peak GPU memory (GiB)"),
                          ("resumed_from_step", "Resumed from step"))
        if isinstance(metrics.get(key), (int, float))
    )
    resumed = int(metrics.get("resumed_from_step") or 0)
    link = (f'<p><a href="{html.escape(mlflow_run_url, quote=True)}" target="_blank" rel="noopener">'
            "Open the run in MLflow</a></p>") if mlflow_run_url.startswith(("http://", "https://")) else ""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<p>Resumed from the checkpoint at step {resumed}.</p>" if resumed else "")
        + link
        + f"<div class=\"charts\">{''.join(charts) or '<p>No training steps were logged.</p>'}</div>"
        + f"<h2>Totals</h2><table>{totals}</table>"
        + "<h2>Speed plan</h2><ul>" + "".join(f"<li>{html.escape(reason)}</li>" for reason in plan) + "</ul>"
        + "</body></html>"
    )
