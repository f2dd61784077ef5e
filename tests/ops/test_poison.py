"""The poisoning fixture of tests/conftest.py is in force: fresh allocations hold NaN."""

import torch


def test_fresh_allocations_are_poisoned():
    assert torch.isnan(torch.empty(17)).all()
    assert torch.isnan(torch.empty_like(torch.ones(3, 5), dtype=torch.bfloat16)).all()
