"""The tower's rotary (``mrope_pos_`` in place on the packed qkv) on each kernel backend against
the same tower with the eager rotary, every other op on the reference."""

import pytest
import torch

from qwen_kernels.model import KernelConfig, VisionEncoder, random_hf_state_dict
from tests.helpers import backends_for, rel_err
from tests.model.reference import DEVICES, SMALL, random_pixels

GRID = [(1, 6, 10), (2, 4, 8)]


@pytest.mark.parametrize(
    ("device", "backend"),
    [
        pytest.param(device, backend, id=f"{backend}-{device}")
        for device in DEVICES
        for backend in backends_for("mrope_pos_", device)
        if backend != "torch"
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_backends_match_eager_rotary(gen, device, backend, dtype):
    weights = random_hf_state_dict(SMALL, seed=99)
    encoder = VisionEncoder.from_hf_state_dict(
        weights, SMALL, KernelConfig(rotary=backend), dtype=dtype, device=device
    )
    pixels = random_pixels(gen, GRID).to(device=device)
    with torch.no_grad():
        out = encoder(pixels, GRID)
        encoder.set_kernels(KernelConfig(rotary="torch"))
        eager = encoder(pixels, GRID)
        encoder.set_kernels(KernelConfig(rotary=backend))
        again = encoder(pixels, GRID)
    assert out.dtype == dtype and out.shape == eager.shape
    assert torch.equal(out, again)
    if dtype == torch.float32:
        # The rotations agree bit for bit but for cos/sin an fp32 ulp apart (another libm).
        assert rel_err(out.cpu(), eager.cpu()) < 5e-6
    else:
        # As close to the fp32 tower as the eager rotary's bf16 tower is.
        reference = VisionEncoder.from_hf_state_dict(
            weights, SMALL, KernelConfig(rotary="torch"), dtype=torch.float32, device=device
        )
        with torch.no_grad():
            expected = reference(pixels.float(), GRID).cpu()
        assert rel_err(out.cpu(), expected) <= 1.05 * rel_err(eager.cpu(), expected) + 1e-4
