#!/usr/bin/env bash
# Sets up ./.venv-vllm for the vLLM plug-in's tests (tests/vllm): vLLM 0.33.0 with the torch and
# torchvision it pins, and qwen-kernels in editable mode without the CUDA extension. vLLM runs on
# the CPU there (VLLM_TARGET_DEVICE=cpu). A lean install: vllm itself without its dependencies,
# then those of its requirements that the CPU needs (not the GPU-only kernel packages).
#
# Re-running is cheap. Two stamps: vLLM's environment (rebuilt from scratch when the pins or this
# script change), and the qwen-kernels install in it (redone when setup.py or pyproject.toml
# change; the code itself is an editable install).
#
# Where the environment cannot be built, this fails under CI=true; elsewhere it warns and exits 0,
# and the main suite's test_vllm_plugin skips with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm==0.33.0"
TORCH_SPECS=("torch==2.14.0" "torchvision==0.29.0")
# vLLM requirements that only serve its GPU kernels, video decoding or audio.
GPU_ONLY="flashinfer-python nvidia-cudnn-frontend nvidia-cutlass-dsl quack-kernels tilelang \
apache-tvm-ffi humming-kernels tokenspeed-mla fastsafetensors instanttensor nvtx pynvvideocodec \
torchcodec torchaudio"
venv=.venv-vllm
env_stamp=$venv/.vllm-env
stamp=$venv/.qwen-kernels-build
log=$venv/setup.log

env_digest="$( (echo "$VLLM_SPEC ${TORCH_SPECS[*]} $GPU_ONLY"; cat "$0") | sha256sum | cut -d' ' -f1)"
digest="$( (echo "$env_digest"; cat setup.py pyproject.toml) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  echo "setup_vllm: $venv is up to date"
  exit 0
fi

fail() {
  echo "setup_vllm: $1 (last lines of $log below)" >&2
  tail -n 20 "$log" >&2 || true
  if [ "${CI:-}" = "true" ]; then
    exit 1
  fi
  echo "setup_vllm: WARNING: no vLLM environment; the vLLM plug-in tests will be skipped" >&2
  exit 0
}

# vLLM's requirements for the CPU: those without an extra, less the GPU-only ones and the pins.
requirements() {
  "$venv/bin/python" - "$GPU_ONLY" <<'PY'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = set(sys.argv[1].split()) | {"torch", "torchvision"}
for line in requires("vllm"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(req)
PY
}

start=$SECONDS
pip() { "$venv/bin/python" -m pip "$@" >> "$log" 2>&1; }
if [ ! -f "$env_stamp" ] || [ "$(cat "$env_stamp")" != "$env_digest" ]; then
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  : > "$log"
  echo "setup_vllm: installing ${TORCH_SPECS[*]} and $VLLM_SPEC into $venv (about 4 minutes)"
  pip install -q --upgrade pip setuptools wheel packaging ninja pybind11 || fail "pip upgrade failed"
  pip install -q "${TORCH_SPECS[@]}" || fail "torch install failed"
  pip install -q --no-deps "$VLLM_SPEC" || fail "vllm install failed"
  requirements > "$venv/requirements.txt" || fail "reading vllm's requirements failed"
  pip install -q -r "$venv/requirements.txt" "${TORCH_SPECS[@]}" \
    || fail "vllm's requirements failed to install"
  echo "$env_digest" > "$env_stamp"
fi
echo "setup_vllm: installing qwen-kernels (without the CUDA extension) into $venv"
rm -f "$stamp"
QK_BUILD_CUDA=0 pip install -q --no-build-isolation -e ".[test]" "${TORCH_SPECS[@]}" \
  || fail "qwen-kernels install failed"
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c "import vllm.model_executor.models.qwen2_5_vl" \
  >> "$log" 2>&1 || fail "vllm's Qwen2.5-VL model does not import"
echo "setup_vllm: ready in $((SECONDS - start)) s"
echo "$digest" > "$stamp"
