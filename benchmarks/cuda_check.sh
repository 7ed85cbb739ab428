#!/usr/bin/env bash
# CUDA check: compile MiniLM with --provider cuda --target cuda, validate it on the CUDA execution provider,
# and time FP32 vs the artifact there with IO binding; prints one table. Installs nothing. On a machine with no
# usable CUDA EP it prints why and exits 0. Bounded to under 5 minutes (exit 124 if it ever runs over).
#
#   bash benchmarks/cuda_check.sh [--bits 4.5] [--out benchmarks/results/cuda_check.md]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout 290 "$python" benchmarks/cuda_check.py "$@"
