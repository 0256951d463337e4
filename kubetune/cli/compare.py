"""``kubetune compare``: print a comparison of MLflow runs as text, CSV or JSON, write its plots, and optionally put
a registry alias such as ``champion`` on the best run's adapter version (see :mod:`kubetune.compare`).
``kubetune review``: judge an evaluation's base and tuned answers blinded, in the terminal (see
:mod:`kubetune.review`). ``kubetune promote``: move the ``champion`` alias to a run's adapter when its evaluation
passes the promotion rules (see :mod:`kubetune.promotion`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubetune.compare import DEFAULT_METRIC, compare_runs, set_best_alias, write_plots
from kubetune.promotion import PromotionRule, promote_run
from kubetune.review import WIN_RATE_METRIC, ReviewSession
from kubetune.tracking import DEFAULT_EXPERIMENT, resolve_tracking_uri


def add_parser(sub) -> None:
    """Register ``kubetune compare`` on an argparse subparsers object."""
    parser = sub.add_parser(
        "compare",
        help="compare MLflow runs: differing params, key metrics, best run, plots, champion alias",
        description="Compare fine-tuning runs of one or several MLflow experiments.",
    )
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help=f"experiment to include (repeatable; default {DEFAULT_EXPERIMENT})")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./kubetune-local/mlflow.db)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric that picks the best run ({DEFAULT_METRIC})")
    parser.add_argument("--mode", choices=("min", "max"), default=None,
                        help="whether lower or higher is better (default: min for losses, max for chrF/gains)")
    parser.add_argument("--show-metric", action="append", default=[], metavar="NAME",
                        help="extra metric column (repeatable)")
    parser.add_argument("--format", choices=("text", "csv", "json"), default="text", help="output format")
    parser.add_argument("--plots-dir", default="", help="write loss_curves.png and metric_by_run.png here")
    parser.add_argument("--finished-only", action="store_true", help="leave out runs that did not finish")
    parser.add_argument("--set-alias", default="", metavar="ALIAS",
                        help="point this registry alias (e.g. champion) at the best run's adapter version")
    parser.set_defaults(func=cmd_compare)

    review = sub.add_parser(
        "review",
        help="judge an evaluation's base and tuned answers blinded; preferences and win rate go to its MLflow run",
        description="Shows each question with two answers, A and B, in shuffled order (which one is the tuned "
                    "model's is hidden); type a, b or t (tie), optionally followed by a note; s skips, q stops.",
    )
    review.add_argument("run_id", help="MLflow run id of the evaluation (summary line, or `kubetune compare`)")
    review.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./kubetune-local/mlflow.db)")
    review.add_argument("--reviewer", default=os.environ.get("USER", "reviewer") or "reviewer",
                        help="your name, recorded with the preferences (default: $USER)")
    review.add_argument("--seed", type=int, default=0, help="seed of the order and of the sides (default 0)")
    review.set_defaults(func=cmd_review)

    promote = sub.add_parser(
        "promote",
        help="point the champion alias at a run's adapter when it beats the base, keeps its general ability and "
             "beats the current champion",
        description="Gated promotion of an evaluated adapter; the decision and its reasons are recorded on the run.",
    )
    promote.add_argument("run_id", help="MLflow run id of the evaluation")
    promote.add_argument("--tracking-uri", default="",
                         help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./kubetune-local/mlflow.db)")
    promote.add_argument("--metric", default="eval_loss",
                         help="evaluation metric compared: eval_loss (default), perplexity, chrf, capability_accuracy")
    promote.add_argument("--margin", type=float, default=0.0, help="how much the tuned model must beat the base by")
    promote.add_argument("--capability-tolerance", type=float, default=0.02,
                         help="largest drop of capability accuracy allowed, when the check ran (default 0.02)")
    promote.add_argument("--alias", default="champion", help="registry alias to move (default champion)")
    promote.set_defaults(func=cmd_promote)


def cmd_compare(args: argparse.Namespace) -> int:
    uri = _tracking_uri(args)
    comparison = compare_runs(uri, args.experiment or [DEFAULT_EXPERIMENT], args.metric, args.mode,
                              metrics=args.show_metric, include_unfinished=not args.finished_only)
    if args.plots_dir:
        write_plots(comparison, args.plots_dir)
    if args.set_alias:
        name, version = set_best_alias(comparison, args.set_alias)
        print(f"alias {args.set_alias!r} -> {name} version {version} (run {comparison.best.run_id})", file=sys.stderr)
    output = {"text": comparison.to_text, "csv": comparison.to_csv, "json": comparison.to_json}[args.format]()
    sys.stdout.write(output if output.endswith("\n") else output + "\n")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    uri = _tracking_uri(args)
    session = ReviewSession(uri, args.run_id, reviewer=args.reviewer, seed=args.seed)
    for pair in session.pairs:
        print(f"\n=== {pair.number}/{len(session.pairs)} ===\n{pair.prompt}\n")
        if pair.reference:
            print(f"--- reference ---\n{pair.reference}\n")
        print(f"--- A ---\n{pair.a}\n\n--- B ---\n{pair.b}\n")
        while True:
            try:
                line = input("a / b / t (tie) [note], s skip, q stop: ").strip()
            except EOFError:
                line = "q"
            word, _, note = line.partition(" ")
            word = {"t": "tie"}.get(word.lower(), word.lower())
            if word in ("a", "b", "tie"):
                session.record(pair.number, word, note.strip())
                break
            if word in ("s", "q"):
                break
        if word == "q":
            break
    if not session.choices:
        print("no preferences recorded", file=sys.stderr)
        return 1
    metrics = session.save()
    print(f"{int(metrics['review.pairs'])} preferences recorded on run {args.run_id}: tuned wins "
          f"{int(metrics['review.tuned_wins'])}, base wins {int(metrics['review.base_wins'])}, ties "
          f"{int(metrics['review.ties'])}; {WIN_RATE_METRIC} = {metrics[WIN_RATE_METRIC]:.2f}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Exit 0 when promoted, 3 when held back (the reasons are printed either way)."""
    uri = _tracking_uri(args)
    rule = PromotionRule(args.metric, args.margin, args.capability_tolerance, args.alias)
    decision, name, version = promote_run(uri, args.run_id, rule)
    print(f"{name} version {version}: {decision.summary()}")
    return 0 if decision.promote else 3


def _tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else MLFLOW_TRACKING_URI, else the local store of ``kubetune run --local``."""
    return resolve_tracking_uri(args.tracking_uri) if args.tracking_uri or _env_uri() else _local_uri()


def _env_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def _local_uri() -> str:
    # The store `kubetune run --local` writes by default; not created here when missing.
    return f"sqlite:///{Path('kubetune-local').resolve() / 'mlflow.db'}"
