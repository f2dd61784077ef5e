"""torch.compile(fullgraph=True, dynamic=True) of VisionEncoder and of the patched transformers
tower: one graph, the eager result, and which grid changes compile again (counted with a counting
backend). CPU, "torch" kernels, the aot_eager backend (what Inductor would lower is the same
graph)."""

import pytest
import torch
import torch._dynamo.testing

import qwen_kernels
from qwen_kernels.hf import patch_qwen2_5_vl, vision_kwargs
from qwen_kernels.model import KernelConfig, VisionEncoder
from tests.test_hf import VISION, tiny_config

# Different patch counts, frame counts, window counts and batch sizes with the same longest frame
# (128 patches) and longest window (64); then a smaller image whose longest window (3x5 merge
# units) and frame differ.
GRIDS = [[(2, 8, 16)], [(3, 16, 8)], [(1, 8, 8), (2, 16, 8)], [(1, 6, 10)]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles: earlier tests' graphs of the same code (encode is one
    code object for every encoder) would fill Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pixels(gen, grid) -> torch.Tensor:
    return torch.randn(sum(t * h * w for t, h, w in grid), 1176, generator=gen)


@pytest.fixture(scope="module")
def tower():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(99)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    return model.model.visual


@pytest.fixture(scope="module")
def encoder(tower):
    return VisionEncoder.from_hf_state_dict(tower.state_dict(), VISION, kernels="torch")


def test_encoder_encode_compiles_once_for_every_grid(gen, encoder):
    """``encode(pixel_values, layout)`` traces whole, and every grid reuses the graph: the token
    count is a symbolic size, and the longest window and frame are symbolic too (``max_seqlen``
    is a ``SymInt`` in the attention ops' schemas; the kernels size their tiles by its value at
    run time)."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(encoder.encode, fullgraph=True, dynamic=True, backend=counter)
    graphs = None
    for grid in GRIDS:
        layout = encoder.layout(grid)
        pixels = _pixels(gen, grid)
        with torch.no_grad(), qwen_kernels.skip_value_checks():
            torch.testing.assert_close(compiled(pixels, layout), encoder.encode(pixels, layout))
        graphs = graphs or counter.frame_count
        assert counter.frame_count == graphs


def test_encoder_module_compiles_per_grid(gen, encoder):
    """``torch.compile(encoder, fullgraph=True, dynamic=True)`` traces the whole forward once the
    grid's layout is cached, but compiles once per grid: ``forward`` looks the layout up in a
    Python cache keyed by the grid's values, so Dynamo guards on each of them; and a layout
    missing from the cache is built by host code that reads the grid's values (it cannot be
    traced), so layouts are cached (``encoder.layout(grid)``) before the compiled call.
    Compile ``encode`` with a layout (above) to share graphs between grids."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(encoder, fullgraph=True, dynamic=True, backend=counter)
    counts = []
    for grid in GRIDS[:2]:
        encoder.layout(grid)
        pixels = _pixels(gen, grid)
        with torch.no_grad():
            torch.testing.assert_close(compiled(pixels, grid), encoder(pixels, grid))
            torch.testing.assert_close(compiled(pixels, grid), encoder(pixels, grid))
        counts.append(counter.frame_count)
    assert 0 < counts[0] < counts[1]


def test_patched_tower_compiles_without_graph_breaks(gen, tower, encoder):
    """The patched transformers tower, given its grid-dependent inputs precomputed
    (``vision_kwargs``), traces as one graph and matches eager and VisionEncoder, and every grid
    shares it (as above)."""
    handle = patch_qwen2_5_vl(tower, "torch")
    try:
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(tower, fullgraph=True, dynamic=True, backend=counter)
        graphs = None
        for grid in GRIDS:
            grid_thw = torch.tensor(grid)
            pixels = _pixels(gen, grid)
            with torch.no_grad():
                out = compiled(pixels, grid_thw, **vision_kwargs(tower, grid_thw)).pooler_output
                eager = tower(pixels, grid_thw).pooler_output
                reference = encoder(pixels, grid)
            torch.testing.assert_close(out, eager)
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
            graphs = graphs or counter.frame_count
            assert counter.frame_count == graphs
    finally:
        handle.unpatch()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_encoder_encode_compiles_on_the_gpu(gen, tower, backend):
    """As on the CPU, with the GPU kernels (groups without ``backend`` kernels run "auto") and
    Inductor: one graph for every grid."""
    kernels = KernelConfig.best_effort(backend)
    encoder = VisionEncoder.from_hf_state_dict(
        tower.state_dict(), VISION, kernels=kernels, device="cuda"
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(encoder.encode, fullgraph=True, dynamic=True, backend=counter)
    graphs = None
    for grid in GRIDS:
        layout = encoder.layout(grid)
        pixels = _pixels(gen, grid).cuda()
        with torch.no_grad(), qwen_kernels.skip_value_checks():
            out, eager = compiled(pixels, layout), encoder.encode(pixels, layout)
        torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
        graphs = graphs or counter.frame_count
        assert counter.frame_count == graphs
