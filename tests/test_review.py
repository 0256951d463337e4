"""Human review against a real MLflow server: blinded pairs, preferences recorded on the evaluation's run, the
win rate, and ``kubetune compare`` showing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import SECRET_ENV

from kubetune.errors import KubetuneError
from kubetune.review import WIN_RATE_METRIC, ReviewSession, blinded_pairs, win_rate

ROWS = [
    {"kind": "held-out", "prompt": f"问题 {i}", "reference": f"参考 {i}", "base_answer": f"base {i}",
     "tuned_answer": f"tuned {i}"}
    for i in range(6)
]


@pytest.fixture
def evaluation_run(mlflow_server, request):
    """An evaluation-like run: the answers table the evaluate step logs (eval/answers.json)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    name = f"review-{request.node.name[:40]}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id)
    client.log_table(run.info.run_id, pd.DataFrame(ROWS), "eval/answers.json")
    client.log_metric(run.info.run_id, "eval.tuned_eval_loss", 1.0)
    client.set_terminated(run.info.run_id)
    return client, run.info.run_id, name


def test_pairs_are_shuffled_and_blinded_with_the_seed():
    pairs = blinded_pairs(ROWS, seed=3)
    assert sorted(p.prompt for p in pairs) == sorted(r["prompt"] for r in ROWS)
    assert [p.prompt for p in pairs] != [r["prompt"] for r in ROWS]  # shuffled
    assert {p.tuned_is for p in pairs} == {"a", "b"}  # the tuned answer is not always on one side
    for pair in pairs:
        tuned = pair.a if pair.tuned_is == "a" else pair.b
        assert tuned.startswith("tuned") and pair.winner(pair.tuned_is) == "tuned"
    assert blinded_pairs(ROWS, seed=3) == pairs and blinded_pairs(ROWS, seed=4) != pairs
    assert win_rate(["tuned", "tuned", "base", "tie"]) == 0.625


def test_a_review_session_records_preferences_and_the_win_rate(evaluation_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    client, run_id, _ = evaluation_run
    monkeypatch.setenv("HF_TOKEN", SECRET_ENV["HF_TOKEN"])
    session = ReviewSession(client.tracking_uri, run_id, reviewer="dr-li", seed=1)
    assert len(session.pairs) == 6
    first, second, third, fourth = session.pairs[:4]  # judged: tuned, tuned, base, tie
    session.record(first.number, first.tuned_is, f"clearer; token {SECRET_ENV['HF_TOKEN']}")
    session.record(second.number, second.tuned_is)
    session.record(third.number, "b" if third.tuned_is == "a" else "a")
    session.record(fourth.number, "TIE")
    with pytest.raises(KubetuneError, match="not one of"):
        session.record(1, "maybe")
    metrics = session.save()
    assert metrics[WIN_RATE_METRIC] == pytest.approx(0.625) and metrics["review.pairs"] == 4
    run = MlflowClient(client.tracking_uri).get_run(run_id)
    assert run.data.metrics[WIN_RATE_METRIC] == pytest.approx(0.625)
    assert run.data.tags["kubetune.reviewed_by"] == "dr-li"
    path = client.download_artifacts(run_id, "review/preferences-dr-li.json")
    table = Path(path).read_text(encoding="utf-8")
    assert '"winner"' in table and "tuned" in table and "base" in table
    assert SECRET_ENV["HF_TOKEN"] not in table  # a note holding a secret is redacted


def test_the_review_command_takes_answers_from_the_terminal_and_compare_shows_the_win_rate(evaluation_run):
    client, run_id, experiment = evaluation_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri}
    pairs = blinded_pairs(ROWS, seed=0)
    typed = [pairs[0].tuned_is + " clearer", "x", "t", "s", "b" if pairs[3].tuned_is == "b" else "a", "q"]
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "review", run_id, "--reviewer", "wang"],
                          input="\n".join(typed) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "=== 1/6 ===" in done.stdout and "--- A ---" in done.stdout and "tuned 0" not in done.stdout.split(
        "=== 1/6 ===")[0]
    # pair 1 tuned, pair 2 tie ("x" was asked again), pair 3 skipped, pair 4 tuned: (2 + 0.5) / 3
    assert "3 preferences recorded" in done.stdout and "= 0.83" in done.stdout
    compared = subprocess.run([sys.executable, "-m", "kubetune.cli", "compare", "--experiment", experiment],
                              capture_output=True, text=True, env=env, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert WIN_RATE_METRIC in compared.stdout and "0.8333" in compared.stdout


def test_a_run_without_answers_gets_one_clear_error(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment("review-empty"))
    with pytest.raises(KubetuneError, match="no eval/answers.json") as caught:
        ReviewSession(mlflow_server.uri, run.info.run_id)
    assert "evaluation" in caught.value.fix
