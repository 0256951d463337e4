#!/usr/bin/env bash
# Create .venv and install kubetune with its test tools (CPU-only torch). Safe to run again: when pyproject.toml
# has not changed since the last install, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "setup: creating .venv"; python3 -m venv .venv; }
. .venv/bin/activate
stamp=.venv/.kubetune-installed
want=$( (cat pyproject.toml; python --version) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date (pyproject.toml unchanged)"
    exit 0
fi
python -m pip install -q --upgrade pip
# The CPU build of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
if ! python -m pip show torch >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    python -m pip install -q "torch==2.13.0"
fi
echo "setup: installing kubetune (editable) with kfp, transformers, peft, trl, datasets, bitsandbytes, mlflow and the test tools"
# (quiet: setuptools warns about every editable install of a package that maps several folders)
PYTHONWARNINGS=ignore python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done"
