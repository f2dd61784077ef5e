"""Encoder tests run with fresh allocations filled with NaN (as the op tests do), so a row the
encoder or a kernel never writes shows up in the comparison instead of passing as stale memory."""

import pytest
import torch


@pytest.fixture(autouse=True)
def poison_outputs():
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
