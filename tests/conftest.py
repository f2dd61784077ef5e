"""Test setup shared by every suite.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter: the variable must
be set before triton is first imported, so it is set here, at the top of the first file pytest
loads. GPU tests are marked ``gpu`` and skipped where no GPU is visible. Every test runs with
outputs poisoned (``poison_outputs``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """The vLLM suite runs in its own interpreter: start it now, beside the rest of the run."""
    from tests import test_vllm_plugin

    if any(item.name == test_vllm_plugin.SUITE_TEST for item in session.items):
        test_vllm_plugin.start_vllm_suite()


def pytest_unconfigure(config):
    from tests import test_vllm_plugin

    test_vllm_plugin.stop_vllm_suite()


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh but reproducible inputs per test."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def poison_outputs():
    """In deterministic mode torch fills each fresh allocation (torch.empty, at::empty) with NaN,
    so an element that a kernel or the encoder never writes shows up as NaN and fails the
    comparison instead of passing as stale memory."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
