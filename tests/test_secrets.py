"""Secrets stay secret, and loading is safe.

Secrets: credentials planted in the environment, and the same values planted in the persona parameter and in one
dataset row, appear in no log of a local run, no file of its kfp.local outputs or MLflow store, and no compiled YAML.

MLflow records on a real tracking server are checked in test_tracking (test_planted_secrets_appear_nowhere); this
file covers logs, kfp.local outputs (datasets included, read cell by cell since parquet compresses) and YAML.

The one place a secret typed into a parameter does show: KFP's own executor log of the step's inputs ("Got
executor_input"), as the Kubeflow UI shows every parameter. Parameters are not for secrets (kubetune takes
credentials from the environment or Kubernetes Secrets only); the test pins that this echo is the only occurrence.

Safe loading: every model, tokenizer and config load keeps remote code off unless the caller opts in and reads
safetensors only; nothing unpickles (torch.load, pickle); an adapter is read from its safetensors file even when a
pickle lies beside it. (Refused inputs, such as a model that ships code or has only .bin weights, are in
test_bad_inputs.)
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from kubetune.secrets import REDACTED, is_secret_name, secret_values

SECRETS = {
    "HF_TOKEN": "kt-hf-5ecret-0001",
    "MLFLOW_TRACKING_PASSWORD": "kt-mlflow-pw-0002",
    "AWS_SECRET_ACCESS_KEY": "kt-aws-5ecret/0003+x",
    "KT_API_KEY": "s3cr3t",  # short: one redaction policy for datasets, logs, reports and MLflow alike
}
PERSONA = f"You are a careful TCM physician (key {SECRETS['HF_TOKEN']}, {SECRETS['AWS_SECRET_ACCESS_KEY']})."
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "kubetune" / "sample_data" / "tcm_demo.jsonl"
SOURCES = sorted([*REPO.glob("kubetune/**/*.py"), *REPO.glob("components/*.py"), *REPO.glob("pipelines/*.py")])


def _needles() -> list[str]:
    """Each secret as written, JSON-escaped and URL-quoted."""
    return secret_values(SECRETS)


def _readable(path: Path) -> bytes:
    """A file's bytes, or for parquet (compressed) the text of every cell."""
    data = path.read_bytes()
    if data[:4] != b"PAR1":
        return data
    import pyarrow.parquet as pq

    return json.dumps(pq.read_table(path).to_pylist(), ensure_ascii=False, default=str).encode()


def _files_with_secrets(root: Path) -> list[str]:
    needles = [n.encode() for n in _needles()]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and any(n in _readable(p) for n in needles))


@pytest.fixture
def planted(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.slow
def test_local_run_logs_and_outputs_hold_no_secret(planted, tmp_path, capfd, caplog):
    from kubetune.cli.run import run_local

    rows = SAMPLE.read_text(encoding="utf-8").splitlines()[:40]
    rows.append(json.dumps({"instruction": "How do I log in?",
                            "output": f"Use the password {SECRETS['MLFLOW_TRACKING_PASSWORD']} on the portal."}))
    rows.append(json.dumps({"instruction": "And the API?", "output": f"The key is {SECRETS['KT_API_KEY']}."}))
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("\n".join(rows) + "\n", encoding="utf-8")
    workdir = tmp_path / "work"
    caplog.set_level("INFO")
    probe = f"My token is {SECRETS['HF_TOKEN']}: is it safe?"  # a secret in a probe question, shown in the report
    run_local({"dataset": str(dataset), "persona": PERSONA, "max_length": 256, "max_steps": 2, "save_steps": 0,
               "max_eval_samples": 4, "max_generation_samples": 2, "max_new_tokens": 8,
               "probe_questions": [probe]}, workdir)
    out, err = capfd.readouterr()
    (run_log,) = (workdir / "logs").glob("run-*.log")  # every step's full log
    log = "\n".join([out, err, caplog.text, run_log.read_text(encoding="utf-8")])

    # Logs: not even KFP's echoes of the parameters as given (the persona for prep, the probe question for
    # evaluation) hold a secret: the console redacts them before the terminal or the log file sees them.
    assert [line for line in log.splitlines() if any(n in line for n in _needles())] == []
    assert '"persona": "You are a careful TCM physician (key ***' in log
    assert "prep: the persona holds the value of a secret environment variable" in log

    # Every file the run wrote: kfp.local outputs (datasets, model, adapter, report, metadata) and the MLflow store.
    assert _files_with_secrets(workdir) == []

    # What was written instead: the redacted persona in the prompts, the redacted row counted.
    prep = next(workdir.glob("outputs/*/prepare-dataset"))
    prompts = [row["prompt"] for row in json.loads(_readable(prep / "train_data"))]
    assert all(f"(key {REDACTED}, {REDACTED})" in prompt for prompt in prompts)
    artifacts = json.loads((prep / "executor_output.json").read_text())["artifacts"]
    assert artifacts["train_data"]["artifacts"][0]["metadata"]["persona"] == (
        f"You are a careful TCM physician (key {REDACTED}, {REDACTED}).")
    assert artifacts["stats"]["artifacts"][0]["metadata"]["redacted_secret_rows"] == 2
    report = next(workdir.glob("outputs/*/evaluate-model")) / "report"
    assert f"My token is {REDACTED}" in report.read_text(encoding="utf-8")


def test_compiled_yaml_holds_no_secret(planted, tmp_path, monkeypatch):
    """Credentials in the environment, in the MLflow URI and in a command-line token reach no compiled YAML; the
    YAML names Kubernetes Secrets instead, and no pipeline parameter is for a secret."""
    import yaml

    from kubetune.cli import main
    from kubetune.cli.component_yaml import default_directory

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRETS['MLFLOW_TRACKING_PASSWORD']}@mlflow:5000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    token = "kt-cli-token-0004"
    assert main(["compile", "-o", str(tmp_path / "kfp.yaml")]) == 0
    assert main(["argo", "-o", str(tmp_path / "argo.yaml"), "--token", token]) == 0
    texts = {name: (tmp_path / name).read_text(encoding="utf-8") for name in ("kfp.yaml", "argo.yaml")}
    texts |= {path.name: path.read_text(encoding="utf-8") for path in default_directory().glob("*.yaml")}
    for name, text in texts.items():
        for needle in [*_needles(), token, "alice"]:
            assert needle not in text, f"{needle} in {name}"

    kfp_text, argo_text = texts["kfp.yaml"], texts["argo.yaml"]
    for secret_name, key in (("kubetune-hub", "HF_TOKEN"), ("kubetune-mlflow", "MLFLOW_TRACKING_PASSWORD"),
                             ("kubetune-object-store", "AWS_SECRET_ACCESS_KEY")):
        assert f"secretName: {secret_name}" in kfp_text and f"secretKey: {key}" in kfp_text
        assert f"name: {secret_name}\n            key: {key}" in argo_text
    spec = next(doc for doc in yaml.safe_load_all(kfp_text) if doc and "root" in doc)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters and not [name for name in parameters if is_secret_name(name)]


