#!/usr/bin/env bash
# Set up, install the browser the report test uses, then run every test that can run without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash .ci/setup-browser.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -n "${KUBETUNE_TEST_WORKERS:-2}" --dist loadfile "$@"
