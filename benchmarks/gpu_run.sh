#!/usr/bin/env bash
# One GPU call: offline installs, the checks (GPU tests, then the whole local pipeline on the GPU) and the SFT
# benchmark (benchmarks/sft_throughput.py: seed recipe, kubetune, lean, Unsloth, ...), inside one command's time.
# Usage (repo root, on the GPU machine; `run` with carry [".whl", ".whl-unsloth"]):
#   bash benchmarks/gpu_run.sh [benchmark configs...] [--steps N]    e.g.  kubetune unsloth lean seed --steps 10
# With no configs only the checks run; SKIP_TESTS=1 runs only the benchmark.
# One GPU: the checks run while the benchmark builds its model (not timed), and the benchmark waits for them
# before its first timed configuration (it records gpu_shared_with_other_job=true if it had to stop waiting).
# Several GPUs: the checks run on the last GPU, the benchmark on GPU 0.
# Everything is stopped DEADLINE_S seconds (default 575) after the start, so that the summary and $OUT come back
# inside the device tool's 600 s. $OUT (default /tmp/kubetune-gpu-out) gets at most 6 files: setup.txt,
# gpu_tests.txt, local_run.txt, sft_bench.log, results.jsonl (benchmarks/results.jsonl after this run), summary.txt.
set -uo pipefail
T0=$SECONDS
DEADLINE_S=${DEADLINE_S:-575}
CHECKS_S=${CHECKS_S:-270}  # the checks' own limit (tests + local pipeline)
OUT=${OUT:-/tmp/kubetune-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KT_BENCH_LAUNCHER="bash benchmarks/gpu_run.sh $*"
: > "$OUT/summary.txt"
left() { echo $((DEADLINE_S - (SECONDS - T0))); }
atleast5() { echo $(($1 > 5 ? $1 : 5)); }  # `timeout 0` would mean no limit at all
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; source benchmarks/device_setup.sh; } \
    > "$OUT/setup.txt" 2>&1
setup_rc=$?
cat "$OUT/setup.txt"
[ "$setup_rc" = 0 ] || { note "setup failed (rc $setup_rc): see setup.txt"; exit 1; }
note "setup done at $((SECONDS - T0)) s"
gpus=$(nvidia-smi -L | wc -l)
DONE=/tmp/kt-checks.done; rm -f "$DONE"

checks() {
  local end=$((SECONDS + CHECKS_S)) t rc
  t=$SECONDS
  timeout -k 5 "$(atleast5 $((end - SECONDS)))" python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
  rc=$?; note "gpu tests: rc $rc in $((SECONDS - t)) s: $(tail -1 "$OUT/gpu_tests.txt")"
  t=$SECONDS
  (cd /tmp && timeout -k 5 "$(atleast5 $((end - SECONDS)))" kubetune run --local --workdir /tmp/kt-gpu > "$OUT/local_run.txt" 2>&1)
  rc=$?; note "local run: rc $rc in $((SECONDS - t)) s: $(tail -1 "$OUT/local_run.txt" | cut -c1-600)"
  touch "$DONE"
}

bench() {
  local wait_args=() limit
  [ "${1:-}" = --wait ] && { shift; wait_args=(--wait-for "$DONE" --wait-timeout "$((CHECKS_S + 10))"); }
  limit=$(atleast5 $(( $(left) - 10 )))
  note "benchmark starts at $((SECONDS - T0)) s with ${limit} s left: $*"
  # RESULT lines show as they come (they survive a cut-short call in the tool's output too)
  timeout -k 10 "$limit" python3 benchmarks/sft_throughput.py "$@" ${wait_args[@]+"${wait_args[@]}"} 2>&1 \
      | tee "$OUT/sft_bench.log" | grep --line-buffered -E "^(RESULT|WAITED) "
  note "benchmark: rc ${PIPESTATUS[0]} at $((SECONDS - T0)) s"
}

has_configs=0
for a in "$@"; do case $a in -*) break ;; *) has_configs=1; break ;; esac; done
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  [ "$has_configs" = 1 ] && bench "$@"
elif [ "$has_configs" = 0 ]; then
  checks
elif [ "$gpus" -gt 1 ]; then
  CUDA_VISIBLE_DEVICES=$((gpus - 1)) checks &
  CUDA_VISIBLE_DEVICES=0 bench "$@"
  wait
else
  checks &
  bench --wait "$@"
  wait
fi

echo "==== done in $((SECONDS - T0)) s (status lines: summary.txt)"
if [ -f "$OUT/sft_bench.log" ]; then
  grep -E "^SUMMARY |Traceback|Error" "$OUT/sft_bench.log" | cut -c1-2500 | tail -30
fi
[ -f benchmarks/results.jsonl ] && cp benchmarks/results.jsonl "$OUT/results.jsonl"
ls -la "$OUT"
