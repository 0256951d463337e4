"""Bad input, in one table: each case is one clear KubetuneError (or, from the command line, exit status 2 with the
message on stderr and no traceback) that names the problem and says how to fix it ("Fix:"), and leaves nothing
half-written where the step's outputs go.

The cases call the step entry points (prep, quantize, train, load, tracking) with one thing wrong. Detailed
behaviour of each check (exact counts, other formats) is tested beside its module (test_data, test_sft, ...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune.config import DataConfig, EvalConfig, LoraSettings, QuantConfig, TrainConfig
from kubetune.errors import KubetuneError
from kubetune.parameters import validate_parameters


@dataclass
class Ctx:
    """What a case may use: a scratch folder, the output folder to check, and the shared fixtures (made lazily)."""

    tmp: Path
    out: Path
    request: pytest.FixtureRequest

    @property
    def tokenizer(self):
        return self.request.getfixturevalue("tokenizer")

    @property
    def tiny_model(self) -> str:
        return self.request.getfixturevalue("tiny_model_dir")

    def jsonl(self, rows: list[Any], name: str = "data.jsonl") -> str:
        path = self.tmp / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                                for r in rows), encoding="utf-8")
        return str(path)

    def prep(self, dataset: str, **settings: Any):
        from kubetune.data import prepare_dataset

        return prepare_dataset(DataConfig(dataset=dataset, **settings), self.tokenizer, str(self.out / "train.parquet"),
                               str(self.out / "eval.parquet"))

    def quantize(self, source: str, quant: QuantConfig | None = None):
        from kubetune.modeling import quantize_model

        return quantize_model(source, str(self.out / "model"), quant or QuantConfig())

    def train(self, model_dir: str, *, lora: LoraSettings | None = None, train: TrainConfig | None = None):
        from kubetune.sft import train_lora

        return train_lora(model_dir, str(self.tmp / "train.parquet"), str(self.out / "adapter"),
                          lora=lora or LoraSettings(), train=train or TrainConfig(max_steps=1), max_length=256,
                          checkpoint_dir=str(self.out / "adapter.checkpoints"))

    def model_dir(self, name: str, files: dict[str, str | bytes], config: dict | None = None) -> str:
        """A copy of the tiny model's config (optionally changed) plus ``files``."""
        path = self.tmp / name
        path.mkdir()
        base = json.loads((Path(self.tiny_model) / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**base, **(config or {})}))
        for file, content in files.items():
            (path / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)


def _alpaca(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"久咳不愈怎么治疗？ {i}", "input": "", "output": f"滋阴润肺，方用沙参麦冬汤。 {i}"}
            for i in range(n)]


