#!/usr/bin/env bash
# Runs the test suite on the oldest stack the project supports (the GPU check's: torch 2.11,
# triton 3.6, transformers 5.17) in ./.venv-oldest, so that API drift shows up before a GPU run.
# Downloads a few GB the first time. The CUDA extension is not built here (QK_BUILD_CUDA=0);
# CUDA kernels still run through the emulation.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-oldest/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-oldest
fi
.venv-oldest/bin/python -m pip install -q "torch==2.11.*" "triton==3.6.*" "transformers==5.17.*" \
  numpy ninja pybind11 pytest pytest-benchmark hypothesis safetensors Pillow setuptools wheel
QK_BUILD_CUDA=0 .venv-oldest/bin/python -m pip install -q --no-build-isolation --no-deps -e .
QK_BUILD_CUDA=0 .venv-oldest/bin/python -m pytest -q -p no:cacheprovider "$@"
