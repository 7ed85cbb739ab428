#!/usr/bin/env bash
# Make AIMET's virtual environment for the aimet peer of benchmarks/compare.py (benchmarks/peers.py):
#     bash benchmarks/setup_aimet.sh            # -> .venv-aimet at the repository root
#     bash benchmarks/setup_aimet.sh DIR        # -> DIR (then export BAYESQ_AIMET_PYTHON=DIR/bin/python)
# aimet-onnx needs the CPU onnxruntime package, which would clash with the project's onnxruntime-gpu, so it lives
# apart; the benchmark calls it in a subprocess. torch is the project's pinned one (constraints.txt).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${1:-$root/.venv-aimet}"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" torch torchvision
"$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -r "$here/aimet-requirements.txt"
"$venv/bin/python" -c "import aimet_onnx, onnx, onnxruntime, torch; print('aimet_onnx', aimet_onnx.__version__, '| onnxruntime', onnxruntime.__version__, '| torch', torch.__version__)"
echo "AIMET environment ready: $venv"