def _remote_code_model(ctx: Ctx) -> str:
    """A model directory whose config asks for its own Python code, which would leave a mark if it ever ran."""
    tiny = Path(ctx.tiny_model)
    files = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file() and p.name != "config.json"}
    files["modeling_custom.py"] = (
        f"import pathlib\npathlib.Path({str(ctx.tmp / 'CODE_RAN')!r}).write_text('ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n    model_type = 'kubetune_custom'\n"
        "class CustomForCausalLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n"
    )
    return ctx.model_dir("custom-code", files, {
        "model_type": "kubetune_custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    })


def _load_remote_code_model(ctx: Ctx) -> None:
    from kubetune.modeling import load_model

    try:
        load_model(_remote_code_model(ctx))
    finally:
        assert not (ctx.tmp / "CODE_RAN").exists()  # refused before any of its code ran


def _require_gpu(ctx: Ctx) -> None:
    import torch

    from kubetune.modeling import REQUIRE_GPU_ENV, load_model

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ctx.request.getfixturevalue("monkeypatch").setenv(REQUIRE_GPU_ENV, "nvidia.com/gpu")
    load_model(ctx.tiny_model)


def _unreadable_table(ctx: Ctx) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kubetune.data import load_prepared

    pq.write_table(pa.table({"text": ["x"]}), ctx.tmp / "other.parquet")
    load_prepared(str(ctx.tmp / "other.parquet"))


def _check_adapter(ctx: Ctx) -> None:
    from kubetune.evaluate import check_adapter_dir

    (ctx.tmp / "adapter").mkdir()
    (ctx.tmp / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    check_adapter_dir(str(ctx.tmp / "adapter"))


def _tracking_uri(ctx: Ctx, uri: str = "mlflow.example.com:5000") -> None:
    from kubetune.tracking import resolve_tracking_uri

    resolve_tracking_uri(uri)


def _columns(ctx: Ctx) -> None:
    from kubetune.steps import parse_columns

    parse_columns("instruction")


def _tiny_copy(ctx: Ctx, name: str, *, truncate: str = "", config: dict | None = None) -> str:
    tiny = Path(ctx.tiny_model)
    files = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file() and p.name != "config.json"}
    if truncate:
        files[truncate] = files[truncate][:1000]
    return ctx.model_dir(name, files, config)


def _write(ctx: Ctx, name: str, text: str) -> str:
    (ctx.tmp / name).write_text(text, encoding="utf-8")
    return str(ctx.tmp / name)


def _mixed_folder(ctx: Ctx) -> None:
    folder = ctx.tmp / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _alpaca(4)))
    chat = [{"messages": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"答{i}"}]}
            for i in range(4)]
    (folder / "b.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat))
    ctx.prep(str(folder))


def _gzipped_jsonl(ctx: Ctx) -> None:
    import gzip

    (ctx.tmp / "gz.jsonl").write_bytes(gzip.compress(json.dumps(_alpaca(1)[0]).encode() + b"\n"))
    ctx.prep(str(ctx.tmp / "gz.jsonl"))


def _broken_adapter_config(ctx: Ctx) -> None:
    from kubetune.evaluate import check_adapter_dir

    (ctx.tmp / "adapter").mkdir()
    (ctx.tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (ctx.tmp / "adapter" / "adapter_config.json").write_text('{"r": 8,')
    check_adapter_dir(str(ctx.tmp / "adapter"))


def _prepare_into(ctx: Ctx, train_path: Path) -> None:
    from kubetune.steps import prepare

    (ctx.tmp / "a-file").write_text("")
    prepare(DataConfig(), ctx.tiny_model, str(train_path), str(ctx.out / "eval.parquet"))


def _self_link(ctx: Ctx) -> None:
    link = ctx.tmp / "loop.jsonl"
    link.symlink_to(link)
    ctx.prep(str(link))


def _tiny_model_over_user_files(ctx: Ctx) -> None:
    from kubetune.tiny import make_tiny_model

    folder = ctx.tmp / "my-notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    try:
        make_tiny_model(folder)
    finally:
        assert (folder / "notes.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def _adapter_over_model(ctx: Ctx) -> None:
    from kubetune.steps import TrainJob, train

    model = ctx.request.getfixturevalue("quantized_model_dir")
    before = sorted(p.name for p in Path(model).iterdir())
    try:
        train(TrainJob(model, str(ctx.tmp / "train.parquet"), model, checkpoint_dir=str(ctx.tmp / "ckpt")))
    finally:
        assert sorted(p.name for p in Path(model).iterdir()) == before


def _same_split_paths(ctx: Ctx) -> None:
    from kubetune.steps import prepare

    prepare(DataConfig(), ctx.tiny_model, str(ctx.out / "data.parquet"), str(ctx.out / "data.parquet"))


def _write_dir(path: Path, *, file_first: bool) -> None:
    from kubetune.storage import atomic_dir

    if file_first:
        path.write_text("the user's file")
    try:
        with atomic_dir(path):
            pass
    finally:
        assert path.read_text() == "the user's file"


def _tokenizer_without_files(ctx: Ctx) -> None:
    from kubetune.modeling import load_tokenizer

    tiny = Path(ctx.tiny_model)
    keep = {"config.json", "generation_config.json", "model.safetensors"}
    load_tokenizer(ctx.model_dir("no-tokenizer", {p.name: p.read_bytes() for p in tiny.iterdir() if p.name in keep}))


@dataclass
class Bad:
    name: str
    run: Callable[[Ctx], Any]
    problem: str  # regex searched in the problem
    fix: str  # regex searched in the fix


def _review_as(name: str):
    from kubetune.review import ReviewSession

    ReviewSession("sqlite:///unused.db", "0" * 32, reviewer=name)  # refused before any store is read


CASES = [
    # dataset
    Bad("unknown dataset path", lambda c: c.prep(str(c.tmp / "nowhere" / "data.jsonl")),
        r"nowhere/data\.jsonl is neither an existing file or folder nor a URI", r"check the path.*s3://"),
    Bad("unknown URI scheme", lambda c: c.prep("foo://bucket/data.jsonl"),
        r"unknown URI scheme foo://", r"s3://, gs://"),
    Bad("unknown bundled dataset", lambda c: c.prep("kubetune://nope"),
        r"no bundled dataset kubetune://nope", r"kubetune://tcm-demo"),
    Bad("malformed JSONL", lambda c: c.prep(c.jsonl([*_alpaca(2), '{"instruction": "久咳",}', *_alpaca(2)])),
        r"data\.jsonl: line 3 is not valid JSON", r"fix or remove line 3"),
    Bad("wrong type in a column",
        lambda c: c.prep(c.jsonl([*_alpaca(2), {"instruction": "久咳", "output": 42}])),
        r"column 'output' holds a number at row 2", r"make every value of 'output' a string"),
    Bad("missing columns", lambda c: c.prep(c.jsonl([{"instruction": "久咳", "reply": "润肺"}])),
        r"no column for: output .*Columns found: instruction, reply", r"columns=instruction=question,output=answer"),
    Bad("empty after cleaning",
        lambda c: c.prep(c.jsonl([{"instruction": "a", "output": ""}, {"instruction": "b", "output": "长" * 500},
                                  {"instruction": "b", "output": "长" * 500}]), max_length=32, length_policy="drop"),
        r"no rows left .*3 rows in, 1 with an empty answer, 1 duplicates, 1 longer than max_length=32",
        r"raise max_length.*length_policy=truncate"),
    Bad("unknown dataset format", lambda c: c.prep("kubetune://tcm-demo", dataset_format="xml"),
        r"dataset_format='xml' is not one of auto, alpaca, chat, prompt_completion", r"set dataset_format"),
    Bad("eval fraction 0", lambda c: c.prep("kubetune://tcm-demo", eval_fraction=0.0),
        r"eval_fraction=0.0 is outside \(0, 1\)", r"0\.1"),
    Bad("eval fraction 1.5", lambda c: c.prep("kubetune://tcm-demo", eval_fraction=1.5),
        r"eval_fraction=1.5 is outside \(0, 1\)", r"0\.1"),
    Bad("max length too small", lambda c: c.prep("kubetune://tcm-demo", max_length=8),
        r"max_length=8 is too small", r"at least 16"),
    Bad("bad column mapping", _columns, r"'instruction' is not ROLE=COLUMN", r"instruction=question"),
    Bad("not a prepared dataset", _unreadable_table, r"not a prepared dataset: columns .* missing \(found text\)",
        r"written by the dataset prep step"),
    # model
    Bad("unknown base model path", lambda c: c.quantize(str(c.tmp / "models" / "missing")),
        r"base model path .*models/missing does not exist", r"volume .* is mounted"),
    Bad("model directory without weights",
        lambda c: c.quantize(c.model_dir("no-weights", {"pytorch_model.bin": b"pickle"})),
        r"holds no \*\.safetensors weights \(found: config\.json, pytorch_model\.bin\)",
        r"safe_serialization=True"),
    Bad("model directory without config", lambda c: c.quantize(str(c.tmp)),
        r"has no config\.json", r"save_pretrained"),
    Bad("hub model unreachable", lambda c: c.quantize("nobody-here/no-such-model"),
        r"could not load a tokenizer from nobody-here/no-such-model@main", r"network access to the hub"),
    Bad("model with its own code", _load_remote_code_model,
        r"ships its own Python code .* trust_remote_code is off", r"trust_remote_code=true"),
    Bad("unknown quantization", lambda c: c.quantize(c.tiny_model, QuantConfig(quantization="int4")),
        r"quantization='int4' is not one of nf4, fp4, none", r"set quantization"),
    Bad("no GPU where the placement demands one", _require_gpu,
        r"placed on a GPU \(KUBETUNE_REQUIRE_GPU=nvidia.com/gpu\) but PyTorch sees none", r"nvidia-smi"),
    # training
    Bad("target modules matching nothing", lambda c: c.train(c.tiny_model, lora=LoraSettings(target_modules="qkv")),
        r"target_modules qkv match no linear layer", r"all-linear or some of: .*q_proj.*v_proj"),
    Bad("LoRA rank 0", lambda c: c.train(c.tiny_model, lora=LoraSettings(lora_r=0)),
        r"lora_r=0 must be positive", r"8, 16 or 64"),
    Bad("LoRA rank negative", lambda c: c.train(c.tiny_model, lora=LoraSettings(lora_r=-4)),
        r"lora_r=-4 must be positive", r"8, 16 or 64"),
    Bad("learning rate 0", lambda c: c.train(c.tiny_model, train=TrainConfig(learning_rate=0)),
        r"learning_rate=0 must be positive", r"2e-4"),
    Bad("learning rate negative", lambda c: c.train(c.tiny_model, train=TrainConfig(learning_rate=-1e-4)),
        r"learning_rate=-0.0001 must be positive", r"2e-4"),
    Bad("no checkpoint kept", lambda c: c.train(c.tiny_model, train=TrainConfig(save_total_limit=0)),
        r"save_total_limit=0 keeps no checkpoint", r"at least 1"),
    Bad("adapter without safetensors", _check_adapter,
        r"has no adapter_config\.json / adapter_model\.safetensors \(found: adapter_model\.bin\)",
        r"safetensors"),
    Bad("evaluation settings", lambda c: EvalConfig(max_new_tokens=0).validate(),
        r"max_new_tokens=0 must be positive", r"256"),
    Bad("generation settings, all named in one error",
        lambda c: EvalConfig(reasoning="maybe", thinking_budget=0, temperature=-1, top_p=0, repetition_penalty=0,
                             train_probe_samples=-1).validate(),
        r"6 problems:\n.*train_probe_samples=-1 .*reasoning='maybe' .*thinking_budget=0 .*temperature=-1 .*top_p=0 "
        r".*repetition_penalty=0", r"0 for none.*reasoning=auto.*1024.*greedy.*0\.95.*1 for none"),
    Bad("reviewer name that cannot name a file", lambda c: _review_as("dr li/2"),
        r"reviewer name 'dr li/2' is not a short word", r"letters, digits"),
    Bad("pipeline parameters, all checked before a run",
        lambda c: validate_parameters({"lora_r": 0, "eval_fraction": 2.0, "length_policy": "trunc", "seed": 1}),
        r"3 problems:\n.*eval_fraction=2.0 .*length_policy='trunc' .*lora_r=0", r"0\.1.*drop, truncate.*8, 16"),
    # tracking
    Bad("MLflow URI that is not a URI", _tracking_uri, r"has no scheme .*'mlflow.example.com:5000'", r"http\(s\)://"),
    Bad("MLflow URI of a scheme MLflow cannot store in", lambda c: _tracking_uri(c, "ftp://files.example.com/mlflow"),
        r"the scheme ftp://, which MLflow cannot store runs in", r"MLflow stores: http, https, sqlite"),
    # round two: never destroy the user's data
    Bad("tiny model over a folder of the user's", _tiny_model_over_user_files,
        r"already holds files that kubetune did not write", r"choose a new output path"),
    Bad("adapter written over the model it trains", _adapter_over_model,
        r"output adapter .* overlaps input model", r"give adapter a path of its own"),
    Bad("train and eval sets at one path", _same_split_paths,
        r"outputs train_data and eval_data are the same path", r"different paths"),
    Bad("folder output over a file", lambda c: _write_dir(c.tmp / "a-file", file_first=True),
        r"is an existing file, and this output is a folder", r"choose a new output path"),
    # round two: no training on garbage
    Bad("model folder without tokenizer files", _tokenizer_without_files,
        r"has 1 token\(s\): the model has no tokenizer files", r"copy the base model's tokenizer files"),
    Bad("max_samples leaving no eval rows", lambda c: c.prep("kubetune://tcm-demo", max_samples=1),
        r"1 row\(s\) are left after cleaning and max_samples: training and evaluation need at least one row each",
        r"raise max_samples"),
    # round two: every setting checked up front
    Bad("learning rate not a number", lambda c: TrainConfig(learning_rate=float("nan")).validate(),
        r"learning_rate=nan is not a finite number", r"finite value"),
    Bad("infinite epochs", lambda c: TrainConfig(num_epochs=float("inf")).validate(),
        r"num_epochs=inf is not a finite number", r"finite value"),
    Bad("negative seed", lambda c: DataConfig(seed=-1).validate(), r"seed=-1 is negative", r"42"),
    Bad("unknown scheduler", lambda c: TrainConfig(lr_scheduler="cosinus").validate(),
        r"lr_scheduler='cosinus' is not one of linear, cosine", r"set lr_scheduler"),
    Bad("absurd LoRA rank", lambda c: LoraSettings(lora_r=100000).validate(),
        r"lora_r=100000 is far larger than any useful LoRA rank", r"at most 2048"),
    # round two: broken files and places, one error each
    Bad("truncated safetensors", lambda c: c.quantize(_tiny_copy(c, "truncated", truncate="model.safetensors")),
        r"the weights of .*truncated are damaged or incomplete", r"copy or download the model again"),
    Bad("unknown model_type", lambda c: c.quantize(_tiny_copy(c, "unknown-type", config={"model_type": "no_such"})),
        r"has a model_type that this transformers .* does not know", r"check model_type in its config\.json"),
    Bad("duplicate CSV header", lambda c: c.prep(_write(c, "dup.csv", "instruction,output,output\na,b,c\nd,e,f\n")),
        r"dup\.csv: the header names column\(s\) output more than once", r"a name of its own"),
    Bad("dataset link to itself", _self_link, r"is a link that leads nowhere", r"point dataset at the real file"),
    Bad("a folder mixing formats", _mixed_folder, r"mixes formats: it reads as chat .* no row of a\.jsonl has that column",
        r"keep one format per folder"),
    Bad("gzip bytes in a .jsonl", _gzipped_jsonl, r"gz\.jsonl is gzip-compressed, not JSON text", r"decompress it first"),
    Bad("adapter_config.json that is not JSON", _broken_adapter_config,
        r"adapter_config\.json is not valid JSON", r"restore the adapter"),
    Bad("output below a file", lambda c: _prepare_into(c, c.tmp / "a-file" / "train.parquet"),
        r"output train_data .* cannot be created: .*a-file is a file", r"a path in a folder"),
    Bad("tracking URI without a scheme, as a parameter",
        lambda c: validate_parameters({"mlflow_tracking_uri": "mlflow.example.com:5000"}),
        r"mlflow_tracking_uri has no scheme", r"http\(s\)://host:port"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune.tiny import make_tokenizer

    return make_tokenizer()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_error(case: Bad, tmp_path, request):
    ctx = Ctx(tmp_path / "work", tmp_path / "out", request)
    ctx.tmp.mkdir()
    with pytest.raises(KubetuneError) as error:
        case.run(ctx)
    message = str(error.value)
    assert "\n  Fix: " in message, message
    assert re.search(case.problem, error.value.problem, re.S), message
    assert re.search(case.fix, error.value.fix, re.S), message
    leftovers = [str(p) for p in ctx.out.rglob("*")] if ctx.out.exists() else []
    assert leftovers == [], f"half-written outputs left: {leftovers}"


def test_the_table_covers_the_issue():
    assert len(CASES) >= 15 and len({case.name for case in CASES}) == len(CASES)


# -- handled without an error: long rows, an unreachable tracking server ---------------------------------------
def test_rows_longer_than_max_length_are_truncated_and_counted(tmp_path, tokenizer):
    from kubetune.data import prepare_dataset

    rows = _alpaca(6) + [{"instruction": "久咳", "output": "长" * 400}, {"instruction": "痰多", "output": "短" * 400}]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    train, evaluation = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    settings = {"dataset": str(tmp_path / "long.jsonl"), "max_length": 64, "persona": "You are a TCM expert."}
    truncated = prepare_dataset(DataConfig(**settings), tokenizer, str(train), str(evaluation))
    assert truncated.stats["truncated"] == 2 and truncated.stats["rows_kept"] == 8
    assert truncated.stats["length_max"] == 64
    dropped = prepare_dataset(DataConfig(**settings, length_policy="drop"), tokenizer, str(train), str(evaluation))
    assert dropped.stats["dropped_too_long"] == 2 and dropped.stats["rows_kept"] == 6
    assert "| dropped_too_long | 2 |" in dropped.summary_markdown


def _unreachable_server(tmp_path) -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _store_below_a_file(tmp_path) -> str:
    (tmp_path / "a-file").write_text("")
    return f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"


@pytest.mark.parametrize(("make_uri", "advice"), [(_unreachable_server, "check the server"),
                                                  (_store_below_a_file, "writable")],
                         ids=["server-down", "store-cannot-open"])
def test_unreachable_mlflow_is_reported_at_the_end_not_raised(make_uri, advice, tmp_path, monkeypatch):
    """Consistent with the outage policy (see test_reliability): the step goes on, and its result says what was not
    logged, where, and what to check: the server, or for a local store that cannot be opened (here: below a
    file), its folder."""
    from kubetune.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = make_uri(tmp_path)
    tracker = Tracker(uri, "unreachable")
    assert not tracker.try_open(attempts=1)
    tracker.log_metrics({"loss": 1.0}, step=1)
    report = tracker.finish(timeout_s=0)
    assert "MLflow tracking incomplete" in report and uri in report and advice in report


def test_compare_against_an_unreachable_server_hides_the_uri_password(capsys, monkeypatch):
    from kubetune.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--tracking-uri", "http://user:s3cretpw@127.0.0.1:1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "could not read runs" in err and "Fix:" in err
    assert "s3cretpw" not in err and "Traceback" not in err


# -- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--local", "--param", "lora_r=abc"], r"--param lora_r='abc' is not a valid number integer"),
        (["run", "--local", "--param", "learning_rate=fast"], r"learning_rate='fast' is not a valid number double"),
        (["run", "--local", "--param", "double_quant=maybe"], r"double_quant='maybe' is not a valid boolean"),
        (["run", "--local", "--param", "nope=1"], r"unknown pipeline parameter 'nope'\n  Fix: use one of: .*lora_r"),
        (["run", "--local", "--param", "lora_r"], r"--param 'lora_r' has no '='"),
        (["run", "--param", "lora_r=8"], r"run needs --local"),
        (["run", "--local", "--param", "lora_r=8", "--param", "lora_r=4"], r"--param lora_r is given twice"),
    ],
    ids=["integer", "number", "boolean", "unknown", "no-equals", "no-local", "twice"],
)
def test_bad_cli_parameters_exit_2_with_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    from kubetune.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("kubetune: error: ") and "Fix:" in err and "Traceback" not in err
    assert re.search(message, err, re.S), err
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_bad_step_flag_exits_2(capsys):
    from kubetune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model=m", "--train_data=t", "--adapter=a", "--lora_r=abc"])
    assert exit_info.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "--local", "--param", "lora_r=abc",
                           "--param", "nope=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("kubetune: error: 2 problems") and "Traceback" not in done.stderr
    assert "lora_r='abc'" in done.stderr and "'nope'" in done.stderr and "Fix:" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_failing_local_run_ends_with_the_steps_own_error_and_fix(tmp_path):
    """What a newcomer with a misnamed column sees: a line per step, then the step's problem and fix as the last
    lines (not a screen of JSON), and exit status 2."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "久咳", "reply": "润肺"}\n{"instruction": "失眠", "reply": "归脾汤"}\n',
                    encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KUBETUNE_VERBOSE")}
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "--local", "--param", f"dataset={data}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-3:]
    assert any("prepare-dataset failed" in line and "has no column for: output" in line for line in last), last
    assert any(line.strip().startswith("Fix: name your columns with the columns parameter") for line in last), last
    assert "executor_input" not in done.stderr and len(done.stderr.splitlines()) < 30
