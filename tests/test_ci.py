"""In CI (``CI=true``) every kernel backend that can run without a GPU must run: a missing Triton
interpreter or emulation compiler fails the run instead of turning the kernel tests into skips.
Likewise for torchvision, which the comparison with transformers' video processor needs."""

import importlib.util
import os

import pytest

from qwen_kernels._backends import runtime_missing

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.skipif(not IN_CI, reason="only CI insists on every CPU-runnable backend")
@pytest.mark.parametrize("backend", ["triton", "cuda_emu"])
def test_ci_runs_every_kernel_backend_on_the_cpu(backend):
    missing = runtime_missing(backend, "cpu")
    assert missing is None, f"CI cannot run the {backend} kernels: {missing}"


@pytest.mark.skipif(not IN_CI, reason="only CI insists on torchvision")
def test_ci_compares_video_preprocessing_with_transformers():
    """scripts/setup.sh installs torchvision, without which the comparison with transformers'
    video processor (tests/model/test_preprocess.py) would skip."""
    assert importlib.util.find_spec("torchvision") is not None, "torchvision is not installed"
