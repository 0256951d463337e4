"""MLflow tracking: unit tests of redaction, flattening and the outage-tolerant Tracker (local sqlite store), and
end-to-end checks of two local pipeline runs read back from a real MLflow server (see tests/mlflow_server.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow_server import LORA_RANKS, SECRET_ENV

from kubetune import __version__
from kubetune.errors import KubetuneError
from kubetune.secrets import REDACTED, is_secret_name, redact, secret_values
from kubetune.storage import file_sha256
from kubetune.tracking import (
    DATASET_HASH_TAG,
    KFP_RUN_ID_TAG,
    KFP_RUN_NAME_TAG,
    MAX_PARAM_LENGTH,
    PIPELINE_VERSION_TAG,
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    Tracker,
    default_model_name,
    download_adapter,
    flatten_params,
    truncate,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- unit: names, values, flattening ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "aws_secret_access_key", "api-key", "WANDB_API_KEY", "hfToken",
     "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "AZURE_STORAGE_CONNECTION_STRING", "db.credentials", "AUTH"],
)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokenizer", "max_new_tokens", "num_tokens", "TOKENIZERS_PARALLELISM", "lora_r",
                                  "author", "keyboard", "persona", "PWD", "OLDPWD"])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_secret_values_from_environment():
    values = secret_values({"HF_TOKEN": "kt-secret-123456", "PATH": "/usr/bin", "SHORT_TOKEN": "abc",
                            "DB_PASSWORD": 'p"ss/w rd'})
    assert "kt-secret-123456" in values and "/usr/bin" not in values and "abc" not in values
    # the JSON-escaped and URL-quoted forms of a secret are matched as well
    assert 'p\\"ss/w rd' in values and "p%22ss%2Fw%20rd" in values
    assert values == sorted(values, key=len, reverse=True)


def test_redact_values_shapes_and_urls():
    assert redact("persona with kt-secret-123456 inside", ["kt-secret-123456"]) == f"persona with {REDACTED} inside"
    assert "hf_" not in redact("token hf_" + "a1B2" * 9)
    assert redact("Authorization: Bearer abcdefghijklmnop1234") == f"Authorization: Bearer {REDACTED}"
    assert redact("http://alice:s3cr3t@mlflow:5000/x") == f"http://alice:{REDACTED}@mlflow:5000/x"
    assert redact("plain text, 久咳不愈怎么治疗？") == "plain text, 久咳不愈怎么治疗？"


def test_flatten_params_prefixes_nesting_and_secret_names():
    flat = flatten_params(
        {"lora": {"lora_r": 16, "target_modules": "all-linear"}, "data": {"hf_token": "abc", "nested": {"x": 1}},
         "model": {"source": "/models/qwen", "api_key": ""}},
        secrets=["kt-secret-123456"],
    )
    assert flat["lora.lora_r"] == "16" and flat["lora.target_modules"] == "all-linear"
    assert flat["data.hf_token"] == REDACTED  # by name, whatever the value
    assert flat["data.nested.x"] == "1"
    assert flat["model.api_key"] == ""  # nothing to hide


def test_truncation_is_safe():
    secret = "kt-secret-123456"
    # a secret straddling the cut is redacted first, so no fragment of it survives truncation
    long_value = "x" * (MAX_PARAM_LENGTH - 30) + secret + "y" * 600
    flat = flatten_params({"data": {"persona": long_value}}, secrets=[secret])
    value = flat["data.persona"]
    assert len(value) <= MAX_PARAM_LENGTH and "truncated" in value
    assert "kt-secret" not in value and "123456" not in value
    # values that differ only beyond the cut stay distinguishable (the marker carries a hash)
    assert truncate("a" * 900 + "1") != truncate("a" * 900 + "2")
    chinese = "久咳不愈" * 300
    cut = truncate(chinese, 100)
    assert len(cut) <= 100 and cut.startswith("久咳不愈") and f"{len(chinese)} chars" in cut
    assert truncate("short") == "short"


def test_file_sha256(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"rows")
    assert file_sha256(tmp_path / "a.parquet") == hashlib.sha256(b"rows").hexdigest()
    assert len(file_sha256(tmp_path)) == 64
    assert file_sha256(tmp_path / "missing") == ""


def test_default_model_name():
    assert default_model_name("kubetune") == "kubetune-adapter"
    assert default_model_name("tcm 7b/run") == "tcm-7b-run-adapter"


# -- unit: the Tracker on a local store --------------------------------------------------------------------------
@pytest.fixture
def local_tracker(tmp_path, monkeypatch):
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit")
    assert tracker.try_open(run_name="unit", kfp_run_id="kfp-1", attempts=1)
    return tracker


def _artifact_files(tracker: Tracker, tmp_path: Path) -> dict[str, bytes]:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, tracking_uri=tracker.tracking_uri,
                                                     dst_path=str(tmp_path / "download")))
    return {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}


def test_tracker_redacts_everything_it_sends(local_tracker, tmp_path):
    secret = SECRET_ENV["HF_TOKEN"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "note": f"made with {secret}"}))
    (adapter / "weights.bin").write_bytes(b"\0\1binary" + secret.encode())
    (adapter / "clean.bin").write_bytes(b"\0\1clean")
    local_tracker.log_params({"data": {"persona": f"expert {secret}"}, "train": {"hf_token": secret}})
    local_tracker.set_tags({"note": f"tag {secret}"})
    local_tracker.log_metrics({f"odd {secret}": 1.0})
    local_tracker.log_text(f"text {secret} {SECRET_ENV['MLFLOW_TRACKING_PASSWORD']}", "notes/text.txt")
    local_tracker.log_table([{"prompt": f"p {secret}", "answer": "a"}], "eval/table.json")
    local_tracker.log_artifact(str(adapter), "adapter")
    assert local_tracker.finish(status="FINISHED", timeout_s=5) == ""

    run = local_tracker.client.get_run(local_tracker.run_id)
    everything = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
    files = _artifact_files(local_tracker, tmp_path)
    assert run.data.params["data.persona"] == f"expert {REDACTED}"
    assert run.data.params["train.hf_token"] == REDACTED
    assert "adapter/clean.bin" in files and "adapter/weights.bin" not in files  # binary holding a secret: left out
    assert json.loads(files["adapter/adapter_config.json"])["note"] == f"made with {REDACTED}"
    for value in SECRET_ENV.values():
        assert value not in everything
        assert not any(value.encode() in content for content in files.values())
    assert any("weights.bin" in error for error in local_tracker.errors)


def test_tracker_drops_rejected_calls_and_keeps_going(local_tracker):
    local_tracker.log_params({"lora": {"lora_r": 8}})
    local_tracker.log_params({"lora": {"lora_r": 16}})  # MLflow forbids changing a param: rejected, not retried
    local_tracker.log_metrics({"loss": 1.5}, step=1)
    assert local_tracker.finish(timeout_s=5) == ""
    run = local_tracker.client.get_run(local_tracker.run_id)
    assert run.data.params["lora.lora_r"] == "8" and run.data.metrics["loss"] == 1.5
    assert any("rejected log params" in error for error in local_tracker.errors)


def _tiny_peft_model(base_dir: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config), AutoTokenizer.from_pretrained(base_dir)


@pytest.mark.slow
def test_retried_step_reuses_run_and_model_version(local_tracker, tiny_model_dir, tmp_path):
    """The adapter is logged as an MLflow transformers model (adapter only, base referenced) with the eval
    metrics, registered once per run even when the step is retried, and loads back both ways."""
    import mlflow

    model, tokenizer = _tiny_peft_model(tiny_model_dir)
    log_model = dict(base_model=tiny_model_dir, base_path=tiny_model_dir, metrics={"tuned_eval_loss": 1.25},
                     name="unit-adapter", generation={"max_new_tokens": 4, "do_sample": False})
    local_tracker.set_tags({"kubetune.base_model": tiny_model_dir, "kubetune.lora_r": 4})
    local_tracker.log_adapter_model(model, tokenizer, **log_model)
    assert local_tracker.finish(status="FAILED", timeout_s=60) == ""  # the first attempt failed later on

    retry = Tracker(local_tracker.tracking_uri, "unit")
    assert retry.try_open(run_name="unit", kfp_run_id="kfp-1", attempts=1)  # found by the KFP run id tag
    assert retry.run_id == local_tracker.run_id
    assert retry.client.get_run(retry.run_id).info.status == "RUNNING"
    retry.log_adapter_model(model, tokenizer, **log_model)
    assert retry.finish(timeout_s=60) == ""
    assert retry.registered == local_tracker.registered == {"name": "unit-adapter", "version": "1"}
    version = retry.client.get_model_version("unit-adapter", "1")
    assert version.tags["kubetune.base_model"] == tiny_model_dir and version.tags["kubetune.lora_r"] == "4"
    assert version.source.startswith("models:/")

    adapter_dir = Path(download_adapter(retry.tracking_uri, "unit-adapter", version=1, dst_path=str(tmp_path)))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert not list(adapter_dir.rglob("model.safetensors"))  # the base weights are referenced, not copied
    with pytest.raises(KubetuneError, match="no adapter"):
        download_adapter(retry.tracking_uri, "unit-adapter", alias="missing")

    mlflow.set_tracking_uri(retry.tracking_uri)
    found = mlflow.search_logged_models(experiment_ids=[retry._experiment_id()], output_format="list")
    assert [m.model_id for m in found] == [version.source.removeprefix("models:/")]
    assert {m.key: m.value for m in found[0].metrics}["eval.tuned_eval_loss"] == 1.25
    generate = mlflow.transformers.load_model("models:/unit-adapter/1")
    assert type(generate.model).__name__.startswith("PeftModel")
    assert isinstance(generate("久咳不愈", max_new_tokens=4)[0]["generated_text"], str)


def test_tracker_survives_an_unreachable_server(monkeypatch):
    import socket
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker = Tracker(f"http://user:pw-1234567@127.0.0.1:{port}", "down")
    assert not tracker.try_open(run_name="r", attempts=1)
    tracker.log_params({"lora": {"lora_r": 8}})
    tracker.log_metrics({"loss": 1.0}, step=1)
    with tracker.system_metrics(sampling_interval_s=0.2):  # sampled all the same, queued for the server
        time.sleep(0.5)
    report = tracker.finish(status="FINISHED", timeout_s=0)
    assert "not delivered" in report and "pw-1234567" not in report
    queued = [what for what, _ in tracker.pending]
    assert queued[:2] == ["log params", "log metrics"] and queued.count("log metrics") >= 3 and queued[-1] == "end run"


def test_system_metrics_on_local_store(local_tracker):
    import time

    with local_tracker.system_metrics(sampling_interval_s=0.5):
        time.sleep(1.2)
    metrics = local_tracker.client.get_run(local_tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


# -- end to end: two pipeline runs on a real server --------------------------------------------------------------
def _client(runs):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=runs.uri, registry_uri=runs.uri)


def _executor_output(summary: dict, artifact: str) -> dict:
    """Metadata KFP recorded for an output artifact of the local run (adapter: train-lora, report: evaluate)."""
    task = {"adapter": "train-lora", "report": "evaluate-model"}[artifact]
    path = Path(summary["adapter"]).parent.parent / task / "executor_output.json"
    outputs = json.loads(path.read_text())["artifacts"][artifact]["artifacts"][0]
    return outputs.get("metadata", {})


def _train_parquet(summary: dict) -> Path:
    """The training set this run's SFT read: prepared in its own run, or in the latest earlier one when prep was
    served from kfp.local's cache (same inputs and dataset version)."""
    run_dir = Path(summary["adapter"]).parent.parent
    prepared = [path for path in sorted(run_dir.parent.glob("*/prepare-dataset/train_data"))
                if path.parent.parent.name <= run_dir.name]
    return prepared[-1]


