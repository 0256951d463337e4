"""``kubetune compare`` and :func:`compare_runs` on the two pipeline runs of tests/mlflow_server.py."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest

from kubetune.cli.compare import add_parser
from kubetune.compare import (
    DEFAULT_METRIC,
    RunRow,
    compare_runs,
    default_mode,
    differing_params,
    write_plots,
)
from kubetune.errors import KubetuneError
from kubetune.plots import plot_base_vs_tuned
from kubetune.tracking import default_model_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(run_id: str, **params: str) -> RunRow:
    return RunRow(run_id, run_id, "e", "FINISHED", 0, params, {})


def test_differing_params_unit():
    rows = [_row("a", x="1", y="2", z="3"), _row("b", x="1", y="5"), _row("c", x="1", y="2", z="3")]
    assert differing_params(rows) == ["y", "z"]  # a param missing from one run differs too
    assert differing_params(rows[:1]) == []


def test_default_mode_unit():
    assert default_mode("eval.tuned_eval_loss") == "min"
    assert default_mode("eval.tuned_chrf") == "max"
    assert default_mode("eval.loss_reduction") == "max"


def test_base_vs_tuned_figure_unit(tmp_path):
    figure = plot_base_vs_tuned({"base_eval_loss": 2.0, "tuned_eval_loss": 1.5, "base_chrf": 3.0, "tuned_chrf": 4.0,
                                 "base_generation_tokens_per_second": 9.0, "tuned_generation_tokens_per_second": 9.0})
    assert len(figure.axes) == 2  # throughput is not a quality metric and gets no panel
    figure.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_base_vs_tuned({"loss": 1.0}) is None


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _metric(runs, run_id: str, name: str) -> float:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=runs.uri).get_run(run_id).data.metrics[name]


@pytest.mark.slow
def test_compare_runs_best_and_differing_params(pipeline_runs):
    comparison = compare_runs(pipeline_runs.uri, [pipeline_runs.experiment], DEFAULT_METRIC, "min")
    assert [row.run_id for row in comparison.rows] == pipeline_runs.run_ids
    assert comparison.differing_params == ["lora.lora_r"]
    losses = {run_id: _metric(pipeline_runs, run_id, DEFAULT_METRIC) for run_id in pipeline_runs.run_ids}
    assert comparison.best.run_id == min(losses, key=losses.get)
    assert {"eval.tuned_eval_loss", "eval.tuned_chrf", "eval.loss_reduction", "sft.tokens_per_second"} <= set(
        comparison.metric_names)

    highest = compare_runs(pipeline_runs.uri, [pipeline_runs.experiment], "sft.tokens_per_second", "max")
    speeds = {run_id: _metric(pipeline_runs, run_id, "sft.tokens_per_second") for run_id in pipeline_runs.run_ids}
    assert highest.best.run_id == max(speeds, key=speeds.get)

    text = comparison.to_text()
    assert "lora.lora_r" in text and f"best by {DEFAULT_METRIC} (min)" in text and comparison.best.run_id[:8] in text


@pytest.mark.slow
def test_compare_over_several_experiments_and_unknown_ones(pipeline_runs):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=pipeline_runs.uri)
    if client.get_experiment_by_name("kubetune-test-empty") is None:
        client.create_experiment("kubetune-test-empty")
    comparison = compare_runs(pipeline_runs.uri, [pipeline_runs.experiment, "kubetune-test-empty"])
    assert len(comparison.rows) == 2 and comparison.mode == "min"
    with pytest.raises(KubetuneError, match="not found") as error:
        compare_runs(pipeline_runs.uri, ["no-such-experiment"])
    assert pipeline_runs.experiment in error.value.fix


@pytest.mark.slow
def test_compare_plots_are_valid_pngs(pipeline_runs, tmp_path):
    from PIL import Image

    comparison = compare_runs(pipeline_runs.uri, [pipeline_runs.experiment])
    paths = write_plots(comparison, tmp_path / "plots")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["loss_curves.png", "metric_by_run.png"]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
            assert image.width > 100 and image.height > 100


@pytest.mark.slow
def test_compare_command_csv_json_and_champion_alias(pipeline_runs, tmp_path, capsys):
    from mlflow import MlflowClient

    base = ["compare", "--tracking-uri", pipeline_runs.uri, "--experiment", pipeline_runs.experiment]
    args = _cli([*base, "--format", "csv"])
    assert args.func(args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["run_id"] for row in rows] == pipeline_runs.run_ids
    assert {row["lora.lora_r"] for row in rows} == {"8", "4"}
    assert sum(row["best"] == "True" for row in rows) == 1
    assert all(float(row[DEFAULT_METRIC]) > 0 for row in rows)

    args = _cli([*base, "--format", "json", "--metric", "eval.tuned_chrf", "--plots-dir", str(tmp_path),
                 "--set-alias", "champion"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "max" and result["differing_params"] == ["lora.lora_r"]
    chrf = {run["run_id"]: run["eval.tuned_chrf"] for run in result["runs"]}
    best_id = result["best"]["run_id"]
    assert chrf[best_id] == max(chrf.values())
    assert len(result["plots"]) == 2 and all((tmp_path / name).is_file() for name in ("loss_curves.png",
                                                                                      "metric_by_run.png"))
    name = default_model_name(pipeline_runs.experiment)
    champion = MlflowClient(tracking_uri=pipeline_runs.uri, registry_uri=pipeline_runs.uri).get_model_version_by_alias(
        name, "champion")
    assert champion.run_id == best_id
    assert champion.version == result["best"]["registered_version"]
