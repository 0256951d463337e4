#!/usr/bin/env bash
# One GPU session: offline installs, GPU tests, the whole local pipeline on the GPU, the SFT benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_run.sh [benchmark configs...]
set -uo pipefail
source benchmarks/device_setup.sh || exit 1
OUT=${OUT:-/tmp/kubetune-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  (cd /tmp && kubetune run --local --workdir /tmp/kt-gpu 2>/dev/null | tail -1) | tee "$OUT/local_run.json"
fi
if [ "$#" -gt 0 ]; then
  python3 benchmarks/sft_throughput.py "$@" 2>&1 | grep -E "RESULT|SUMMARY|Error|error|Traceback" | tee "$OUT/sft_bench.txt"
fi