@pytest.mark.slow
def test_runs_are_linked_to_kfp(pipeline_runs):
    client = _client(pipeline_runs)
    experiment = client.get_experiment_by_name(pipeline_runs.experiment)
    runs = [client.get_run(run_id) for run_id in pipeline_runs.run_ids]
    assert len(set(pipeline_runs.run_ids)) == 2  # the same pipeline twice: two runs ...
    assert {run.info.experiment_id for run in runs} == {experiment.experiment_id}  # ... in one experiment
    kfp_ids = {run.data.tags[KFP_RUN_ID_TAG] for run in runs}
    assert len(kfp_ids) == 2 and all(kfp_ids)
    for run, summary in zip(runs, pipeline_runs.summaries, strict=True):
        assert run.info.status == "FINISHED"
        assert run.data.tags[PIPELINE_VERSION_TAG] == __version__
        assert run.data.tags[KFP_RUN_NAME_TAG] == run.info.run_name != ""
        url = f"{pipeline_runs.uri}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        for artifact in ("adapter", "report"):
            metadata = _executor_output(summary, artifact)
            assert metadata["mlflow_run_id"] == run.info.run_id
            assert metadata["mlflow_run_url"] == url


@pytest.mark.slow
def test_params_are_flat_prefixed_and_complete(pipeline_runs):
    client = _client(pipeline_runs)
    for rank, summary in zip(LORA_RANKS, pipeline_runs.summaries, strict=True):
        params = client.get_run(summary["mlflow_run_id"]).data.params
        prefixes = {name.split(".", 1)[0] for name in params}
        assert {"data", "model", "lora", "train", "eval", "speed"} <= prefixes
        assert params["lora.lora_r"] == str(rank)
        assert params["train.max_steps"] == "3"
        assert params["model.quant_quantization"] == "nf4"
        assert params["data.train_sha256"] == file_sha256(_train_parquet(summary))
        assert all(len(value) <= MAX_PARAM_LENGTH for value in params.values())


