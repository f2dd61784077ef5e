#!/usr/bin/env bash
# Sets up ./.venv with torch and qwen-kernels (editable, test and bench extras). The CUDA extension
# qwen_kernels._C is built when a CUDA toolkit is found (see setup.py for the knobs). Re-running is
# cheap: the package is rebuilt only when setup.py, pyproject.toml or csrc/ changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${QK_TORCH_SPEC:-torch==2.14.1}"
# The torchvision release built for the default torch; only the tests use it (transformers'
# video processor, which the video preprocessing is compared with, resizes through it). With
# another QK_TORCH_SPEC name its matching release in QK_TORCHVISION_SPEC, or none is installed
# (those tests then skip) rather than one that would pull in a different torch.
default_torchvision="torchvision==0.29.1"
[ -z "${QK_TORCH_SPEC:-}" ] || default_torchvision=""
TORCHVISION_SPEC="${QK_TORCHVISION_SPEC-$default_torchvision}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.qwen-kernels-build
digest="$( (echo "$TORCH_SPEC $TORCHVISION_SPEC ${QK_BUILD_CUDA-} ${QK_CUDA_ARCHS-}"; \
  cat setup.py pyproject.toml; \
  find csrc -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing $TORCH_SPEC $TORCHVISION_SPEC and the build tools"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" ${TORCHVISION_SPEC:+"$TORCHVISION_SPEC"} setuptools wheel \
  ninja pybind11 numpy
echo "setup: building qwen-kernels (the CUDA extension takes a few minutes where nvcc exists)"
start=$SECONDS
# A stale extension from an earlier build must not stand in for one that fails to build now.
rm -f qwen_kernels/_C*.so
python -m pip install -q --no-build-isolation -e ".[test,bench]"
echo "setup: installed in $((SECONDS - start)) s"
echo "$digest" > "$stamp"
