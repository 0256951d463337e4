"""The base-vs-tuned HTML report: one self-contained file for the Kubeflow UI.

The Kubeflow UI shows HTML artifacts in a sandboxed iframe, so everything is inline (CSS, no scripts, no web
fonts) and every user-provided string is escaped: model answers can contain ``<think>`` or ``<script>``.
"""

from __future__ import annotations

import html
import math

# CJK fonts first so Chinese answers render with a proper face wherever one is installed.
FONT_STACK = (
    '"Noto Sans CJK SC", "Noto Sans SC", "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", '
    '"Source Han Sans SC", system-ui, -apple-system, "Segoe UI", Roboto, sans-serif'
)

# (label, base key, tuned key, delta key, lower is better)
COMPARED = (
    ("Held-out loss (completion tokens)", "base_eval_loss", "tuned_eval_loss", "loss_reduction", True),
    ("Perplexity", "base_perplexity", "tuned_perplexity", "", True),
    ("chrF (vs reference)", "base_chrf", "tuned_chrf", "chrf_gain", False),
    ("General ability (multiple-choice accuracy)", "base_capability_accuracy", "tuned_capability_accuracy",
     "capability_delta", False),
)

CSS = f"""
:root {{ color-scheme: light; }}
body {{ font-family: {FONT_STACK}; margin: 0 auto; max-width: 1400px; padding: 16px 24px; color: #1d2433;
  background: #fff; line-height: 1.5; }}
h1 {{ font-size: 1.4em; margin: 0 0 4px; }}
h2 {{ font-size: 1.15em; margin: 28px 0 8px; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ border: 1px solid #d5d9e0; padding: 4px 10px; text-align: left; font-variant-numeric: tabular-nums; }}
th {{ background: #f2f4f7; }}
td.num {{ text-align: right; }}
.better {{ color: #0a7a32; font-weight: 600; }}
.worse {{ color: #b3261e; font-weight: 600; }}
.meta td:first-child {{ color: #555; }}
.row {{ border: 1px solid #d5d9e0; border-radius: 6px; margin: 14px 0; padding: 10px 14px; }}
.row.probe {{ border-left: 6px solid #6b4fbb; background: #faf8ff; }}
.row.held-out {{ border-left: 6px solid #2f6feb; }}
.row.training {{ border-left: 6px solid #1a7f37; }}
.badge {{ display: inline-block; font-size: 0.8em; padding: 1px 8px; border-radius: 10px; color: #fff; }}
.probe .badge {{ background: #6b4fbb; }}
.held-out .badge {{ background: #2f6feb; }}
.training .badge {{ background: #1a7f37; }}
.label {{ font-size: 0.85em; font-weight: 600; color: #555; margin: 8px 0 2px; }}
.text {{ white-space: pre-wrap; word-break: break-word; margin: 0; font-family: inherit; }}
.answers {{ display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }}
.answer {{ background: #f7f8fa; border-radius: 4px; padding: 6px 10px; }}
.reference {{ background: #f3faf5; border-radius: 4px; padding: 6px 10px; }}
details summary {{ cursor: pointer; color: #555; font-size: 0.85em; }}
.note {{ background: #fff8e1; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 12px; }}
.chrf {{ font-weight: 400; color: #777; margin-left: 6px; }}
@media (max-width: 800px) {{ .answers {{ grid-template-columns: 1fr; }} }}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _delta_cell(delta: float | None, lower_is_better: bool) -> str:
    if delta is None or not math.isfinite(delta):
        return '<td class="num">–</td>'
    improved = delta < 0 if lower_is_better else delta > 0
    css = "better" if improved else ("worse" if delta != 0 else "")
    return f'<td class="num {css}">{delta:+.4f}</td>'


def _metrics_table(metrics: dict[str, float]) -> str:
    lines = [
        '<table id="metrics">',
        "<tr><th>Metric</th><th>Base</th><th>Tuned</th><th>Delta (tuned − base)</th></tr>",
    ]
    shown: set[str] = set()
    for label, base_key, tuned_key, _, lower in COMPARED:
        if base_key not in metrics and tuned_key not in metrics:
            continue
        base, tuned = metrics.get(base_key), metrics.get(tuned_key)
        # One delta convention in the table (tuned − base); colour says whether that is an improvement.
        delta = tuned - base if base is not None and tuned is not None else None
        lines.append(
            f'<tr id="metric-{_esc(base_key.removeprefix("base_"))}"><td>{_esc(label)}</td>'
            f'<td class="num">{_fmt(base)}</td><td class="num">{_fmt(tuned)}</td>{_delta_cell(delta, lower)}</tr>'
        )
        shown.update((base_key, tuned_key))
    shown.update(key for *_, key, _ in COMPARED if key)
    lines.append("</table>")
    others = {k: v for k, v in metrics.items() if k not in shown}
    if others:
        lines.append('<table id="other-metrics"><tr><th>Metric</th><th>Value</th></tr>')
        lines.extend(f'<tr><td>{_esc(k)}</td><td class="num">{_fmt(v)}</td></tr>' for k, v in sorted(others.items()))
        lines.append("</table>")
    return "\n".join(lines)


def _chrf(row: dict[str, str], model: str) -> str:
    value = row.get(f"{model}_chrf", "")
    return f' <span class="chrf" title="chrF of this answer against the reference">chrF {_esc(value)}</span>' \
        if value else ""


def _trace(row: dict[str, str], model: str) -> str:
    """A reasoning model's <think> trace, folded above its final answer (which the metrics score)."""
    trace = row.get(f"{model}_trace", "")
    if not trace:
        return ""
    unfinished = "" if row.get(f"{model}_answer") else " — no final answer within max_new_tokens"
    return (f'<details class="trace"><summary>Reasoning ({len(trace):,} characters){unfinished}</summary>'
            f'<pre class="text">{_esc(trace)}</pre></details>')


