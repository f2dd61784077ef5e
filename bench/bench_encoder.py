"""End-to-end benchmark of the Qwen2.5-VL vision tower (7B config, bf16), a suite of the shared
harness (``qwen-kernels bench --op encoder``): our encoder with the best kernels ("auto") and
with the eager references ("torch"), each also under torch.compile, against transformers'
``Qwen2_5_VisionTransformerPretrainedModel`` (eager, sdpa, sdpa under torch.compile, and
flash_attention_2 where installed), and the best the model does on PyTorch alone: the "torch"
references with torch's ``varlen_attn`` for attention, under torch.compile (on a GPU whose torch
has ``torch.nn.attention.varlen``).

Cases: the real window mixes of a 1288x952 image and a 16-frame 448x448 video, and square images
of the full-attention sweep's frame lengths. Timed rows also carry the peak memory of a forward
above the weights and the share of GPU time outside GEMMs (one profiled forward). Every
implementation gets the grid's index tensors precomputed (transformers through its
precomputed-kwargs hooks), outside the timing, so the times are of the forward itself. Inside
torch.compile our ops are opaque: Inductor fuses only the glue between them. The dry run builds
a tiny tower in fp32 and runs each implementation once on the CPU (compiles with aot_eager).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from qwen_kernels.model import LayerKernels, VisionConfig, VisionEncoder, random_hf_state_dict
from qwen_kernels.model.encoder import VisionAttention
from qwen_kernels.model.layout import GridLayout
from qwen_kernels.model.weights import hf_shapes

from .harness import REL_ERR_LIMIT, Case, Impl, Inputs, Maker, Suite, missing_module
from .shapes import TINY, Grid, Scale, frame_lengths, short_count, square_grid, window_lengths

try:  # torch.nn.attention.varlen (FlashAttention over packed segments) is in recent torch only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

OP = "encoder"
ARGS = ("pixels", "weights")
DRY_RUN_REL_ERR = 1e-4  # the fp32 tiny tower on the CPU
MERGER = "merger.mlp."  # matrices that run on merged tokens (a quarter of the rows)


def cases(scale: Scale) -> list[Case]:
    """The tower on the real visuals of ``scale`` and on one square frame per full-attention
    frame length; the 7B tower in bf16, or the tiny tower in fp32 at the dry run's scale."""
    tiny = scale is TINY
    config = VisionConfig.tiny() if tiny else VisionConfig.qwen2_5_vl("7b")
    dtype = torch.float32 if tiny else torch.bfloat16
    shapes = [(visual.name, "real", visual.grid) for visual in scale.visuals]
    shapes += [(f"frame-{short_count(n)}", "frames", square_grid(n)) for n in scale.frame_tokens]
    limit = DRY_RUN_REL_ERR if tiny else REL_ERR_LIMIT
    return [tower_case(name, series, grid, config, dtype, limit) for name, series, grid in shapes]


def tower_case(
    name: str,
    series: str,
    grid: Grid,
    config: VisionConfig,
    dtype: torch.dtype,
    limit: float,
    op: str = OP,
) -> Case:
    """One tower forward on ``grid``: the inputs, the byte and FLOP counts, and our encoder on
    the eager references as the reference output."""
    tokens = math.prod(grid)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(math.prod(shape) for shape in hf_shapes(config).values())
    out_rows = tokens // config.merge_unit
    return Case(
        op=op,
        name=name,
        series=series,
        x=tokens if series == "real" else grid[1] * grid[2],
        tokens=tokens,
        shape=f"pixels [{tokens}, {config.patch_dim}] -> [{out_rows}, {config.out_hidden_size}]; "
        f"{weights / 1e6:.0f}M weights ({config.depth} blocks), {str(dtype).split('.')[-1]}",
        # The pixels and every weight read once, the merged tokens written once.
        bytes=(tokens * config.patch_dim + weights + out_rows * config.out_hidden_size) * size,
        flops=encoder_flops(config, grid),
        args=ARGS,
        build=functools.partial(_build, config, dtype, grid),
        reference=functools.partial(_forward_of, "qwen/torch"),
        rel_err_limit=limit,
    )


def encoder_flops(config: VisionConfig, grid: Grid) -> int:
    """Matrix FLOPs of one forward: every weight matrix on its rows (the merger's on a quarter
    of them), and QK^T and PV of each block over its segments (windows, or whole frames)."""
    tokens = math.prod(grid)
    flops = 0
    for name, shape in hf_shapes(config).items():
        if len(shape) >= 2:
            rows = tokens // config.merge_unit if name.startswith(MERGER) else tokens
            flops += 2 * rows * math.prod(shape)
    windows = sum(n * n for n in window_lengths(grid))
    frames = sum(n * n for n in frame_lengths(grid))
    full = len(config.fullatt_block_indexes)
    squares = full * frames + (config.depth - full) * windows
    return flops + 4 * config.hidden_size * squares


def _build(config: VisionConfig, dtype: torch.dtype, grid: Grid, make: Maker) -> Inputs:
    return {
        "pixels": make.randn(math.prod(grid), config.patch_dim, dtype=dtype),
        "weights": tower_weights(config, dtype, make.device),
        "grids": (grid,),
        "model": (config, dtype, make.device),
    }