@pytest.mark.slow
def test_training_and_system_metrics(pipeline_runs):
    client = _client(pipeline_runs)
    for run_id in pipeline_runs.run_ids:
        for key in ("train.loss", "train.learning_rate", "train.grad_norm", "train.tokens_per_second",
                    "train.tokens_seen"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == [1, 2, 3], key  # one point per logging step
        metrics = client.get_run(run_id).data.metrics
        assert {"eval.tuned_eval_loss", "eval.base_eval_loss", "eval.tuned_chrf", "sft.tokens_per_second"} <= set(metrics)
        # system metrics of the SFT step; CPU and memory here, GPU utilisation/memory where nvidia-ml-py sees one
        assert "system/cpu_utilization_percentage" in metrics
        assert "system/system_memory_usage_megabytes" in metrics


@pytest.mark.slow
def test_artifacts_report_table_and_plots(pipeline_runs, tmp_path):
    import mlflow

    client = _client(pipeline_runs)
    for run_id in pipeline_runs.run_ids:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=pipeline_runs.uri,
                                                         dst_path=str(tmp_path / run_id)))
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "eval/answers.json",
                     "eval/report.html", "plots/loss_curve.png", "plots/eval_base_vs_tuned.png"):
            assert (local / name).is_file(), name
        table = json.loads((local / "eval/answers.json").read_text())
        assert {"kind", "prompt", "reference", "base_answer", "tuned_answer"} <= set(table["columns"])
        assert "<html" in (local / "eval/report.html").read_text().lower()
        for png in (local / "plots").glob("*.png"):
            assert png.read_bytes()[:8] == PNG_MAGIC
        from PIL import Image

        with Image.open(local / "plots/loss_curve.png") as image:
            assert image.width > 100 and image.height > 100
        assert client.get_run(run_id).data.tags.get("mlflow.loggedArtifacts")


