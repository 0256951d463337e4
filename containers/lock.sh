#!/usr/bin/env bash
# Regenerate the fully hashed lock files of both images from requirements-{cpu,gpu}.in.
#
#   pip install uv            # into any throwaway environment
#   containers/lock.sh        # from anywhere; writes containers/requirements-{cpu,gpu}.txt
#
# Both locks target x86_64 Linux (manylinux_2_28): the CPU image runs Python 3.11 (python:3.11-slim-bookworm),
# the GPU image Python 3.12 (Ubuntu 24.04's, in nvidia/cuda). TORCH_CPU_FIND_LINKS: where to find the torch CPU
# wheel while locking (default: the PyTorch CPU wheel page); the lock always points pip at the PyTorch page.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
uv="${UV:-uv}"
torch_cpu_page="https://download.pytorch.org/whl/cpu/torch/"
common=(
    --generate-hashes
    --python-platform x86_64-manylinux_2_28
    --index-url https://pypi.org/simple
    --custom-compile-command "containers/lock.sh"
    --quiet
)

"$uv" pip compile "$here/requirements-cpu.in" -o "$here/requirements-cpu.txt" --python-version 3.11 \
    --find-links "${TORCH_CPU_FIND_LINKS:-$torch_cpu_page}" "${common[@]}"
# Tell pip in the image where the +cpu wheel lives: above the first requirement, after uv's header.
awk -v line="--find-links $torch_cpu_page" \
    '!done && $0 !~ /^#/ { print line; done = 1 } { print }' \
    "$here/requirements-cpu.txt" >"$here/requirements-cpu.txt.tmp"
mv "$here/requirements-cpu.txt.tmp" "$here/requirements-cpu.txt"

"$uv" pip compile "$here/requirements-gpu.in" -o "$here/requirements-gpu.txt" --python-version 3.12 \
    "${common[@]}"
