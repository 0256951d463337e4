"""The local run's console: kfp.local's output (as it prints it) in, a line per step out, the full log kept, the
failed step's own error last, secrets redacted. The lines fed here are the ones kfp.local 2.17 writes."""

from __future__ import annotations

import io

from kubetune.cli.console import StepConsole
from kubetune.cli.run import step_failure

UPSTREAM = {"resolve-sources": [], "prepare-dataset": ["resolve-sources"], "quantize-model": ["resolve-sources"],
            "train-lora": ["prepare-dataset", "quantize-model"], "finish-run": []}
NAMES = {"prepare-dataset": "Prepare dataset", "train-lora": "LoRA SFT"}


def _console(tmp_path, verbose: bool = False) -> tuple[StepConsole, io.StringIO]:
    out = io.StringIO()
    return StepConsole(tmp_path / "logs" / "run.log", out, verbose=verbose, names=NAMES, upstream=UPSTREAM), out


def _task(console: StepConsole, task: str, body: str, status: str = "SUCCESS") -> None:
    console.write(f"09:00:00.000 - INFO - Executing task \x1b[96m'{task}'\x1b[0m\n"
                  "09:00:00.001 - INFO - Streamed logs:\n\n")
    console.write(body)
    console.write(f"09:00:01.000 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m\n")


def test_a_line_per_step_the_cache_and_the_progress(tmp_path):
    console, out = _console(tmp_path)
    _task(console, "resolve-sources", '    [KFP Executor INFO]: Got executor_input:\n    {"inputs": {}}\n')
    _task(console, "prepare-dataset", "    [KFP Executor INFO]: prep: 497 rows\n")
    # quantize-model came from the cache: kfp.local never says "Executing" for it
    _task(console, "train-lora", "    [KFP Executor INFO]: training step 1/40 · loss 7.6 · 0:16 left\n"
                                 "    [KFP Executor INFO]: training step 2/40 · loss 7.5 · 0:15 left\n")
    console.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "  resolve-sources ...", "✓ resolve-sources: done in 0 s",
        "  prepare-dataset (Prepare dataset) ...", "✓ prepare-dataset (Prepare dataset): done in 0 s",
        "✓ quantize-model: from the cache (same settings and source versions)",
        "  train-lora (LoRA SFT) ...", "    training step 1/40 · loss 7.6 · 0:16 left",  # then at most every 10 s
        "✓ train-lora (LoRA SFT): done in 0 s",
    ]
    log = console.log_path.read_text(encoding="utf-8")
    assert '{"inputs": {}}' in log and "training step 2/40" in log  # everything is in the log


def test_a_failed_step_ends_the_output_with_its_own_error_and_fix(tmp_path):
    console, out = _console(tmp_path)
    _task(console, "prepare-dataset",
          "    kubetune: error: dataset data.jsonl (alpaca format) has no column for: output\n"
          "      Fix: name your columns with the columns parameter\n", status="FAILURE")
    _task(console, "finish-run", "    [KFP Executor INFO]: pipeline FAILED: no MLflow run to close\n")
    console.close()
    assert "✗ prepare-dataset (Prepare dataset): failure after 0 s" in out.getvalue()
    assert "train-lora" not in out.getvalue()  # skipped after the failure: not reported as cached
    error = step_failure(console, "Pipeline failed")
    assert error.problem == "prepare-dataset failed: dataset data.jsonl (alpaca format) has no column for: output"
    assert error.fix.startswith("name your columns with the columns parameter (full log: ")


def test_a_step_killed_without_an_error_names_its_last_lines(tmp_path):
    console, _ = _console(tmp_path)
    _task(console, "train-lora", "    {'loss': 7.5}\n    Killed\n", status="FAILURE")
    console.close()
    error = step_failure(console, "Pipeline failed")
    assert "train-lora failed without a kubetune error" in error.problem and "Killed" in error.problem


def test_secrets_are_redacted_before_the_log_or_the_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    console, out = _console(tmp_path, verbose=True)
    console.write('    "persona": "key hf_abcdef')  # a secret split across two writes
    console.write('ghijklmnop"\n')
    console.close()
    for text in (console.log_path.read_text(encoding="utf-8"), out.getvalue()):
        assert "hf_abcdefghijklmnop" not in text and '"persona": "key ***"' in text