def _row(index: int, row: dict[str, str]) -> str:
    kind = row.get("kind", "held-out")
    css_kind = kind if kind in ("probe", "training") else "held-out"
    badge = {"probe": "Probe question", "training": "Training example"}.get(kind, "Held-out example")
    prompt = _esc(row.get("prompt", ""))
    if kind == "probe":
        question = f'<div class="label">Question</div><pre class="text prompt">{prompt}</pre>'
    else:
        # Held-out prompts carry the whole template (persona included): folded to keep answers in view.
        question = (
            '<details><summary>Prompt (as the model saw it)</summary>'
            f'<pre class="text prompt">{prompt}</pre></details>'
        )
    reference = ""
    if row.get("reference"):
        reference = (
            f'<div class="label">Reference answer</div>'
            f'<div class="reference"><pre class="text">{_esc(row["reference"])}</pre></div>'
        )
    return (
        f'<section class="row {css_kind}" id="row-{index}" data-kind="{_esc(kind)}">\n'
        f'<span class="badge">{badge} #{index + 1}</span>\n{question}\n{reference}\n'
        '<div class="answers">'
        f'<div class="answer base-answer"><div class="label">Base model{_chrf(row, "base")}</div>'
        f'{_trace(row, "base")}<pre class="text">{_esc(row.get("base_answer", ""))}</pre></div>'
        f'<div class="answer tuned-answer"><div class="label">Tuned model (base + LoRA){_chrf(row, "tuned")}</div>'
        f'{_trace(row, "tuned")}<pre class="text">{_esc(row.get("tuned_answer", ""))}</pre></div>'
        "</div>\n</section>"
    )


def _verdict(metrics: dict[str, float]) -> str:
    """One sentence with the decision: did fine-tuning lower the held-out loss?"""
    base, tuned = metrics.get("base_eval_loss"), metrics.get("tuned_eval_loss")
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)):
        return ""
    better = tuned < base
    return (f'<p id="verdict" class="{"better" if better else "worse"}">'
            f'{"The tuned model beats the base" if better else "The tuned model does not beat the base"} on the '
            f"held-out loss ({_fmt(tuned)} vs {_fmt(base)}).</p>")


def render_report(title: str, metrics: dict[str, float], rows: list[dict[str, str]], meta: dict[str, str], *,
                  notes: list[str] | tuple[str, ...] = ()) -> str:
    """One self-contained HTML page: notes a reader must see first, metrics (base vs tuned vs delta), then each
    question side by side (with each answer's chrF where there is a reference)."""
    note_html = "\n".join(f'<p class="note" id="note-{i}">{_esc(note)}</p>' for i, note in enumerate(notes))
    meta_rows = "\n".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in meta.items())
    # Probes first (the questions the user chose to ask both models), then training rows (where fine-tuning shows
    # first), then held-out rows.
    rank = {"probe": 0, "training": 1}
    ordered = sorted(rows, key=lambda r: rank.get(r.get("kind", ""), 2))
    sections = "\n".join(_row(i, r) for i, r in enumerate(ordered))
    kinds = [r.get("kind", "held-out") for r in rows]
    counts = ", ".join(f"{kinds.count(kind)} {kind}" for kind in ("probe", "training", "held-out")
                       if kind != "training" or kind in kinds)
    return f"""<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1 id="title">{_esc(title)}</h1>
{note_html}
<table class="meta" id="meta">
{meta_rows}
</table>
<h2>Metrics</h2>
{_verdict(metrics)}
{_metrics_table(metrics)}
<h2>Answers side by side ({counts})</h2>
<div id="rows">
{sections}
</div>
</body>
</html>
"""
