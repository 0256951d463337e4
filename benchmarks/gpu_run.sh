#!/usr/bin/env bash
# One GPU session: offline installs, GPU tests, the whole local pipeline on the GPU, the SFT benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_run.sh [benchmark configs...]
# With several GPUs, the tests and the local pipeline run on the last GPU while the benchmark has GPU 0.
set -uo pipefail
source benchmarks/device_setup.sh || exit 1
OUT=${OUT:-/tmp/kubetune-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
gpus=$(nvidia-smi -L | wc -l)
checks() {
  python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
  (cd /tmp && kubetune run --local --workdir /tmp/kt-gpu > "$OUT/local_run.txt" 2>&1)
  tail -1 "$OUT/local_run.txt" > "$OUT/local_run.json"
}
bench() {
  python3 benchmarks/sft_throughput.py "$@" 2>&1 | tee "$OUT/sft_bench.log" | grep -E "RESULT|SUMMARY|Error|error|Traceback"
}
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$#" -gt 0 ] && [ "$gpus" -gt 1 ]; then
  CUDA_VISIBLE_DEVICES=$((gpus - 1)) checks &
  CUDA_VISIBLE_DEVICES=0 bench "$@"
  wait
else
  [ "${SKIP_TESTS:-0}" != 1 ] && checks
  [ "$#" -gt 0 ] && bench "$@"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  tail -15 "$OUT/gpu_tests.txt"; echo "local run:"; cat "$OUT/local_run.json"
fi
