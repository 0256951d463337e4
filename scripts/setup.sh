#!/usr/bin/env bash
# Create .venv and install kubetune with its test tools (CPU-only torch). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
python -m pip show torch >/dev/null 2>&1 || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
