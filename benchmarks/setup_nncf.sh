#!/usr/bin/env bash
# Make NNCF's virtual environment for the nncf peer of benchmarks/compare.py (benchmarks/peers.py):
#     bash benchmarks/setup_nncf.sh            # -> .venv-nncf at the repository root
#     bash benchmarks/setup_nncf.sh DIR        # -> DIR (then export BAYESQ_NNCF_PYTHON=DIR/bin/python)
# NNCF brings its own numpy/scipy/scikit-learn pins and needs the CPU onnxruntime package, which would clash
# with the project's onnxruntime-gpu, so it lives apart; the benchmark calls it in a subprocess.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$(cd "$here/.." && pwd)/.venv-nncf}"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$here/nncf-requirements.txt"
"$venv/bin/python" -c "import nncf, onnx, onnxruntime; print('nncf', nncf.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__)"
echo "NNCF environment ready: $venv"