# -- safe loading ----------------------------------------------------------------------------------------------
def _calls(attribute: str):
    """(file:line, receiver, keywords) of every ``<receiver>.<attribute>(...)`` call in the package's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute:
                yield (f"{path.relative_to(REPO)}:{node.lineno}", ast.unparse(node.func.value),
                       {k.arg: k.value for k in node.keywords})


def test_every_hub_load_keeps_remote_code_off_and_reads_safetensors():
    loads = list(_calls("from_pretrained"))
    auto = [load for load in loads if load[1].startswith("Auto")]
    assert len(auto) >= 4  # tokenizer, config, model (quantize and load)
    for where, receiver, keywords in auto:
        flag = keywords.get("trust_remote_code")
        assert flag is not None, f"{where}: {receiver}.from_pretrained without trust_remote_code"
        assert not (isinstance(flag, ast.Constant) and flag.value is True), f"{where}: remote code always on"
        if receiver.startswith("AutoModel"):
            safetensors = keywords.get("use_safetensors")
            assert isinstance(safetensors, ast.Constant) and safetensors.value is True, f"{where}: not safetensors-only"
    for where, _, keywords in _calls("load_dataset"):
        assert "trust_remote_code" not in keywords, f"{where}: dataset scripts run code"
    assert {receiver for _, receiver, _ in loads} <= {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM",
                                                       "PeftModel"}


def test_nothing_unpickles():
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cloudpickle", "dill", "joblib"} & set(names), f"{path}:{node.lineno}"
            if isinstance(node, ast.Call):
                call = ast.unparse(node.func)
                assert call not in {"torch.load", "pickle.load", "pickle.loads", "np.load", "numpy.load"}, (
                    f"{path.relative_to(REPO)}:{node.lineno}: {call}")
                assert not any(k.arg == "weights_only" for k in node.keywords), f"{path}:{node.lineno}"


def test_adapter_is_read_from_safetensors_even_with_a_pickle_beside_it(tiny_model_dir, tmp_path):
    """evaluate's loading path (check_adapter_dir, then PeftModel.from_pretrained) with a booby-trapped
    adapter_model.bin beside the safetensors weights: the pickle is never run."""
    import pickle

    from peft import LoraConfig, PeftModel, get_peft_model

    from kubetune.evaluate import check_adapter_dir
    from kubetune.modeling import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    assert (adapter / "adapter_model.safetensors").is_file()

    class Trap:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "PICKLE_RAN", "ran"))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Trap()))
    check_adapter_dir(str(adapter))
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert not (tmp_path / "PICKLE_RAN").exists()
