#!/usr/bin/env bash
# Set up, then run the whole pipeline locally: tiny model, bundled sample data, MLflow in ./kubetune-local.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
kubetune run --local "$@"