@functools.cache
def tower_weights(
    config: VisionConfig, dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """One set of random weights per tower, dtype and device, shared by every case (the models
    built from them are built once per process, as a server would)."""
    if device.type == "meta":
        return {k: torch.empty(s, dtype=dtype, device=device) for k, s in hf_shapes(config).items()}
    return {k: v.to(device) for k, v in random_hf_state_dict(config, seed=0, dtype=dtype).items()}


def hf_tower(
    config: VisionConfig, weights: dict[str, torch.Tensor], attn_implementation: str
) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' tower sharing ``weights`` (same dtype and device) without a copy."""
    hf_config = Qwen2_5_VLVisionConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    with no_init_weights():
        model = Qwen2_5_VisionTransformerPretrainedModel(hf_config)
    model.load_state_dict(weights, strict=True, assign=True)
    device = next(iter(weights.values())).device
    return model.to(device).eval()


def hf_precomputed(config: VisionConfig, grid_thw: torch.Tensor) -> dict[str, object]:
    """The grid-only tensors transformers' forward accepts precomputed."""
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    return {
        "position_ids": get_vision_position_ids(grid_thw, config.spatial_merge_size),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(cu_seqlens.diff().max()),
        "window_index": window_index,
        "cu_window_seqlens": cu_window_seqlens,
        "max_window_seqlen": int(cu_window_seqlens.diff().max()),
    }


class VarlenAttention(nn.Module):
    """A block's attention with torch's ``varlen_attn`` in place of ``qwen.window_attn``: the
    PyTorch-only model (same packed qkv, in-place rotary and weights)."""

    def __init__(self, attn: VisionAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(
        self,
        x: Tensor,
        layout: GridLayout,
        cu_seqlens: Tensor,
        max_seqlen: int,
        kernels: LayerKernels,
    ) -> Tensor:
        q, k, v = self.attn.rotated_qkv(x, layout, kernels)
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return self.attn.proj(out.reshape(x.shape[0], -1))


def compile_for(function: Callable, device: torch.device) -> Callable:
    # aot_eager on the CPU checks that the forward traces, without a C++ compile per graph.
    return torch.compile(function, backend="inductor" if device.type == "cuda" else "aot_eager")


@functools.cache
def _model(name: str, config: VisionConfig, dtype: torch.dtype, device: torch.device) -> Callable:
    """Implementation ``name`` built once per process: a function of (pixels, grids) that
    returns a no-argument forward (the grid's index tensors made by the binding, not timed)."""
    family, _, variant = name.partition("/")
    kernels, _, mode = variant.partition("+")
    compiled = mode == "compile"
    weights = tower_weights(config, dtype, device)
    if family in ("qwen", "pytorch"):
        encoder = VisionEncoder.from_hf_state_dict(
            weights,
            config,
            kernels="torch" if family == "pytorch" else kernels,
            dtype=dtype,
            device=device,
        ).eval()
        if family == "pytorch":
            for block in encoder.blocks:
                block.attn = VarlenAttention(block.attn)
        encode = compile_for(encoder.encode, device) if compiled else encoder.encode

        def bind_ours(pixels: Tensor, grids: tuple[Grid, ...]) -> Callable[[], Tensor]:
            layout = encoder.layout(grids)
            return lambda: encode(pixels, layout)

        return bind_ours
    tower = hf_tower(config, weights, kernels)
    run = compile_for(tower, device) if compiled else tower

    def bind_theirs(pixels: Tensor, grids: tuple[Grid, ...]) -> Callable[[], Tensor]:
        return functools.partial(hf_forward(run, config, grids, device), pixels)

    return bind_theirs


def hf_forward(
    run: Callable, config: VisionConfig, grids: tuple[Grid, ...], device: torch.device
) -> Callable[[Tensor], Tensor]:
    """transformers' tower ``run`` (a module, or it compiled) as a function of the pixels, with
    the grid's inputs precomputed on ``device`` once; returns the merged tokens."""
    grid_thw = torch.tensor(grids)
    precomputed = {
        k: v.to(device) if isinstance(v, Tensor) else v
        for k, v in hf_precomputed(config, grid_thw).items()
    }
    grid_thw = grid_thw.to(device)
    # transformers pops the precomputed entries: hand it a fresh dict per call.
    return lambda pixels: run(pixels, grid_thw, **dict(precomputed)).pooler_output


def _prepare(name: str, inputs: Inputs) -> Inputs:
    return {**inputs, "forward": _model(name, *inputs["model"])(inputs["pixels"], inputs["grids"])}


def _run(inputs: Inputs) -> Tensor:
    # Value checks: kept in the correctness call, skipped in the timed ones (the harness's cycler).
    with torch.no_grad():
        return inputs["forward"]()


def _forward_of(name: str, inputs: Inputs) -> Tensor:
    """The output of implementation ``name`` on an input set (the reference: "qwen/torch")."""
    return _run(_prepare(name, inputs))


def _impl(name: str, **fields: object) -> Impl:
    prepare = functools.partial(_prepare, name)
    return Impl(name, _run, prepare=prepare, compiles=name.endswith("+compile"), **fields)


def ours(case: Case, device_type: str) -> list[Impl]:
    """Our encoder with the best kernels and with the references, eager and compiled."""
    names = ("qwen/auto", "qwen/torch", "qwen/auto+compile", "qwen/torch+compile")
    return [_impl(name, kind="qwen") for name in names]


def peers(op: str) -> list[Impl]:
    """transformers' tower with each attention it has, and the PyTorch-only model."""
    no_varlen = None if varlen_attn else "torch.nn.attention.varlen is not in this torch"
    return [
        _impl("transformers/eager"),
        _impl("transformers/sdpa"),
        _impl("transformers/sdpa+compile"),
        _impl(
            "transformers/flash_attention_2",
            missing=missing_module("flash_attn", "flash-attn"),
            cpu=False,
        ),
        # FlashAttention over packed segments: CUDA only.
        _impl("pytorch/varlen+compile", missing=no_varlen, cpu=False),
    ]


SUITE = Suite("encoder", (OP,), cases, peers, ours=ours, profile=True, warmup_ms=200, rep_ms=1000)