@pytest.mark.slow
def test_adapter_registered_with_lineage_tags_and_loads_back(pipeline_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = _client(pipeline_runs)
    name = default_model_name(pipeline_runs.experiment)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == pipeline_runs.run_ids  # one new version per pipeline run
    for version, summary in zip(versions, pipeline_runs.summaries, strict=True):
        tags = version.tags
        assert tags["kubetune.base_model"] == summary["base_model"]
        assert tags["kubetune.quantization"] == "nf4" and tags["kubetune.double_quant"] == "True"
        assert tags[DATASET_HASH_TAG] == file_sha256(_train_parquet(summary))
        assert tags[KFP_RUN_ID_TAG]
        run_tags = client.get_run(version.run_id).data.tags
        assert run_tags[REGISTERED_MODEL_TAG] == name and run_tags[REGISTERED_VERSION_TAG] == version.version
        assert "download_adapter" in version.description

    # the documented way back: download the version, attach it to the base model
    adapter_dir = download_adapter(pipeline_runs.uri, name, version=versions[0].version, dst_path=str(tmp_path))
    assert json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"] == LORA_RANKS[0]
    base = AutoModelForCausalLM.from_pretrained(pipeline_runs.summaries[0]["base_model"])
    model = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    latest = download_adapter(pipeline_runs.uri, name, dst_path=str(tmp_path / "latest"))
    assert json.loads((Path(latest) / "adapter_config.json").read_text())["r"] == LORA_RANKS[1]


@pytest.mark.slow
def test_planted_secrets_appear_nowhere(pipeline_runs, tmp_path):
    import mlflow

    client = _client(pipeline_runs)
    seen: list[str] = []
    blobs: list[bytes] = []
    for run_id in pipeline_runs.run_ids:
        run = client.get_run(run_id)
        seen += [run.info.run_name, json.dumps(run.data.params, ensure_ascii=False),
                 json.dumps(run.data.tags, ensure_ascii=False), *run.data.metrics]
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=pipeline_runs.uri,
                                                         dst_path=str(tmp_path / run_id)))
        blobs += [path.read_bytes() for path in local.rglob("*") if path.is_file()]
        # the persona was logged, with the secret in it redacted
        assert f"(key {REDACTED})" in run.data.params["data.persona"]
        answers = json.loads((local / "eval/answers.json").read_text())
        assert any(REDACTED in json.dumps(row, ensure_ascii=False) for row in answers["data"])
    for model in client.search_registered_models():
        seen += [model.name, model.description or "", json.dumps(model.tags)]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            seen += [version.description or "", version.source, json.dumps(version.tags, ensure_ascii=False)]
    # and the server's own storage: the database file and every stored artifact, byte for byte
    server = pipeline_runs.server
    blobs += [server.db_path.read_bytes()]
    blobs += [path.read_bytes() for path in server.artifacts_dir.rglob("*") if path.is_file()]
    assert len(blobs) > 10
    for secret in SECRET_ENV.values():
        assert not any(secret in text for text in seen), secret
        assert not any(secret.encode() in blob for blob in blobs), secret
